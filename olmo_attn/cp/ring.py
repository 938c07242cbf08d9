"""Ring attention on any backend kernel that returns the log-sum-exp.

Two variants, chosen by the ring style's load balancer:

* **zig-zag** (:func:`zigzag_ring_attention`): every rank holds chunks ``r`` and ``2W−1−r`` of the
  sequence (of every document). K/V blocks travel around the ring with
  ``torch.distributed.batch_isend_irecv``; the next block's transfer runs while the current block is
  computed. Each step's sub-problems are plain kernel calls (dense, or varlen for documents;
  causal bottom-right or not; a shifted window) and their ``(out, lse)`` are merged with the stable
  log-sum-exp rule. The backward pass (a custom ``autograd.Function``) runs the ring again with the
  flash-style kernel backward on the final ``out``/``lse``; dK/dV accumulators travel with their
  K/V block and arrive home after ``W`` hops.
* **llama3** (:func:`llama3_ring_attention`): contiguous shards; K/V are all-gathered in groups of
  ``head_stride`` kv heads (the next group's gather overlaps the current group's compute) and each
  rank attends its queries to the key range ``local_k_slice`` with per-rank query/key document
  offsets. The backward pass reduce-scatters dK/dV.

Sliding windows: llama3 supports any window. Zig-zag supports windows on plain sequences and on
documents: blocks entirely outside the window are skipped, partial ones are cut (rows that see no
key are dropped, keys no row can see are dropped) so that the kernel's bottom-right window lands on
the right global offsets. Dropout is refused (use Ulysses, which runs ordinary attention).

Before the first exchange every call runs the cross-rank input check of :mod:`.check` (shapes,
dtypes, settings and document metadata must fit together on all CP ranks, else every rank raises
:class:`~olmo_attn.exceptions.CPInputMismatchError`); a rank's own validation errors are raised after
it, so no rank is left waiting in the ring.

Shapes: ``q [B, T_l, Hq, D]``, ``k, v [B, T_l, Hkv, D]`` (GQA: ``Hq % Hkv == 0``) → ``[B, T_l, Hq, D]``.
Internally, document mode works on the flattened ``[B·T_l, H, D]`` tokens with ``lse [H, B·T_l]``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..ops.kernel import AttentionKernel, KernelCall
from .errors import ContextParallelInputError, ContextParallelUnsupportedError

if TYPE_CHECKING:
    from ..backends.base import AttentionBackend

ProcessGroup = Any
Rows = slice | torch.Tensor  # a contiguous range, or int64 row indices

__all__ = ["llama3_ring_attention", "ring_attention", "zigzag_ring_attention"]


# ---------------------------------------------------------------------------------------------- entry


def ring_attention(
    backend: AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_doc_lens: torch.Tensor | None = None,
    cu_doc_lens_q: torch.Tensor | None = None,
    cu_doc_lens_k: torch.Tensor | None = None,
    max_doc_len: int | None = None,
    max_doc_len_q: int | None = None,
    max_doc_len_k: int | None = None,
    local_k_slice: slice | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Ring attention for ``backend`` (called by ``AttentionBackend.forward`` under ring CP).

    Args:
        q: local queries ``[B, T_l, Hq, D]`` in the balancer's layout; k, v: ``[B, T_l, Hkv, D]``.
        cu_doc_lens, max_doc_len: zig-zag document metadata (the balancer's *local* offsets).
        cu_doc_lens_q, cu_doc_lens_k, max_doc_len_q, max_doc_len_k, local_k_slice: llama3 metadata.
        dropout_p: must be 0 (dropout is not supported under ring CP).

    Returns:
        ``[B, T_l, Hq, D]`` in the local token order.
    """
    strategy = str(backend.ring.load_balancer)
    if strategy not in ("zig_zag", "llama3"):
        raise ContextParallelUnsupportedError(
            f"load balancer '{strategy}' is not a ring strategy; use RingContextParallelStyle(load_balancer="
            "'zig_zag' or 'llama3'), or UlyssesContextParallelStyle() for Ulysses"
        )
    # Errors found here are raised after the cross-rank check (so every rank raises, none waits).
    error: Exception | None = None
    kernel: Any = None
    try:
        if dropout_p > 0.0:
            raise ContextParallelUnsupportedError(
                f"dropout_p={dropout_p} is not supported under ring context parallelism (each rank would need "
                "the keep-mask of blocks it never holds); use UlyssesContextParallelStyle(), which runs "
                "ordinary attention with dropout, or set dropout to 0 / call model.eval()"
            )
        kernel = backend.kernel()
        if strategy == "zig_zag":
            extra = {
                "cu_doc_lens_q": cu_doc_lens_q,
                "cu_doc_lens_k": cu_doc_lens_k,
                "max_doc_len_q": max_doc_len_q,
                "max_doc_len_k": max_doc_len_k,
                "local_k_slice": local_k_slice,
            }
            given = [name for name, val in extra.items() if val is not None]
            if given:
                raise ContextParallelInputError(
                    f"zig-zag ring attention requires unified query/key document lengths, got {given}; pass "
                    "the cu_doc_lens/max_doc_len returned by RingAttentionZigZagLoadBalancer."
                    "batch_shard_by_document (the _q/_k/local_k_slice arguments belong to the llama3 balancer)"
                )
            if max_doc_len is not None and cu_doc_lens is None:
                raise ContextParallelInputError(
                    "max_doc_len was given without cu_doc_lens; pass both or neither"
                )
        elif cu_doc_lens is not None or max_doc_len is not None:
            raise ContextParallelInputError(
                "llama3 ring attention takes cu_doc_lens_q/cu_doc_lens_k/max_doc_len_q/max_doc_len_k/"
                "local_k_slice (from RingAttentionLlama3LoadBalancer.batch_shard_by_document), not "
                "cu_doc_lens/max_doc_len"
            )
    except Exception as exc:
        error = exc
    if strategy == "zig_zag":
        return _zigzag(
            q,
            k,
            v,
            group=backend.cp_pg,
            kernel=kernel,
            scale=backend.softmax_scale,
            window=backend.window_size,
            cu_doc_lens=cu_doc_lens,
            max_doc_len=max_doc_len,
            dropout_p=dropout_p,
            error=error,
        )
    return _llama3(
        q,
        k,
        v,
        group=backend.cp_pg,
        kernel=kernel,
        scale=backend.softmax_scale,
        window=backend.window_size,
        cu_doc_lens_q=cu_doc_lens_q,
        cu_doc_lens_k=cu_doc_lens_k,
        local_k_slice=local_k_slice,
        head_stride=backend.head_stride,
        dropout_p=dropout_p,
        error=error,
    )


