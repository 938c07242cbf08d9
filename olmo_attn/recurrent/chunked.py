"""The gated delta rule in chunked (WY / UT-transform) form, in plain PyTorch.

Math (per value head, one sequence; ``docs/CONVENTIONS.md`` "Gated delta rule")::

    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        S: [Dk, Dv]
    o_t = scale * S_t^T q_t

Chunked form (chunk of ``C`` tokens, ``G`` = chunk-local cumulative log-decay, ``S`` = state entering
the chunk; every exponent below is <= 0, so nothing overflows however strong the decay)::

    A    = strict_lower(diag(b) K K^T * exp(G_i - G_j))                          [C, C]
    W    = (I + A)^-1 (b exp(G) * K)        U = (I + A)^-1 (b * V)                [C, Dk], [C, Dv]
    Kd   = exp(G_C - G) * K                 d = exp(G_C)                          [C, Dk], scalar
    M    = d I - Kd^T W                     Bc = Kd^T U                           [Dk, Dk], [Dk, Dv]
    S'   = M S + Bc                                                              [Dk, Dv]
    P    = lower_incl(scale Q K^T * exp(G_i - G_j))                              [C, C]
    O    = (scale exp(G) * Q - P W) S + P U                                      [C, Dv]

(``Vn = U - W S``, ``S' = d S + Kd^T Vn`` and ``O = scale exp(G) Q S + P Vn``, with ``Vn`` expanded.)
Everything but ``S' = M S + Bc`` is independent per chunk and runs as a fixed number of large
batched ops over **all** chunks at once (autograd handles their backward). The recurrence is the
only sequential part: one batched matmul (``baddbmm``) per chunk forward and one backward
(:class:`_StateRecurrence`, whose backward is written by hand: ``dS = M^T dS' + dS_ext`` per chunk,
then ``dM = dS' S^T`` and ``dBc = dS'`` batched). ``scan="delta"`` selects the previous form, which
keeps ``Vn`` in the loop (three kernels per chunk: ``Vn = U - W S``, ``S' = d S``, ``S' += Kd^T Vn``;
cheaper in FLOPs when ``2 C < Dk``, three times the launches).

``(I + A)^-1`` is computed without triangular solves on CUDA (``solve="doubling"``): the inverses
of the diagonal blocks of size ``h`` are paired into blocks of size ``2h``
(``[[X1, 0], [-X2 A21 X1, X2]]``), ``log2(C)`` levels of two batched matmuls each — exactly
forward substitution, reordered into matmuls.

Documents (``cu_seqlens``) of any length are laid out chunk-aligned: each document starts a fresh
chunk, the tail of its last chunk is zero padding (``k = v = q = 0``, ``b = 0``, ``g = 0``: the
state passes through unchanged, ``M = I``). Documents are packed onto "lanes" (longest first, onto
the least loaded lane) so the sequential loop runs about ``max(longest document, total / lanes)``
chunks instead of the sum; the state is reset (to zero or the document's initial state) where a
document begins and read out where it ends.

All arithmetic is float32 (float64 for float64 inputs); bf16/fp16 inputs are converted once, while
being laid out. Autocast is switched off inside the kernel (forward, recomputation and backward):
it would run the chunk matmuls in bf16 and mix dtypes in the recurrence.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "KERNELS",
    "autocast_off",
    "chunk_gated_delta_rule",
    "compute_dtype_for",
    "l2norm",
    "validate_gdr_inputs",
]

DEFAULT_CHUNK_SIZE = 64
L2NORM_EPS = 1e-6
SOLVES = ("auto", "solve", "blocked", "doubling")
SCANS = ("auto", "transition", "delta")
KERNELS = ("auto", "torch", "triton")
TRITON_FAILURES: dict[str, str] = {}  # "chunk" -> why the Triton kernels failed here (then torch runs)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context with autocast disabled for ``device``'s type (a no-op where autocast does not exist).

    The gated-delta-rule kernels convert their inputs to the compute dtype themselves; under
    autocast their matmuls would run in bf16/fp16 and mix dtypes with the float32 state.
    """
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def compute_dtype_for(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in float32)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + eps)`` in the dtype of ``x`` (callers pass float32/float64)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def validate_gdr_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    *,
    host_check: bool = True,
) -> tuple[int, tuple[int, ...] | None]:
    """Check shapes of the gated-delta-rule arguments.

    Returns ``(n_seq, cu_host)``: the number of independent sequences (``B`` or ``len(cu) - 1``) and
    the host copy of ``cu_seqlens`` (``None`` without documents, and when ``host_check`` is false
    or under ``torch.compile``: then the offsets' values are not read on the host, only the
    shapes are checked). Raises ``TypeError`` / ``ValueError`` naming the argument.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor [B, T, heads, head_dim], got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B={B}, T={T}, HV, Dv], got {tuple(v.shape)}")
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(
            f"v has HV={HV} heads, which is not a multiple of the q/k heads H={H}; "
            "grouped value attention needs HV % H == 0"
        )
    for name, t in (("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T, HV):
            raise ValueError(
                f"{name} must have shape [B, T, HV] = {(B, T, HV)}, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    cu_host: tuple[int, ...] | None = None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                "cu_seqlens must be an int32 or int64 tensor [n_seq + 1], got "
                f"{cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D [n_seq + 1] with n_seq >= 1, got shape {tuple(cu_seqlens.shape)}"
            )
        n_seq = cu_seqlens.numel() - 1
        if host_check and not torch.compiler.is_compiling():
            from ..masks import validate_cu_seqlens

            cu_host = validate_cu_seqlens(cu_seqlens.to(torch.int32), "cu_seqlens", B * T)
    else:
        n_seq = B
    if initial_state is not None:
        Dv = v.shape[-1]
        if tuple(initial_state.shape) != (n_seq, HV, Dk, Dv):
            raise ValueError(
                f"initial_state must have shape [n_seq, HV, Dk, Dv] = {(n_seq, HV, Dk, Dv)} "
                f"(n_seq = {'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), "
                f"got {tuple(initial_state.shape)}"
            )
    return n_seq, cu_host


# ---------------------------------------------------------------------------------------------------
# Chunk layout for documents
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Schedule:
    """Where, in the chunk loop, state resets and read-outs happen (rows ``n = lane * HV + head``).

    ``*_off`` are host offsets (``len = n_steps + 1``) into the concatenated device index tensors;
    step ``s`` uses ``[off[s], off[s+1])``.
    """

    reset_off: tuple[int, ...]
    reset_rows: torch.Tensor  # [R * HV] state rows reset at their step
    reset_src: torch.Tensor  # [R * HV] rows of the flattened initial state ``[n_seq * HV]``
    end_off: tuple[int, ...]
    end_rows: torch.Tensor  # [E * HV] state rows read out after their step
    end_dst: torch.Tensor  # [E * HV] rows of the flattened final state


@dataclass(frozen=True)
class _VarlenPlan:
    """Chunk-aligned placement of documents on lanes (see module docstring)."""

    n_steps: int
    n_lanes: int
    src: torch.Tensor  # [S, L, C] int64 flat token index per slot; ``total`` for padding slots
    dst: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (step, lane, pos) per token, each [total]
    schedule: _Schedule
    empty: torch.Tensor | None  # [n_seq] bool, sequences of length 0 (their final state = initial)


_PLAN_CACHE: OrderedDict[tuple, _VarlenPlan] = OrderedDict()


def _lane_assignment(n_chunks: list[int]) -> tuple[int, list[tuple[int, int]]]:
    """Longest-processing-time packing of sequences onto lanes.

    Returns ``(n_lanes, [(lane, first_step) per sequence])`` (``(-1, -1)`` for empty sequences).
    The lane count is ``ceil(total / longest)``, so the loop length stays close to the longest
    document while the per-step batch grows with the number of documents.
    """
    total = sum(n_chunks)
    longest = max(n_chunks) if n_chunks else 0
    if total == 0:
        return 1, [(-1, -1)] * len(n_chunks)
    n_lanes = max(1, math.ceil(total / longest))
    heap = [(0, lane) for lane in range(n_lanes)]
    placement: list[tuple[int, int]] = [(-1, -1)] * len(n_chunks)
    for i in sorted(range(len(n_chunks)), key=lambda j: -n_chunks[j]):
        if n_chunks[i] == 0:
            continue
        load, lane = heapq.heappop(heap)
        placement[i] = (lane, load)
        heapq.heappush(heap, (load + n_chunks[i], lane))
    return n_lanes, placement


def _varlen_plan(cu_host: tuple[int, ...], chunk: int, n_heads: int, device: torch.device) -> _VarlenPlan:
    key = (cu_host, chunk, n_heads, str(device))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit
    lens = [b - a for a, b in itertools.pairwise(cu_host)]
    total = cu_host[-1]
    n_chunks = [-(-n // chunk) for n in lens]
    n_lanes, placement = _lane_assignment(n_chunks)
    n_steps = max([first + n for (_, first), n in zip(placement, n_chunks) if first >= 0] or [1])

    src = np.full((n_steps, n_lanes, chunk), total, dtype=np.int64)
    d_step = np.empty(total, dtype=np.int64)
    d_lane = np.empty(total, dtype=np.int64)
    d_pos = np.empty(total, dtype=np.int64)
    resets: list[list[int]] = [[] for _ in range(n_steps)]  # (lane, seq) pairs per step, flattened
    ends: list[list[int]] = [[] for _ in range(n_steps)]
    for i, ((lane, first), n) in enumerate(zip(placement, lens)):
        if n == 0:
            continue
        j = np.arange(n)
        step = first + j // chunk
        pos = j % chunk
        tok = cu_host[i] + j
        src[step, lane, pos] = tok
        d_step[tok], d_lane[tok], d_pos[tok] = step, lane, pos
        resets[first] += [lane, i]
        ends[first + n_chunks[i] - 1] += [lane, i]

    heads = np.arange(n_heads)

    def build(per_step: list[list[int]]) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
        off, rows, other = [0], [], []
        for pairs in per_step:
            arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
            rows.append((arr[:, :1] * n_heads + heads).reshape(-1))
            other.append((arr[:, 1:] * n_heads + heads).reshape(-1))
            off.append(off[-1] + arr.shape[0] * n_heads)
        r = torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, np.int64)).to(device)
        o = torch.from_numpy(np.concatenate(other) if other else np.zeros(0, np.int64)).to(device)
        return tuple(off), r, o

    r_off, r_rows, r_src = build(resets)
    e_off, e_rows, e_dst = build(ends)
    empty = [n == 0 for n in lens]
    plan = _VarlenPlan(
        n_steps=n_steps,
        n_lanes=n_lanes,
        src=torch.from_numpy(src).to(device),
        dst=tuple(torch.from_numpy(a).to(device) for a in (d_step, d_lane, d_pos)),  # type: ignore[arg-type]
        schedule=_Schedule(r_off, r_rows, r_src, e_off, e_rows, e_dst),
        empty=torch.tensor(empty, device=device) if any(empty) else None,
    )
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > 32:
        _PLAN_CACHE.popitem(last=False)
    return plan


# ---------------------------------------------------------------------------------------------------
# The sequential part
# ---------------------------------------------------------------------------------------------------


def _apply_resets(cur: torch.Tensor, h0: torch.Tensor | None, schedule: _Schedule, s: int) -> None:
    """Reset the state rows of the documents that begin at step ``s`` (``cur [N, Dk, Dv]``, in place)."""
    a, b = schedule.reset_off[s], schedule.reset_off[s + 1]
    if b > a:
        rows = schedule.reset_rows[a:b]
        if h0 is None:
            cur.index_fill_(0, rows, 0.0)
        else:
            cur.index_copy_(0, rows, h0.index_select(0, schedule.reset_src[a:b]))


def _read_out(final: torch.Tensor, nxt: torch.Tensor, schedule: _Schedule, s: int) -> None:
    """Copy the state rows of the documents that end at step ``s`` into ``final`` (in place)."""
    a, b = schedule.end_off[s], schedule.end_off[s + 1]
    if b > a:
        final.index_copy_(0, schedule.end_dst[a:b], nxt.index_select(0, schedule.end_rows[a:b]))


def _init_states(
    like: torch.Tensor, S: int, h0: torch.Tensor | None, schedule: _Schedule | None, n_final: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s_in [S, N, Dk, Dv], last [N, Dk, Dv], final)`` buffers; ``s_in[0]`` initialised."""
    N, Dk, Dv = like.shape
    s_in = like.new_empty(S, N, Dk, Dv)
    last = like.new_empty(N, Dk, Dv)
    final = last if schedule is None else like.new_zeros(n_final, Dk, Dv)
    if schedule is None and h0 is not None:
        s_in[0].copy_(h0)
    else:
        s_in[0].zero_()
    return s_in, last, final


class _StateRecurrence(torch.autograd.Function):
    """``S_{s+1} = M_s S_s + Bc_s`` over chunks ``s`` — the whole sequential part, one kernel a chunk.

    Inputs (``N`` = lanes x value heads): ``m [S, N, Dk, Dk]``, ``bc [S, N, Dk, Dv]``, ``h0``
    (``[N, Dk, Dv]`` when ``schedule`` is None — every lane is one sequence that starts at step 0 —
    else ``[n_seq * HV, Dk, Dv]``) or None (zeros), ``n_final`` rows.
    Outputs: ``s_in [S, N, Dk, Dv]`` (the state each chunk starts from, after any reset) and
    ``final [n_final, Dk, Dv]`` (the state after each sequence's last chunk).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        m: torch.Tensor,
        bc: torch.Tensor,
        h0: torch.Tensor | None,
        schedule: _Schedule | None,
        n_final: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_off(bc.device):
            S = bc.shape[0]
            s_in, last, final = _init_states(bc[0], S, h0, schedule, n_final)
            m_l, b_l, s_l = m.unbind(0), bc.unbind(0), s_in.unbind(0)
            for s in range(S):
                cur = s_l[s]
                if schedule is not None:
                    _apply_resets(cur, h0, schedule, s)
                nxt = s_l[s + 1] if s + 1 < S else last
                torch.baddbmm(b_l[s], m_l[s], cur, out=nxt)  # S' = M S + Bc
                if schedule is not None:
                    _read_out(final, nxt, schedule, s)
        ctx.save_for_backward(m, s_in)
        ctx.schedule = schedule
        ctx.h0_shape = None if h0 is None else h0.shape
        return s_in, final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, ds_in: torch.Tensor | None, dfinal: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        m, s_in = ctx.saved_tensors
        schedule: _Schedule | None = ctx.schedule
        with autocast_off(s_in.device):
            S, N, Dk, Dv = s_in.shape
            if ds_in is None:
                ds_in = torch.zeros_like(s_in)
            gout = torch.empty_like(s_in)  # gout[s]: gradient of the state after step s (= dBc_s)
            g0 = s_in.new_empty(N, Dk, Dv)  # gradient of s_in[0]
            want_h0 = ctx.h0_shape is not None and ctx.needs_input_grad[2]
            dh0 = None
            if schedule is None and dfinal is not None:
                gout[S - 1].copy_(dfinal)
            else:
                gout[S - 1].zero_()
            if schedule is not None and want_h0:
                dh0 = s_in.new_zeros(ctx.h0_shape)
            g_l, dsi_l = gout.unbind(0), ds_in.unbind(0)
            mt_l = m.transpose(-1, -2).unbind(0)
            for s in range(S - 1, -1, -1):
                gs = g_l[s]
                if schedule is not None and dfinal is not None:
                    a, b = schedule.end_off[s], schedule.end_off[s + 1]
                    if b > a:
                        gs.index_add_(
                            0, schedule.end_rows[a:b], dfinal.index_select(0, schedule.end_dst[a:b])
                        )
                target = g_l[s - 1] if s > 0 else g0
                torch.baddbmm(dsi_l[s], mt_l[s], gs, out=target)  # dS = dS_ext + M^T dS'
                if schedule is not None:
                    a, b = schedule.reset_off[s], schedule.reset_off[s + 1]
                    if b > a:
                        rows = schedule.reset_rows[a:b]
                        if dh0 is not None:
                            dh0.index_add_(0, schedule.reset_src[a:b], target.index_select(0, rows))
                        target.index_fill_(0, rows, 0.0)
            if schedule is None and want_h0:
                dh0 = g0
            dm = torch.matmul(gout, s_in.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        return dm, gout, dh0, None, None


class _StateScan(torch.autograd.Function):
    """``scan="delta"``: ``Vn_s = U_s - W_s S_s``; ``S_{s+1} = d_s S_s + Kd_s^T Vn_s`` over chunks.

    Inputs (``N`` = lanes x value heads): ``u [S, N, C, Dv]``, ``w, kd [S, N, C, Dk]``,
    ``decay [S, N]``, ``h0`` and ``n_final`` as in :class:`_StateRecurrence`.
    Outputs: ``vn [S, N, C, Dv]``, ``s_in [S, N, Dk, Dv]`` and ``final [n_final, Dk, Dv]``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: torch.Tensor,
        w: torch.Tensor,
        kd: torch.Tensor,
        decay: torch.Tensor,
        h0: torch.Tensor | None,
        schedule: _Schedule | None,
        n_final: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast_off(u.device):
            S, N, _C, Dv = u.shape
            Dk = w.shape[-1]
            vn = torch.empty_like(u)
            s_in, last, final = _init_states(u.new_empty(N, Dk, Dv), S, h0, schedule, n_final)
            u_l, w_l, vn_l, s_l = u.unbind(0), w.unbind(0), vn.unbind(0), s_in.unbind(0)
            kdt_l = kd.transpose(-1, -2).unbind(0)  # [N, Dk, C] views
            d_l = decay[:, :, None, None].unbind(0)
            for s in range(S):
                cur = s_l[s]
                if schedule is not None:
                    _apply_resets(cur, h0, schedule, s)
                torch.baddbmm(u_l[s], w_l[s], cur, alpha=-1.0, out=vn_l[s])  # Vn = U - W S
                nxt = s_l[s + 1] if s + 1 < S else last
                torch.mul(cur, d_l[s], out=nxt)
                nxt.baddbmm_(kdt_l[s], vn_l[s])  # S' = d S + Kd^T Vn
                if schedule is not None:
                    _read_out(final, nxt, schedule, s)
        ctx.save_for_backward(w, kd, decay, vn, s_in)
        ctx.schedule = schedule
        ctx.h0_shape = None if h0 is None else h0.shape
        return vn, s_in, final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dvn: torch.Tensor | None, ds_in: torch.Tensor | None, dfinal: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        w, kd, decay, vn, s_in = ctx.saved_tensors
        schedule: _Schedule | None = ctx.schedule
        with autocast_off(vn.device):
            S, N, _C, Dv = vn.shape
            Dk = w.shape[-1]
            if dvn is None:
                dvn = torch.zeros_like(vn)
            if ds_in is None:
                ds_in = torch.zeros_like(s_in)
            t = torch.empty_like(vn)  # total gradient of Vn per chunk (= dU)
            ds_out = torch.empty_like(s_in)  # gradient of the state after each chunk
            ds0 = torch.empty(N, Dk, Dv, dtype=vn.dtype, device=vn.device)
            want_h0 = ctx.h0_shape is not None and ctx.needs_input_grad[4]
            dh0 = None
            if schedule is None and dfinal is not None:
                ds_out[S - 1].copy_(dfinal)
            else:
                ds_out[S - 1].zero_()
            if schedule is not None and want_h0:
                dh0 = vn.new_zeros(ctx.h0_shape)
            dvn_l, t_l, dso_l, dsi_l = dvn.unbind(0), t.unbind(0), ds_out.unbind(0), ds_in.unbind(0)
            kd_l, wt_l = kd.unbind(0), w.transpose(-1, -2).unbind(0)
            d_l = decay[:, :, None, None].unbind(0)
            for s in range(S - 1, -1, -1):
                dso = dso_l[s]
                if schedule is not None and dfinal is not None:
                    a, b = schedule.end_off[s], schedule.end_off[s + 1]
                    if b > a:
                        dso.index_add_(
                            0, schedule.end_rows[a:b], dfinal.index_select(0, schedule.end_dst[a:b])
                        )
                torch.baddbmm(dvn_l[s], kd_l[s], dso, out=t_l[s])  # dVn = dVn_ext + Kd dS'
                target = dso_l[s - 1] if s > 0 else ds0
                torch.addcmul(dsi_l[s], dso, d_l[s], out=target)  # dS = dS_ext + d dS' - W^T dVn
                target.baddbmm_(wt_l[s], t_l[s], alpha=-1.0)
                if schedule is not None:
                    a, b = schedule.reset_off[s], schedule.reset_off[s + 1]
                    if b > a:
                        rows = schedule.reset_rows[a:b]
                        if dh0 is not None:
                            dh0.index_add_(0, schedule.reset_src[a:b], target.index_select(0, rows))
                        target.index_fill_(0, rows, 0.0)
            if schedule is None and want_h0:
                dh0 = ds0
            dw = torch.matmul(t, s_in.transpose(-1, -2)).neg_()  # [S, N, C, Dk]
            dkd = torch.matmul(vn, ds_out.transpose(-1, -2))  # [S, N, C, Dk]
            ddecay = (s_in * ds_out).sum((-1, -2))  # [S, N]
        return t, dw, dkd, ddecay, dh0, None, None