# ---------------------------------------------------------------------------------------------- common


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ContextParallelInputError(
            f"ring attention needs q [B, T, Hq, D] and k = v [B, T, Hkv, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ContextParallelInputError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D (self-attention shards)"
        )
    if q.shape[2] % k.shape[2]:
        raise ContextParallelInputError(f"Hq={q.shape[2]} is not a multiple of Hkv={k.shape[2]}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_info(group: ProcessGroup) -> tuple[ProcessGroup, int, int]:
    if not dist.is_initialized():
        raise ContextParallelInputError(
            "context parallelism needs torch.distributed to be initialised (init_process_group) and a "
            "DeviceMesh for the CP ranks"
        )
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


class _Ring:
    """Point-to-point exchange with the ring neighbours: send to ``r+1``, receive from ``r−1``."""

    def __init__(self, group: ProcessGroup, rank: int, world: int):
        self.group = group
        self.world = world
        self.send_to = dist.get_global_rank(group, (rank + 1) % world)
        self.recv_from = dist.get_global_rank(group, (rank - 1) % world)

    def start(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Post the exchange of ``t``; returns ``(recv buffer, sent tensor, requests)``."""
        buf = torch.empty_like(t)
        ops = [
            dist.P2POp(dist.isend, t, self.send_to, self.group),
            dist.P2POp(dist.irecv, buf, self.recv_from, self.group),
        ]
        return buf, t, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(pending: tuple[torch.Tensor, torch.Tensor, list]) -> torch.Tensor:
        buf, _sent, reqs = pending  # ``_sent`` stays referenced until the send completed
        for req in reqs:
            req.wait()
        return buf


def _take(x: torch.Tensor, rows: Rows, dim: int) -> torch.Tensor:
    if isinstance(rows, slice):
        if rows == slice(None):
            return x
        return x.narrow(dim, rows.start, rows.stop - rows.start)
    return x.index_select(dim, rows)


def _put(acc: torch.Tensor, rows: Rows, dim: int, val: torch.Tensor) -> None:
    if isinstance(rows, slice):
        _take(acc, rows, dim).copy_(val)
    else:
        acc.index_copy_(dim, rows, val)


def _add(acc: torch.Tensor, rows: Rows, dim: int, val: torch.Tensor) -> None:
    if isinstance(rows, slice):
        _take(acc, rows, dim).add_(val)
    else:
        acc.index_add_(dim, rows, val.to(acc.dtype))


def _merge(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out_blk: torch.Tensor,
    lse_blk: torch.Tensor,
    rows: Rows,
    varlen: bool,
    first: bool = False,
) -> None:
    """Merge a block's ``(out, lse)`` into the accumulators on ``rows`` (stable; ``-inf``-safe).

    Dense: ``out [B, T, H, D]``, ``lse [B, H, T]``, rows on dims 1 / 2. Varlen: ``out [N, H, D]``,
    ``lse [H, N]``, rows on dims 0 / 1. ``first``: nothing was merged into these rows yet (a copy).
    The out-sized work is two in-place passes (``mul_``, ``addcmul_``); everything else is lse-sized.
    """
    o_dim, l_dim = (0, 1) if varlen else (1, 2)
    if first:
        _put(out_acc, rows, o_dim, out_blk)
        _put(lse_acc, rows, l_dim, lse_blk)
        return
    l_old = _take(lse_acc, rows, l_dim)
    l_blk = lse_blk.to(lse_acc.dtype)
    m = torch.maximum(l_old, l_blk)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # rows empty in both: any finite shift
    w_old = torch.exp(l_old - m)
    w_blk = torch.exp(l_blk - m)
    total = w_old + w_blk
    l_new = m + torch.log(total)  # total == 0 -> -inf
    inv = 1.0 / torch.where(total > 0, total, torch.ones_like(total))  # both weights are 0 where total is
    # lse layout -> out layout: varlen [H, N] -> [N, H, 1]; dense [B, H, T] -> [B, T, H, 1]
    to_out = (lambda w: w.t().unsqueeze(-1)) if varlen else (lambda w: w.transpose(1, 2).unsqueeze(-1))
    o = _take(out_acc, rows, o_dim)  # a view for slices, a copy for index rows
    o.mul_(to_out(w_old * inv)).addcmul_(out_blk, to_out(w_blk * inv))
    if not isinstance(rows, slice):
        out_acc.index_copy_(o_dim, rows, o)
    _put(lse_acc, rows, l_dim, l_new)


# ---------------------------------------------------------------------------------------------- zig-zag plan


@dataclass(frozen=True)
class _Block:
    """One kernel call of a ring step: rows of the local queries against rows of the held K/V."""

    call: KernelCall
    q_rows: Rows
    k_rows: Rows


def _pair(qc: int, kc: int, c: int, left: int, right: int):
    """Sub-problem of query chunk ``qc`` against key chunk ``kc`` (both of ``c`` tokens).

    Returns ``(causal, window, (q0, q1), (k0, k1))`` with row ranges inside the chunks, or ``None``
    when no query sees any key. Off-diagonal blocks (all keys before all queries) run non-causal; with
    a window they keep only rows that see a key and keys that some row sees, and the window's left
    edge is shifted so the bottom-right alignment reproduces ``key >= query − left`` globally.
    """
    if c == 0 or kc > qc:
        return None
    if kc == qc:
        return True, (left, right), (0, c), (0, c)
    if left < 0:
        return False, (-1, -1), (0, c), (0, c)
    oq, ok = qc * c, kc * c
    n = min(c, ok + c + left - oq)  # query rows that see at least one key
    if n <= 0:
        return None
    t = max(0, oq - left - ok)  # leading keys that no row sees
    shifted = left - (oq + n - (ok + c))  # >= 0: the last kept row's window edge, from the last key
    return False, (shifted, -1), (0, n), (t, c)


def _segments(
    docs: Sequence[tuple[int, int]],
    tail: tuple[int, int] | None,
    kind: str,
    rank: int,
    src: int,
    world: int,
    left: int,
    right: int,
    windowed: bool,
) -> dict[tuple[bool, tuple[int, int]], list[tuple[int, int, int, int]]]:
    """Group the step's sub-problems by ``(causal, window)``: lists of ``(q0, q1, k0, k1)`` row ranges.

    ``docs`` are ``(start, chunk)`` of the zig-zag documents in the local layout (``2·chunk`` tokens:
    chunk ``r``, then chunk ``2W−1−r``); ``tail`` an odd-length trailing padding document
    ``(start, length)`` that only attends to itself (step 0).
    """
    groups: dict[tuple[bool, tuple[int, int]], list[tuple[int, int, int, int]]] = {}

    def add(causal: bool, window: tuple[int, int], seg: tuple[int, int, int, int]) -> None:
        if seg[1] > seg[0] and seg[3] > seg[2]:
            groups.setdefault((causal, window), []).append(seg)

    full = (-1, -1)
    if not windowed:
        # one sub-problem per document and step (ring-flash-attn's grouping)
        for s, c in docs:
            if kind == "diag":  # both local chunks are in global order: plain causal over 2c tokens
                add(True, full, (s, s + 2 * c, s, s + 2 * c))
            elif kind == "lower":  # held chunks src < r: all queries see the held first chunk
                add(False, full, (s, s + 2 * c, s, s + c))
            else:  # held chunks src > r: only the second query chunk sees them, all of them
                add(False, full, (s + c, s + 2 * c, s, s + 2 * c))
        if tail is not None and kind == "diag":
            add(True, full, (tail[0], tail[0] + tail[1], tail[0], tail[0] + tail[1]))
        return groups
    q_chunks = (rank, 2 * world - 1 - rank)
    k_chunks = (src, 2 * world - 1 - src)
    for s, c in docs:
        for qh, qc in enumerate(q_chunks):
            for kh, kc in enumerate(k_chunks):
                sub = _pair(qc, kc, c, left, right)
                if sub is None:
                    continue
                causal, window, (q0, q1), (k0, k1) = sub
                add(causal, window, (s + qh * c + q0, s + qh * c + q1, s + kh * c + k0, s + kh * c + k1))
    if tail is not None and kind == "diag":
        add(True, (left, right), (tail[0], tail[0] + tail[1], tail[0], tail[0] + tail[1]))
    return groups


def _rows(ranges: Sequence[tuple[int, int]], n_total: int, device: torch.device) -> Rows:
    """Row selector for the concatenation of ``ranges``: a slice when contiguous, else indices."""
    merged = [ranges[0]]
    for a, b in ranges[1:]:
        if a == merged[-1][1]:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    if len(merged) == 1:
        a, b = merged[0]
        return slice(None) if (a, b) == (0, n_total) else slice(a, b)
    return torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in merged]).to(device)


def _materialize(
    groups: dict[tuple[bool, tuple[int, int]], list[tuple[int, int, int, int]]],
    *,
    varlen: bool,
    scale: float,
    n_total: int,
    device: torch.device,
) -> list[_Block]:
    blocks = []
    for (causal, window), segs in groups.items():
        if not varlen:
            for q0, q1, k0, k1 in segs:  # one "document": the whole local row
                blocks.append(
                    _Block(
                        KernelCall(scale=scale, causal=causal, window=window),
                        _rows([(q0, q1)], n_total, device),
                        _rows([(k0, k1)], n_total, device),
                    )
                )
            continue
        lq = [q1 - q0 for q0, q1, _, _ in segs]
        lk = [k1 - k0 for _, _, k0, k1 in segs]
        cu_q = (0, *itertools.accumulate(lq))
        cu_k = (0, *itertools.accumulate(lk))
        call = KernelCall(
            scale=scale,
            causal=causal,
            window=window,
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
            max_seqlen_q=max(lq),
            max_seqlen_k=max(lk),
            cu_seqlens_q_host=cu_q,
            cu_seqlens_k_host=cu_k,
        )
        blocks.append(
            _Block(
                call,
                _rows([(q0, q1) for q0, q1, _, _ in segs], n_total, device),
                _rows([(k0, k1) for _, _, k0, k1 in segs], n_total, device),
            )
        )
    return blocks


_PLAN_CACHE: OrderedDict[tuple, dict[str, list[_Block]]] = OrderedDict()


def _zigzag_plans(
    local_cu: tuple[int, ...] | None,
    n_rows: int,
    rank: int,
    world: int,
    scale: float,
    window: tuple[int, int],
    device: torch.device,
) -> dict[str, list[_Block]]:
    """Kernel calls per step kind (``diag`` = own K/V, ``lower`` = held chunks earlier, ``upper``)."""
    key = (local_cu, n_rows, rank, world, scale, window, str(device))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit
    left, right = window
    windowed = left >= 0
    varlen = local_cu is not None
    if not varlen:
        if n_rows % 2:
            raise ContextParallelInputError(
                f"zig-zag ring attention needs an even local length (two equal chunks), got T_local={n_rows}; "
                "shard the inputs with RingAttentionZigZagLoadBalancer.batch_shard"
            )
        docs, tail = [(0, n_rows // 2)], None
    else:
        docs, tail = [], None
        n_docs = len(local_cu) - 1
        for d in range(n_docs):
            s, e = local_cu[d], local_cu[d + 1]
            if (e - s) % 2 == 0:
                docs.append((s, (e - s) // 2))
            elif d == n_docs - 1:
                tail = (s, e - s)  # the balancer's length_multiple padding document
            else:
                raise ContextParallelInputError(
                    f"local document {d} has odd length {e - s}: zig-zag documents are two equal chunks per "
                    "rank; pass the cu_doc_lens returned by RingAttentionZigZagLoadBalancer."
                    "batch_shard_by_document (not the global offsets)"
                )

    def build(kind: str, src: int) -> list[_Block]:
        groups = _segments(docs, tail, kind, rank, src, world, left, right, windowed)
        return _materialize(groups, varlen=varlen, scale=scale, n_total=n_rows, device=device)

    plans = {"diag": build("diag", rank)}
    if windowed:  # the window geometry depends on the distance between chunks: one plan per source
        for src in range(world):
            if src != rank:
                plans[f"src{src}"] = build("lower" if src < rank else "upper", src)
    else:  # without a window only the order of the chunks matters
        plans["lower"] = build("lower", -1)
        plans["upper"] = build("upper", -1)
    _PLAN_CACHE[key] = plans
    if len(_PLAN_CACHE) > 64:
        _PLAN_CACHE.popitem(last=False)
    return plans


def _step_blocks(plans: dict[str, list[_Block]], rank: int, src: int, windowed: bool) -> list[_Block]:
    if src == rank:
        return plans["diag"]
    if windowed:
        return plans[f"src{src}"]
    return plans["lower" if src < rank else "upper"]


class _RingFunction(torch.autograd.Function):
    """Autograd of one ring variant: ``fwd(q, k, v, state) -> (out, lse)``; the backward gets the
    final ``out``/``lse`` and circulates dK/dV: ``bwd(dout, q, k, v, out, lse, state) -> dq, dk, dv``."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, state):  # type: ignore[override]
        out, lse = fwd(q, k, v, state)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.state = bwd, state
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        return (*ctx.bwd(dout, q, k, v, out, lse, ctx.state), None, None, None)


@dataclass
class _ZigZagState:
    kernel: AttentionKernel
    plans: dict[str, list[_Block]]
    ring: _Ring | None
    rank: int
    world: int
    varlen: bool
    windowed: bool


def _flat(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:]) if varlen else x


def _zigzag_forward(q, k, v, st: _ZigZagState) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    acc = _acc_dtype(q.dtype)
    varlen = st.varlen
    qf = _flat(q, varlen)
    if varlen:
        out_acc = torch.zeros(B * T, H, D, dtype=acc, device=q.device)
        lse_acc = torch.full((H, B * T), float("-inf"), dtype=acc, device=q.device)
    else:
        out_acc = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
        lse_acc = torch.full((B, H, T), float("-inf"), dtype=acc, device=q.device)
    o_dim = 0 if varlen else 1
    kv = torch.stack([k, v])  # [2, B, T, Hkv, D]: one message per step
    untouched = True  # nothing merged yet
    for step in range(st.world):
        pending = st.ring.start(kv) if (st.ring is not None and step + 1 < st.world) else None
        src = (st.rank - step) % st.world
        kf, vf = _flat(kv[0], varlen), _flat(kv[1], varlen)
        for blk in _step_blocks(st.plans, st.rank, src, st.windowed):
            o, lse = st.kernel.forward(
                _take(qf, blk.q_rows, o_dim),
                _take(kf, blk.k_rows, o_dim),
                _take(vf, blk.k_rows, o_dim),
                blk.call,
            )
            first = untouched and isinstance(blk.q_rows, slice) and blk.q_rows == slice(None)  # copy
            _merge(out_acc, lse_acc, o, lse, blk.q_rows, varlen, first=first)
            untouched = False
        if pending is not None:
            kv = _Ring.wait(pending)
    return out_acc.to(q.dtype).view(B, T, H, D), lse_acc


def _zigzag_backward(dout, q, k, v, out, lse, st: _ZigZagState):
    varlen = st.varlen
    o_dim, l_dim = (0, 1) if varlen else (1, 2)
    acc = _acc_dtype(q.dtype)
    qf, of, dof = _flat(q, varlen), _flat(out, varlen), _flat(dout.contiguous(), varlen)
    dq = torch.zeros(qf.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    pending_kv = None
    pending_dkv = None
    dkv = None
    for step in range(st.world):
        if st.ring is not None and step + 1 < st.world:
            pending_kv = st.ring.start(kv)
        src = (st.rank - step) % st.world
        kf, vf = _flat(kv[0], varlen), _flat(kv[1], varlen)
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        dkf, dvf = _flat(dkv[0], varlen), _flat(dkv[1], varlen)
        for blk in _step_blocks(st.plans, st.rank, src, st.windowed):
            qr, kr = blk.q_rows, blk.k_rows
            dq_b, dk_b, dv_b = st.kernel.backward(
                _take(dof, qr, o_dim),
                _take(qf, qr, o_dim),
                _take(kf, kr, o_dim),
                _take(vf, kr, o_dim),
                _take(of, qr, o_dim),
                _take(lse, qr, l_dim).contiguous(),
                blk.call,
            )
            _add(dq, qr, o_dim, dq_b)
            _add(dkf, kr, o_dim, dk_b)
            _add(dvf, kr, o_dim, dv_b)
        if pending_dkv is not None:
            dkv += _Ring.wait(pending_dkv)  # the accumulator of this block from its previous holders
        if st.ring is not None:
            pending_dkv = st.ring.start(dkv)  # hand it to the next holder
        if pending_kv is not None and step + 1 < st.world:
            kv = _Ring.wait(pending_kv)
            pending_kv = None
    if pending_dkv is not None:
        dkv = _Ring.wait(pending_dkv)  # after W hops: the gradient of this rank's own K/V
    assert dkv is not None
    return dq.to(q.dtype).view(q.shape), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def zigzag_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup,
    kernel: AttentionKernel,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    cu_doc_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal zig-zag ring attention over the CP ``group`` (differentiable).

    Args:
        q: ``[B, T_l, Hq, D]`` local queries, chunks ``r`` and ``2W−1−r`` of the sequence (per document
            with ``cu_doc_lens``); k, v: ``[B, T_l, Hkv, D]`` in the same layout.
        kernel: an :class:`~olmo_attn.ops.kernel.AttentionKernel` (``forward -> (out, lse)``,
            flash-style ``backward``).
        scale: softmax scale (default ``1/sqrt(D)``).
        window: ``(left, right)`` sliding window (bottom-right convention, ``-1`` unbounded).
        cu_doc_lens: the balancer's *local* ``[n_docs + 1]`` offsets over the flattened ``B·T_l``
            tokens (every document as two equal chunks; an odd trailing padding document is allowed).

    Returns:
        ``[B, T_l, Hq, D]``.
    """
    return _zigzag(q, k, v, group=group, kernel=kernel, scale=scale, window=window, cu_doc_lens=cu_doc_lens)


_ZIGZAG_DOCS_FIX = (
    "every rank must pass the same document offsets: the local cu_doc_lens that shard_batch "
    "(RingAttentionZigZagLoadBalancer.batch_shard_by_document) returns for the same whole-sequence "
    "documents, which is identical on every rank"
)
_LLAMA3_DOCS_FIX = (
    "pass every rank the cu_doc_lens_q/cu_doc_lens_k/local_k_slice that shard_batch "
    "(RingAttentionLlama3LoadBalancer.batch_shard_by_document) returns for the same whole-sequence "
    "cu_doc_lens"
)


def _effective_scale(scale: float | None, q: Any) -> float:
    if scale is not None:
        return float(scale)
    return float(q.shape[-1]) ** -0.5 if isinstance(q, torch.Tensor) and q.dim() and q.shape[-1] else 0.0


def _zigzag(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup,
    kernel: AttentionKernel,
    scale: float | None,
    window: tuple[int, int],
    cu_doc_lens: torch.Tensor | None,
    max_doc_len: int | None = None,
    dropout_p: float = 0.0,
    error: Exception | None = None,
) -> torch.Tensor:
    """:func:`zigzag_ring_attention`, with the cross-rank check before the first exchange; ``error``:
    a validation error of the caller, raised after the check."""
    group, rank, world = _group_info(group)
    local_cu = None
    state = None
    try:
        if error is not None:
            raise error
        _check_qkv(q, k, v)
        B, T, _, D = q.shape
        scale = float(scale) if scale is not None else D**-0.5
        window = (int(window[0]), int(window[1]))
        if cu_doc_lens is not None:
            from ..masks import validate_cu_seqlens

            cu32 = cu_doc_lens if cu_doc_lens.dtype == torch.int32 else cu_doc_lens.to(torch.int32)
            local_cu = validate_cu_seqlens(cu32, "cu_doc_lens", B * T)
        plans = _zigzag_plans(
            local_cu, B * T if local_cu is not None else T, rank, world, scale, window, q.device
        )
        state = _ZigZagState(
            kernel=kernel,
            plans=plans,
            ring=_Ring(group, rank, world) if world > 1 else None,
            rank=rank,
            world=world,
            varlen=local_cu is not None,
            windowed=window[0] >= 0,
        )
    except Exception as exc:
        error = exc
    if world > 1:
        from .check import CPDocs, host_ints, verify_cp_inputs

        docs = None
        if cu_doc_lens is not None:
            values = local_cu if local_cu is not None else host_ints(cu_doc_lens)
            docs = CPDocs(lists=(("cu_doc_lens", values),), scalars=(("max_doc_len", max_doc_len),))
        verify_cp_inputs(
            group,
            strategy="zig_zag",
            tensors=(q, k, v),
            settings={
                "window": window,
                "causal": True,
                "softmax scale": _effective_scale(scale, q),
                "dropout_p": float(dropout_p),
            },
            docs=docs,
            fix=_ZIGZAG_DOCS_FIX,
            local_error=error,
        )
    if error is not None:
        raise error
    assert state is not None
    return _RingFunction.apply(q, k, v, _zigzag_forward, _zigzag_backward, state)


# ---------------------------------------------------------------------------------------------- llama3


def _all_gather(t: torch.Tensor, group: ProcessGroup, world: int, async_op: bool):
    """``[W, *t.shape]``: every rank's ``t`` (rank-major), and the work handle."""
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = fn(out, t.contiguous(), group=group, async_op=async_op)
    return out.view(world, *t.shape), work


def _reduce_scatter(t: torch.Tensor, group: ProcessGroup, world: int, async_op: bool):
    """Sum ``t [W, ...]`` over ranks; this rank keeps ``[...]`` of its own index."""
    out = torch.empty(t.shape[1:], dtype=t.dtype, device=t.device)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    work = fn(out, t.reshape(world * t.shape[1], *t.shape[2:]), group=group, async_op=async_op)
    return out, work


@dataclass
class _Llama3State:
    kernel: AttentionKernel
    call: KernelCall
    group: ProcessGroup
    rank: int
    world: int
    head_stride: int
    key_range: tuple[int, int]  # rows of the gathered (flattened, B == 1) or per-row keys
    varlen: bool


def _gathered_keys(g: torch.Tensor, st: _Llama3State) -> tuple[torch.Tensor, torch.Tensor]:
    """``g [W, B, L, 2, hs, D]`` gathered K/V → (k, v) for this rank's key range."""
    W, B, L = g.shape[:3]
    a, e = st.key_range
    if st.varlen:  # B == 1: flat global rows [a, e)
        glob = g.view(W * L, *g.shape[3:])[a:e]  # [Nk, 2, hs, D]
        return glob[:, 0], glob[:, 1]
    glob = g.transpose(0, 1).reshape(B, W * L, *g.shape[3:])[:, a:e]  # [B, Nk, 2, hs, D]
    return glob[:, :, 0], glob[:, :, 1]


def _llama3_groups(Hkv: int, head_stride: int) -> list[tuple[int, int]]:
    return [(g, g + head_stride) for g in range(0, Hkv, head_stride)]


def _llama3_forward(q, k, v, st: _Llama3State):
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    kv = torch.stack([k, v], dim=2)  # [B, L, 2, Hkv, D]
    groups = _llama3_groups(Hkv, st.head_stride)
    outs, lses = [], []
    gathered = _all_gather(kv[:, :, :, groups[0][0] : groups[0][1]], st.group, st.world, async_op=True)
    for i, (h0, h1) in enumerate(groups):
        g, work = gathered
        if work is not None:
            work.wait()
        if i + 1 < len(groups):  # prefetch the next head group while this one computes
            n0, n1 = groups[i + 1]
            gathered = _all_gather(kv[:, :, :, n0:n1], st.group, st.world, async_op=True)
        kg, vg = _gathered_keys(g, st)
        qg = q[:, :, h0 * G : h1 * G]
        if st.varlen:
            qg = qg.reshape(B * L, (h1 - h0) * G, D)
        o, lse = st.kernel.forward(qg, kg, vg, st.call)
        outs.append(o)
        lses.append(lse)
    if st.varlen:
        out = torch.cat(outs, dim=1).view(B, L, Hq, D)  # varlen o [N, h, D]
        lse = torch.cat(lses, dim=0)  # [Hq, N]
    else:
        out = torch.cat(outs, dim=2)
        lse = torch.cat(lses, dim=1)  # [B, Hq, L]
    return out, lse


def _llama3_backward(dout, q, k, v, out, lse, st: _Llama3State):
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    W = st.world
    acc = _acc_dtype(q.dtype)
    kv = torch.stack([k, v], dim=2)  # [B, L, 2, Hkv, D]
    groups = _llama3_groups(Hkv, st.head_stride)
    dq = torch.empty_like(q)
    dkv = torch.empty((B, L, 2, Hkv, D), dtype=acc, device=q.device)
    a, e = st.key_range
    dout = dout.contiguous()
    gathered = _all_gather(kv[:, :, :, groups[0][0] : groups[0][1]], st.group, W, async_op=True)
    scattered: list[tuple[int, int, torch.Tensor, Any]] = []
    for i, (h0, h1) in enumerate(groups):
        g, work = gathered
        if work is not None:
            work.wait()
        if i + 1 < len(groups):
            n0, n1 = groups[i + 1]
            gathered = _all_gather(kv[:, :, :, n0:n1], st.group, W, async_op=True)
        kg, vg = _gathered_keys(g, st)
        hs = h1 - h0
        qs = slice(h0 * G, h1 * G)
        if st.varlen:
            args = (
                dout[:, :, qs].reshape(B * L, hs * G, D),
                q[:, :, qs].reshape(B * L, hs * G, D),
                kg,
                vg,
                out[:, :, qs].reshape(B * L, hs * G, D),
                lse[qs].contiguous(),
            )
        else:
            args = (dout[:, :, qs], q[:, :, qs], kg, vg, out[:, :, qs], lse[:, qs].contiguous())
        dq_g, dk_g, dv_g = st.kernel.backward(*args, st.call)
        dq[:, :, qs] = dq_g.view(B, L, hs * G, D).to(q.dtype)
        # scatter this rank's key-range gradients into a global buffer, then reduce-scatter by rank
        glob = torch.zeros((B, W * L, 2, hs, D), dtype=acc, device=q.device)
        if st.varlen:
            glob.view(W * L, 2, hs, D)[a:e, 0] = dk_g.to(acc)
            glob.view(W * L, 2, hs, D)[a:e, 1] = dv_g.to(acc)
        else:
            glob[:, a:e, 0] = dk_g.to(acc)
            glob[:, a:e, 1] = dv_g.to(acc)
        by_rank = glob.view(B, W, L, 2, hs, D).transpose(0, 1)  # [W, B, L, 2, hs, D]
        mine, work_rs = _reduce_scatter(by_rank, st.group, W, async_op=True)
        scattered.append((h0, h1, mine, work_rs))
    for h0, h1, mine, work_rs in scattered:
        if work_rs is not None:
            work_rs.wait()
        dkv[:, :, :, h0:h1] = mine
    return dq, dkv[:, :, 0].to(k.dtype), dkv[:, :, 1].to(v.dtype)


def _host(t: torch.Tensor | None, name: str) -> tuple[int, ...] | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
        raise ContextParallelInputError(f"{name} must be a 1-D integer tensor, got {t!r}")
    from ..masks import _host_values

    return _host_values(t)


def llama3_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup,
    kernel: AttentionKernel,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    cu_doc_lens_q: torch.Tensor | None = None,
    cu_doc_lens_k: torch.Tensor | None = None,
    local_k_slice: slice | None = None,
    head_stride: int = 1,
) -> torch.Tensor:
    """Causal llama3 ("all-gather K/V") context-parallel attention (differentiable).

    Args:
        q: ``[B, L, Hq, D]`` this rank's contiguous slice ``[r·L, (r+1)·L)``; k, v: ``[B, L, Hkv, D]``.
        cu_doc_lens_q, cu_doc_lens_k, local_k_slice: the llama3 balancer's per-rank metadata
            (documents; needs ``B == 1``). Without them the shards are one causal sequence per row
            and rank ``r`` attends to keys ``[0, (r+1)·L)``.
        head_stride: kv heads gathered (and computed) per step; must divide ``Hkv``.
        window: ``(left, right)`` sliding window, bottom-right aligned inside every segment.

    Returns:
        ``[B, L, Hq, D]``.
    """
    return _llama3(
        q,
        k,
        v,
        group=group,
        kernel=kernel,
        scale=scale,
        window=window,
        cu_doc_lens_q=cu_doc_lens_q,
        cu_doc_lens_k=cu_doc_lens_k,
        local_k_slice=local_k_slice,
        head_stride=head_stride,
    )


def _llama3(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup,
    kernel: AttentionKernel,
    scale: float | None,
    window: tuple[int, int],
    cu_doc_lens_q: torch.Tensor | None,
    cu_doc_lens_k: torch.Tensor | None,
    local_k_slice: slice | None,
    head_stride: int,
    dropout_p: float = 0.0,
    error: Exception | None = None,
) -> torch.Tensor:
    """:func:`llama3_ring_attention`, with the cross-rank check before the first gather; ``error``:
    a validation error of the caller, raised after the check."""
    group, rank, world = _group_info(group)
    hq = hk = None
    try:
        if error is not None:
            raise error
        _check_qkv(q, k, v)
        B, L, _, D = q.shape
        Hkv = k.shape[2]
        if (
            isinstance(head_stride, bool)
            or not isinstance(head_stride, int)
            or head_stride < 1
            or Hkv % head_stride
        ):
            raise ContextParallelInputError(
                f"head_stride={head_stride!r} must be a positive divisor of n_kv_heads={Hkv}; use one of "
                f"{[d for d in range(1, Hkv + 1) if Hkv % d == 0]}"
            )
        scale = float(scale) if scale is not None else D**-0.5
        window = (int(window[0]), int(window[1]))
        given = [x is not None for x in (cu_doc_lens_q, cu_doc_lens_k, local_k_slice)]
        if any(given) and not all(given):
            raise ContextParallelInputError(
                "llama3 ring attention with documents needs cu_doc_lens_q, cu_doc_lens_k and local_k_slice "
                "together (all from RingAttentionLlama3LoadBalancer.batch_shard_by_document)"
            )
        varlen = all(given)
        if varlen:
            if B != 1:
                raise ContextParallelInputError(
                    f"llama3 ring attention with documents needs the batch packed into one row (B == 1), got B={B}"
                )
            hq, hk = _host(cu_doc_lens_q, "cu_doc_lens_q"), _host(cu_doc_lens_k, "cu_doc_lens_k")
            assert hq is not None and hk is not None and local_k_slice is not None
            a, e = local_k_slice.start, local_k_slice.stop
            if local_k_slice.step not in (None, 1) or a is None or e is None or not 0 <= a < e <= world * L:
                raise ContextParallelInputError(
                    f"local_k_slice={local_k_slice} must be a contiguous slice inside the {world * L} gathered keys"
                )
            if hq[-1] != L or hk[-1] != e - a or len(hq) != len(hk) or hq[0] != 0 or hk[0] != 0:
                raise ContextParallelInputError(
                    f"llama3 metadata does not match the shapes: cu_doc_lens_q={list(hq)} must end at L={L}, "
                    f"cu_doc_lens_k={list(hk)} at len(local_k_slice)={e - a}, with the same number of segments"
                )
            dev = q.device
            call = KernelCall(
                scale=scale,
                causal=True,
                window=window,
                cu_seqlens_q=cu_doc_lens_q.to(device=dev, dtype=torch.int32),
                cu_seqlens_k=cu_doc_lens_k.to(device=dev, dtype=torch.int32),
                max_seqlen_q=max(y - x for x, y in itertools.pairwise(hq)),
                max_seqlen_k=max(y - x for x, y in itertools.pairwise(hk)),
                cu_seqlens_q_host=hq,
                cu_seqlens_k_host=hk,
            )
            key_range = (a, e)
        else:
            call = KernelCall(scale=scale, causal=True, window=window)
            key_range = (0, (rank + 1) * L)
    except Exception as exc:
        error = exc
    if world > 1:
        from .check import Llama3Docs, host_ints, verify_cp_inputs

        docs = None
        if any(x is not None for x in (cu_doc_lens_q, cu_doc_lens_k, local_k_slice)):
            sl = local_k_slice if isinstance(local_k_slice, slice) else None
            docs = Llama3Docs(
                cu_q=hq if hq is not None else host_ints(cu_doc_lens_q),
                cu_k=hk if hk is not None else host_ints(cu_doc_lens_k),
                k_start=sl.start if sl is not None and isinstance(sl.start, int) else None,
                k_stop=sl.stop if sl is not None and isinstance(sl.stop, int) else None,
                valid=error is None,
                tensors=tuple(t for t in (cu_doc_lens_q, cu_doc_lens_k) if isinstance(t, torch.Tensor)),
            )
        verify_cp_inputs(
            group,
            strategy="llama3",
            tensors=(q, k, v),
            settings={
                "window": window,
                "causal": True,
                "softmax scale": _effective_scale(scale, q),
                "head_stride": head_stride if isinstance(head_stride, int) else -3,
                "dropout_p": float(dropout_p),
            },
            docs=docs,
            fix=_LLAMA3_DOCS_FIX,
            local_error=error,
        )
    if error is not None:
        raise error
    state = _Llama3State(
        kernel=kernel,
        call=call,
        group=group,
        rank=rank,
        world=world,
        head_stride=head_stride,
        key_range=key_range,
        varlen=varlen,
    )
    return _RingFunction.apply(q, k, v, _llama3_forward, _llama3_backward, state)