# ---------------------------------------------------------------------------------------------------
# Intra-chunk part
# ---------------------------------------------------------------------------------------------------


def _unit_lower_inverse_doubling(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^-1`` for strictly-lower ``a [..., C, C]`` with batched matmuls only.

    Bottom-up: ``x`` holds the inverses of the diagonal blocks of size ``h`` (``[..., C/h, h, h]``,
    starting from ones at ``h = 1``); neighbouring pairs become blocks of size ``2h``,
    ``[[X1, 0], [-X2 A21 X1, X2]]``. ``log2(C)`` levels (``C`` padded to a power of two with zeros).
    """
    C = a.shape[-1]
    P = 1 << max(0, (C - 1).bit_length())
    if P != C:
        a = F.pad(a, (0, P - C, 0, P - C))
    lead = a.shape[:-2]
    x = a.new_ones(*lead, P, 1, 1)
    h = 1
    while h < P:
        n = P // (2 * h)
        # the diagonal blocks of size 2h, then their lower-left h x h quarter      [..., n, h, h]
        diag = torch.diagonal(a.reshape(*lead, n, 2 * h, n, 2 * h), dim1=-4, dim2=-2)  # [..., 2h, 2h, n]
        a21 = diag[..., h:, :h, :].movedim(-1, -3)
        pairs = x.view(*lead, n, 2, h, h)
        x1, x2 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        x21 = torch.matmul(x2, torch.matmul(a21, x1)).neg()
        top = torch.cat([x1, torch.zeros_like(x1)], -1)
        bottom = torch.cat([x21, x2], -1)
        x = torch.cat([top, bottom], -2)  # [..., n, 2h, 2h]
        h *= 2
    x = x.reshape(*lead, P, P)
    return x if P == C else x[..., :C, :C]


def _unit_lower_inverse_blocked(a: torch.Tensor, leaf: int = 16) -> torch.Tensor:
    """``(I + a)^-1`` top-down: 2x2 block inversion, diagonal leaves of ``leaf`` by a triangular solve."""
    C = a.shape[-1]
    if leaf >= C:
        eye = torch.eye(C, dtype=a.dtype, device=a.device).expand(a.shape)
        return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
    h = C // 2
    x1 = _unit_lower_inverse_blocked(a[..., :h, :h], leaf)
    x2 = _unit_lower_inverse_blocked(a[..., h:, h:], leaf)
    x21 = -torch.matmul(x2, torch.matmul(a[..., h:, :h], x1))
    top = torch.cat([x1, x1.new_zeros(*x1.shape[:-1], C - h)], -1)
    bottom = torch.cat([x21, x2], -1)
    return torch.cat([top, bottom], -2)


def _solve_wu(
    a: torch.Tensor, rk: torch.Tensor, rv: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = (I + a)^-1 rk``, ``U = (I + a)^-1 rv`` for strictly-lower ``a [..., C, C]``.

    ``"solve"``: one batched triangular solve on ``[rk, rv]``; ``"blocked"`` / ``"doubling"``: the
    explicit inverse (:func:`_unit_lower_inverse_blocked` / :func:`_unit_lower_inverse_doubling`),
    then two matmuls.
    """
    if method == "solve":
        wu = torch.linalg.solve_triangular(a, torch.cat([rk, rv], -1), upper=False, unitriangular=True)
        return wu.split([rk.shape[-1], rv.shape[-1]], -1)  # type: ignore[return-value]
    inv = _unit_lower_inverse_doubling(a) if method == "doubling" else _unit_lower_inverse_blocked(a)
    return torch.matmul(inv, rk), torch.matmul(inv, rv)


def _chunk_core(
    qc: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    gc: torch.Tensor,
    bc: torch.Tensor,
    scale: float,
    h0: torch.Tensor | None,
    schedule: _Schedule | None,
    n_final: int,
    solve: str,
    scan: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule on laid-out chunks.

    ``qc, kc [S, N, C, Dk]`` (normalised), ``vc [S, N, C, Dv]``, ``gc, bc [S, N, C]``; all in the
    compute dtype. Returns ``o [S, N, C, Dv]`` and ``final [n_final, Dk, Dv]``.
    """
    with autocast_off(qc.device):
        C = qc.shape[-2]
        G = gc.cumsum(-1)  # [S, N, C]
        incl = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
        # exp(G_i - G_j) for j <= i, 0 above the diagonal                          [S, N, C, C]
        gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~incl, -math.inf).exp()
        kt = kc.transpose(-1, -2)
        a = (torch.matmul(kc, kt) * gamma * bc[..., :, None]).tril(-1)  # [S, N, C, C]
        eg = G.exp()
        w, u = _solve_wu(a, kc * (bc * eg)[..., None], vc * bc[..., None], solve)  # [S, N, C, Dk|Dv]
        g_last = G[..., -1:]
        kd = kc * (g_last - G).exp()[..., None]  # [S, N, C, Dk]
        decay = g_last.squeeze(-1).exp()  # [S, N]
        qs = qc * scale
        p = torch.matmul(qs, kt) * gamma  # [S, N, C, C], lower incl. diagonal
        if scan == "delta":
            vn, s_in, final = _StateScan.apply(u, w, kd, decay, h0, schedule, n_final)
            o = torch.matmul(qs * eg[..., None], s_in) + torch.matmul(p, vn)
            return o, final
        kdt = kd.transpose(-1, -2)
        m = torch.matmul(kdt, w).neg()  # [S, N, Dk, Dk]: M = d I - Kd^T W
        m.diagonal(dim1=-2, dim2=-1).add_(decay[..., None])
        s_in, final = _StateRecurrence.apply(m, torch.matmul(kdt, u), h0, schedule, n_final)
        qt = qs * eg[..., None] - torch.matmul(p, w)  # [S, N, C, Dk]
        o = torch.matmul(qt, s_in) + torch.matmul(p, u)  # [S, N, C, Dv]
        return o, final


class _ChunkKernel(torch.autograd.Function):
    """:func:`_chunk_core` as one autograd node whose backward runs with autocast off.

    The forward records the chunk computation on an inner graph (detached leaves); the backward
    differentiates that graph with ``torch.autograd.grad`` inside :func:`autocast_off`, so an
    enclosing ``torch.autocast`` (which on CPU also applies to backward ops run on the calling
    thread) cannot change the backward's matmul dtypes either. With ``recompute`` only the inputs
    are kept and the inner graph is rebuilt in the backward (activation checkpointing).
    Arguments as :func:`_chunk_core`, plus ``recompute``; returns ``(o, final)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        qc: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        gc: torch.Tensor,
        bc: torch.Tensor,
        h0: torch.Tensor | None,
        scale: float,
        schedule: _Schedule | None,
        n_final: int,
        solve: str,
        scan: str,
        recompute: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.args = (scale, schedule, n_final, solve, scan)
        ctx.recompute = recompute
        ctx.has_h0 = h0 is not None
        inputs = (qc, kc, vc, gc, bc) + ((h0,) if h0 is not None else ())
        if recompute:
            ctx.save_for_backward(*inputs)
            with autocast_off(qc.device):
                return _chunk_core(qc, kc, vc, gc, bc, scale, h0, schedule, n_final, solve, scan)
        leaves, o, final = _ChunkKernel._record(ctx, inputs)
        ctx.inner = (leaves, o, final)
        return o.detach(), final.detach()

    @staticmethod
    def _record(
        ctx: Any, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        leaves = [t.detach().requires_grad_(ctx.needs_input_grad[i]) for i, t in enumerate(inputs)]
        h0 = leaves[5] if ctx.has_h0 else None
        with torch.enable_grad(), autocast_off(inputs[0].device):
            o, final = _chunk_core(*leaves[:5], ctx.args[0], h0, *ctx.args[1:])
        return leaves, o, final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, do: torch.Tensor | None, dfinal: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.recompute:
            leaves, o, final = _ChunkKernel._record(ctx, tuple(ctx.saved_tensors))
        else:
            leaves, o, final = ctx.inner
            del ctx.inner
        pairs = [(t, d) for t, d in ((o, do), (final, dfinal)) if d is not None and t.requires_grad]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads: dict[int, torch.Tensor | None] = {}
        if pairs and wanted:
            with autocast_off(o.device):
                res = torch.autograd.grad(
                    [t for t, _ in pairs], wanted, [d for _, d in pairs], allow_unused=True
                )
            grads = {id(leaf): gr for leaf, gr in zip(wanted, res)}
        out = [grads.get(id(leaf)) for leaf in leaves]
        if not ctx.has_h0:
            out.append(None)
        return (*out, None, None, None, None, None, None)


def _run_core(
    qc: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    gc: torch.Tensor,
    bc: torch.Tensor,
    scale: float,
    h0: torch.Tensor | None,
    schedule: _Schedule | None,
    n_final: int,
    solve: str,
    scan: str,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_chunk_core` through :class:`_ChunkKernel` when a gradient is needed, else directly."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qc, kc, vc, gc, bc, h0)):
        return _ChunkKernel.apply(qc, kc, vc, gc, bc, h0, scale, schedule, n_final, solve, scan, recompute)
    return _chunk_core(qc, kc, vc, gc, bc, scale, h0, schedule, n_final, solve, scan)


# ---------------------------------------------------------------------------------------------------
# Layout: [B, T, H, D] rows <-> [S, N, C, D] chunks
# ---------------------------------------------------------------------------------------------------


def _lay_rows(x: torch.Tensor, C: int, rep: int, cdt: torch.dtype) -> torch.Tensor:
    """``[B, T, Hx, D]`` -> ``[S, B * Hx * rep, C, D]`` in ``cdt`` (one pass, zero tail padding).

    Value head ``j`` reads head ``j // rep`` (grouped value attention: q/k heads are broadcast, not
    repeated in memory first); ``S = ceil(T / C)``.
    """
    B, T, Hx, D = x.shape
    S = -(-T // C)
    full, rem = divmod(T, C)
    out = torch.empty(S, B, Hx, rep, C, D, dtype=cdt, device=x.device)
    dst = out.permute(1, 0, 4, 2, 3, 5)  # [B, S, C, Hx, rep, D] view of out
    if full:
        dst[:, :full].copy_(x[:, : full * C].reshape(B, full, C, Hx, 1, D))
    if rem:
        dst[:, full, rem:].zero_()
        dst[:, full, :rem].copy_(x[:, full * C :].reshape(B, rem, Hx, 1, D))
    return out.view(S, B * Hx * rep, C, D)


def _unlay_rows(o_c: torch.Tensor, B: int, T: int, HV: int, dtype: torch.dtype) -> torch.Tensor:
    """``[S, B * HV, C, Dv]`` -> ``[B, T, HV, Dv]`` in ``dtype`` (one pass; tail padding dropped)."""
    S, _N, C, Dv = o_c.shape
    full, rem = divmod(T, C)
    src = o_c.view(S, B, HV, C, Dv).permute(1, 0, 3, 2, 4)  # [B, S, C, HV, Dv]
    out = torch.empty(B, T, HV, Dv, dtype=dtype, device=o_c.device)
    if full:
        out[:, : full * C].view(B, full, C, HV, Dv).copy_(src[:, :full])
    if rem:
        out[:, full * C :].copy_(src[:, full, :rem])
    return out


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    solve: str = "auto",
    scan: str = "auto",
    recompute: bool = False,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunkwise (WY) form: the fused Triton kernels on CUDA, pure PyTorch elsewhere.

    Args:
        q, k: ``[B, T, H, Dk]``; ``v``: ``[B, T, HV, Dv]`` with ``HV % H == 0`` (value head ``j``
            reads q/k head ``j // (HV // H)``, grouped value attention).
        g: ``[B, T, HV]`` log-decay (``<= 0``); ``beta``: ``[B, T, HV]`` write strength, already
            post-sigmoid (``(0, 2)`` for negative eigenvalues).
        scale: read-out scale, default ``Dk ** -0.5``.
        initial_state: ``[n_seq, HV, Dk, Dv]`` (``n_seq = B``, or ``len(cu_seqlens) - 1``).
        output_final_state: also return the state after each sequence, ``[n_seq, HV, Dk, Dv]`` in
            the compute dtype (float32, float64 for float64 inputs).
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) in the compute dtype first.
        cu_seqlens: int32/int64 ``[n_seq + 1]`` offsets into the **flattened** ``B * T`` tokens
            (``[0, ..., B*T]``); the state restarts at every offset.
        chunk_size: tokens per chunk (64 like flash-linear-attention; any positive int). The
            sequential loop runs ``ceil(T / chunk_size)`` steps.
        solve: how ``(I + A)^-1`` is applied inside each chunk: ``"solve"`` (one batched triangular
            solve), ``"doubling"`` (explicit inverse from ``log2(C)`` levels of batched matmuls, no
            triangular solve), ``"blocked"`` (explicit inverse by top-down 2x2 block inversion with
            16x16 triangular-solve leaves) or ``"auto"`` (``"doubling"`` on CUDA, where batched
            small triangular solves are slow; ``"solve"`` elsewhere). Same numbers up to rounding.
        scan: the sequential part: ``"transition"`` (``S' = M S + Bc``: one batched matmul per
            chunk forward and backward), ``"delta"`` (the three-kernel form through ``Vn``) or
            ``"auto"`` (``"transition"``). Same numbers up to rounding.
        recompute: keep only the laid-out inputs for the backward pass and recompute the chunk
            intermediates there (activation checkpointing of the kernel: about one extra forward,
            a fraction of the memory). PyTorch kernel only.
        kernel: ``"triton"`` (:mod:`.triton_chunk`: fused Triton kernels, chunk 64, CUDA, or CPU
            under ``TRITON_INTERPRET=1``), ``"torch"`` (this module's PyTorch kernel; ``solve``,
            ``scan``, ``recompute`` and ``chunk_size`` apply to it only) or ``"auto"`` (``"triton"``
            on CUDA for float32/bf16/fp16 inputs with ``chunk_size=64`` and ``Dk <= 256`` where
            Triton imports and has not failed to build here, else ``"torch"``).

    Under ``torch.compile`` both kernels are opaque custom ops (``olmo_attn::gdn_chunk_*`` and
    ``olmo_attn::gdn_torch_*``): one node, no graph break, no recompile when the document offsets
    change; the offsets' values are then not checked on the host (their shape is).

    Autocast is disabled inside (the inputs are converted to float32 / float64 explicitly), so the
    results are the same with and without an enclosing ``torch.autocast``.

    Returns:
        ``o [B, T, HV, Dv]`` in the dtype of ``v`` and the final state or ``None``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    n_seq, cu_host = validate_gdr_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if isinstance(chunk_size, bool) or not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    compiling = torch.compiler.is_compiling()
    requested = kernel
    if kernel == "auto":
        kernel = "triton" if _triton_auto(q, v, g, beta, initial_state, chunk_size) else "torch"
    if kernel == "triton":
        from .triton_chunk import CHUNK, triton_chunk_gated_delta_rule, triton_chunk_usable

        ok, why = triton_chunk_usable(q, v)
        if ok and chunk_size != CHUNK:
            ok, why = False, f"the Triton kernels use chunk_size={CHUNK}, got chunk_size={chunk_size}"
        if not ok:
            from ..exceptions import UnsupportedFeatureError

            raise UnsupportedFeatureError(
                f"kernel='triton' cannot run here: {why}; use kernel='torch' or 'auto'"
            )
        call = functools.partial(
            triton_chunk_gated_delta_rule, q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        if compiling:
            return call()
        try:
            return call()
        except Exception as e:  # cannot build or launch here: remember, run the PyTorch kernel
            if requested == "triton":
                raise
            TRITON_FAILURES["chunk"] = f"{type(e).__name__}: {e}"
    if compiling:
        return _compiled_torch_path(
            q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, chunk_size
        )
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {', '.join(map(repr, SOLVES))}, got {solve!r}")
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {', '.join(map(repr, SCANS))}, got {scan!r}")
    if solve == "auto":
        solve = "doubling" if q.device.type == "cuda" else "solve"
    if scan == "auto":
        scan = "transition"
    with autocast_off(q.device):
        return _chunk_gdr(
            q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
            n_seq, cu_host, chunk_size, solve, scan, recompute,
        )  # fmt: skip


def _chunk_gdr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    n_seq: int,
    cu_host: tuple[int, ...] | None,
    C: int,
    solve: str,
    scan: str,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_gated_delta_rule` after validation (autocast off)."""
    B, T, H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    cdt = compute_dtype_for(q, k, v, g, beta, initial_state)
    if scale is None:
        scale = Dk**-0.5
    dev = q.device
    h0 = None if initial_state is None else initial_state.to(cdt).reshape(n_seq * HV, Dk, Dv)

    if B * T == 0:
        o = v.new_zeros(B, T, HV, Dv)
        fin = h0.reshape(n_seq, HV, Dk, Dv) if h0 is not None else v.new_zeros(n_seq, HV, Dk, Dv, dtype=cdt)
        return o, (fin if output_final_state else None)

    rep = HV // H
    if cu_host is None:
        # Uniform rows: lanes = batch rows, the tail of each row padded to a multiple of C.
        qc, kc = _lay_rows(q, C, rep, cdt), _lay_rows(k, C, rep, cdt)  # [S, B*HV, C, Dk]
        if use_qk_l2norm:
            qc, kc = l2norm(qc), l2norm(kc)
        o_c, final = _run_core(
            qc,
            kc,
            _lay_rows(v, C, 1, cdt),
            _lay_rows(g[..., None], C, 1, cdt).squeeze(-1),
            _lay_rows(beta[..., None], C, 1, cdt).squeeze(-1),
            scale,
            h0,
            None,
            B * HV,
            solve,
            scan,
            recompute,
        )
        o = _unlay_rows(o_c, B, T, HV, v.dtype)
    else:
        plan = _varlen_plan(cu_host, C, HV, dev)
        S, L = plan.n_steps, plan.n_lanes
        total = B * T
        src = plan.src.view(S, L, 1, C)
        hv_idx = torch.arange(HV, device=dev).view(1, 1, HV, 1)
        hk_idx = hv_idx // rep

        def gather(x: torch.Tensor, hidx: torch.Tensor) -> torch.Tensor:
            # [total, Hx, ...] -> [S, L*HV, C, ...] in cdt, zero padding slots
            x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
            y = x[src, hidx]  # [S, L, HV, C, ...]
            return y.reshape(S, L * HV, C, *x.shape[2:]).to(cdt)

        qc, kc = gather(q.reshape(total, H, Dk), hk_idx), gather(k.reshape(total, H, Dk), hk_idx)
        if use_qk_l2norm:
            qc, kc = l2norm(qc), l2norm(kc)
        o_c, final = _run_core(
            qc,
            kc,
            gather(v.reshape(total, HV, Dv), hv_idx),
            gather(g.reshape(total, HV), hv_idx),
            gather(beta.reshape(total, HV), hv_idx),
            scale,
            h0,
            plan.schedule,
            n_seq * HV,
            solve,
            scan,
            recompute,
        )
        s_idx, l_idx, c_idx = plan.dst
        o = o_c.view(S, L, HV, C, Dv)[s_idx, l_idx, :, c_idx]  # [total, HV, Dv]
        o = o.reshape(B, T, HV, Dv).to(v.dtype)
        if plan.empty is not None:
            # sequences of length 0 keep their initial state (zero without one)
            keep = plan.empty.repeat_interleave(HV)[:, None, None]
            final = torch.where(keep, h0 if h0 is not None else torch.zeros_like(final), final)
    if not output_final_state:
        return o, None
    return o, final.reshape(n_seq, HV, Dk, Dv)


# ---------------------------------------------------------------------------------------------------
# Dispatch helpers; the PyTorch kernel as an opaque custom op under torch.compile
# ---------------------------------------------------------------------------------------------------


def _triton_auto(
    q: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> bool:
    """Whether ``kernel="auto"`` picks the Triton kernels for these inputs."""
    if q.device.type != "cuda" or chunk_size != 64 or "chunk" in TRITON_FAILURES:
        return False
    if compute_dtype_for(q, v, g, beta, initial_state) != torch.float32:
        return False
    from .triton_chunk import triton_chunk_usable

    return triton_chunk_usable(q, v)[0]


def _torch_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor | None,
    scale: float,
    use_l2: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    o, fin = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True, use_qk_l2norm=use_l2,
        cu_seqlens=cu if cu is not None and cu.numel() else None, chunk_size=chunk, kernel="torch",
    )  # fmt: skip
    assert fin is not None
    return o, fin


@contextlib.contextmanager
def _autograd_on() -> Any:
    """Record autograd inside a custom op's implementation (which may run with the autograd
    dispatch keys excluded, as in a compiled backward): the PyTorch kernel's backward recomputes
    its forward and differentiates it."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    for name in ("ADInplaceOrView", "AutogradFunctionality", "AutogradOther", "AutogradCPU", "AutogradCUDA"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            ex = ex.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), ex), torch.enable_grad():
        yield


@torch.library.custom_op("olmo_attn::gdn_torch_fwd", mutates_args=())
def _torch_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor,
    scale: float,
    use_l2: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch kernel, forward only (``cu`` empty: no documents): ``(o, final)``."""
    with torch.no_grad():
        return _torch_call(q, k, v, g, beta, h0, cu, scale, use_l2, chunk)


@_torch_fwd_op.register_fake
def _torch_fwd_fake(q, k, v, g, beta, h0, cu, scale, use_l2, chunk):  # type: ignore[no-untyped-def]
    B, T, _, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    n_seq = cu.shape[0] - 1 if cu.numel() else B
    cdt = compute_dtype_for(q, k, v, g, beta, h0)
    return v.new_empty(B, T, HV, Dv), v.new_empty(n_seq, HV, Dk, Dv, dtype=cdt)


@torch.library.custom_op("olmo_attn::gdn_torch_bwd", mutates_args=())
def _torch_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor,
    do: torch.Tensor,
    dfin: torch.Tensor,
    scale: float,
    use_l2: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward by recomputation: ``(dq, dk, dv, dg, dbeta, d_initial_state)`` (the last empty
    without an initial state)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
    h0l = None if h0 is None else h0.detach().requires_grad_()
    with _autograd_on():
        o, fin = _torch_call(*leaves, h0l, cu, scale, use_l2, chunk)
        wanted = leaves + ([h0l] if h0l is not None else [])
        grads = torch.autograd.grad([o, fin], wanted, [do, dfin], allow_unused=True)
    out = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(wanted, grads)]
    if h0l is None:
        out.append(q.new_empty(0))
    return tuple(out)  # type: ignore[return-value]


@_torch_bwd_op.register_fake
def _torch_bwd_fake(q, k, v, g, beta, h0, cu, do, dfin, scale, use_l2, chunk):  # type: ignore[no-untyped-def]
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)  # fmt: skip


class _TorchOpFn(torch.autograd.Function):
    """The PyTorch kernel through the two custom ops (what ``torch.compile`` sees)."""

    @staticmethod
    def forward(ctx: Any, q, k, v, g, beta, h0, cu, scale, use_l2, chunk):  # type: ignore[no-untyped-def, override]
        o, fin = torch.ops.olmo_attn.gdn_torch_fwd(q, k, v, g, beta, h0, cu, scale, use_l2, chunk)
        ctx.save_for_backward(q, k, v, g, beta, h0, cu)
        ctx.args = (scale, use_l2, chunk)
        return o, fin

    @staticmethod
    def backward(ctx: Any, do, dfin):  # type: ignore[no-untyped-def, override]
        q, k, v, g, beta, h0, cu = ctx.saved_tensors
        dq, dk, dv, dg, db, dh0 = torch.ops.olmo_attn.gdn_torch_bwd(
            q, k, v, g, beta, h0, cu, do, dfin, *ctx.args
        )
        return dq, dk, dv, dg, db, (dh0 if h0 is not None else None), None, None, None, None


def _compiled_torch_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch kernel as one opaque node under ``torch.compile`` (host planning stays inside)."""
    cu = cu_seqlens if cu_seqlens is not None else q.new_empty(0, dtype=torch.int32)
    s = float(q.shape[-1] ** -0.5 if scale is None else scale)
    o, fin = _TorchOpFn.apply(q, k, v, g, beta, initial_state, cu, s, bool(use_qk_l2norm), chunk_size)
    return o, (fin if output_final_state else None)
