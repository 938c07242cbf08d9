"""Mask machinery: per-token index vectors and a per-tile classification, never an O(T²) mask.

Every mask this library needs (causal, window, documents with shared or separate query/key
segmentations, KV-cache key validity) is the AND of a few comparisons between small integer vectors
(semantics: ``docs/CONVENTIONS.md``):

* ``q_coord [Bq, Tq]``: for query ``i``, the key index of its aligned diagonal. Bottom-right
  alignment inside segment ``s`` with ``Lq`` queries and ``Lk`` keys gives
  ``q_coord[i] = cu_k[s + 1] - (cu_q[s + 1] - i)`` (a dense ``[Tq, Tk]`` problem is one segment, so
  ``q_coord[i] = i + Tk - Tq``; a KV cache puts new query ``t`` at ``cache_seqlens + t``).
* ``q_seg [Bq, Tq]`` / ``k_seg [Bk, Tk]``: segment ids; ``-1`` means "in no segment" (queries) or
  "invalid" (keys: outside every segment, left padding, unused cache slots).

``allowed(b, i, j) = q_seg == k_seg >= 0`` AND ``j <= q_coord`` (causal) AND
``q_coord - left <= j <= q_coord + right`` (window sides that are not ``-1``). Keys are compared in
their own (flattened) index, so no per-segment local coordinates are needed.

:func:`classify_blocks` reduces the vectors to per-block minima/maxima and labels each
``(q-block, k-block)`` tile as empty, full or partial: ``O((T / block)²)`` small integers. It runs
as tensor ops on the vectors' device (no host sync), so the same code feeds FlexAttention's
``BlockMask`` on CUDA and the loop plan of the blockwise kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernel import KernelCall

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class MaskIndex:
    """Integer description of one attention mask (module docstring for the rule).

    Attributes:
        q_coord: ``[Bq, Tq]`` int64, aligned-diagonal key index of every query (``Bq`` is 1 or B).
        q_seg: ``[Bq, Tq]`` int64 segment id of every query (-1: sees nothing).
        k_seg: ``[Bk, Tk]`` int64 segment id of every key (-1: never visible).
        causal: keys after the aligned diagonal are hidden.
        window: inclusive ``(left, right)`` around the aligned diagonal, ``-1`` = unbounded.
    """

    q_coord: torch.Tensor
    q_seg: torch.Tensor
    k_seg: torch.Tensor
    causal: bool
    window: tuple[int, int]

    @property
    def tq(self) -> int:
        return self.q_coord.shape[1]

    @property
    def tk(self) -> int:
        return self.k_seg.shape[1]

    @property
    def batch(self) -> int:
        """Batch extent of the mask (1 when every batch row has the same mask)."""
        return max(self.q_coord.shape[0], self.k_seg.shape[0])

    @property
    def device(self) -> torch.device:
        return self.q_coord.device

    def element_mask(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """``allowed`` for queries ``[q0, q1)`` and keys ``[k0, k1)`` -> bool ``[batch, q1-q0, k1-k0]``."""
        qs = self.q_seg[:, q0:q1, None]
        qc = self.q_coord[:, q0:q1, None]
        ks = self.k_seg[:, None, k0:k1]
        kj = torch.arange(k0, k1, device=qc.device)[None, None, :]
        m = (qs == ks) & (qs >= 0)
        left, right = self.window
        if self.causal:
            m = m & (kj <= qc)
        if left >= 0:
            m = m & (kj >= qc - left)
        if right >= 0:
            m = m & (kj <= qc + right)
        return m

    def dense(self) -> torch.Tensor:
        """The full ``[batch, Tq, Tk]`` mask. O(T²): for tests and tiny problems only."""
        return self.element_mask(0, self.tq, 0, self.tk)


def _segments(cu: torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id (``-1`` past ``cu[-1]``) and the segment's end offset ``cu[s + 1]`` per position."""
    cu = cu.to(device=device, dtype=torch.int64)
    pos = torch.arange(n, device=device)
    seg = torch.searchsorted(cu, pos, right=True) - 1  # [n], in [0, n_seg] for pos >= 0
    n_seg = cu.numel() - 1
    inside = (pos < cu[-1]) & (seg < n_seg)
    seg = torch.where(inside, seg, torch.full_like(seg, -1))
    end = cu[(seg + 1).clamp(0, n_seg)]
    return seg, end


def build_mask_index(
    call: KernelCall,
    *,
    tq: int,
    tk: int,
    device: torch.device | str,
    q_start: int | torch.Tensor | None = None,
    key_lo: torch.Tensor | None = None,
    key_hi: int | torch.Tensor | None = None,
) -> MaskIndex:
    """Index vectors for ``call`` on a ``[Tq, Tk]`` problem (``Tq``/``Tk`` are totals when varlen).

    Args:
        call: causal / window / ``cu_seqlens_q/_k`` (varlen: segments of the flattened tokens).
        tq, tk: number of queries / keys (per batch row; flattened totals for varlen).
        device: where the vectors live (the tensors' device).
        q_start: dense only; cache index of the first query (KV cache: ``cache_seqlens``), replacing
            the default bottom-right offset ``Tk - Tq``. An int or a 0-dim tensor (no host sync).
        key_lo: ``[B]`` first valid key per batch row (KV cache: ``cache_leftpad``).
        key_hi: keys ``>= key_hi`` are invalid (KV cache: ``cache_seqlens + T_new``); int or 0-dim.
    """
    device = torch.device(device)
    left, right = (int(w) for w in call.window)
    if call.varlen:
        cu_q = call.cu_seqlens_q
        cu_k = call.cu_seqlens_k if call.cu_seqlens_k is not None else cu_q
        assert cu_q is not None and cu_k is not None
        if cu_q.numel() != cu_k.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}; "
                "both must describe the same segments"
            )
        q_seg, q_end = _segments(cu_q, tq, device)
        k_seg, _ = _segments(cu_k, tk, device)
        cu_k64 = cu_k.to(device=device, dtype=torch.int64)
        k_end = cu_k64[(q_seg + 1).clamp(0, cu_k64.numel() - 1)]
        q_coord = torch.arange(tq, device=device) + (k_end - q_end)  # bottom-right per segment
        q_coord, q_seg, k_seg = q_coord[None], q_seg[None], k_seg[None]
    else:
        pos = torch.arange(tq, device=device)
        if q_start is None:
            q_coord = pos + (tk - tq)
        elif isinstance(q_start, torch.Tensor):
            q_coord = pos + q_start.to(device=device, dtype=torch.int64)
        else:
            q_coord = pos + int(q_start)
        q_coord = q_coord[None]
        q_seg = torch.zeros(1, tq, dtype=torch.int64, device=device)
        k_seg = torch.zeros(1, tk, dtype=torch.int64, device=device)
    if key_lo is not None or key_hi is not None:
        j = torch.arange(tk, device=device)[None]
        valid = torch.ones(1, tk, dtype=torch.bool, device=device)
        if key_lo is not None:
            valid = valid & (j >= key_lo.to(device=device, dtype=torch.int64)[:, None])
        if key_hi is not None:
            hi = key_hi.to(device=device, dtype=torch.int64) if isinstance(key_hi, torch.Tensor) else key_hi
            valid = valid & (j < hi)
        k_seg = torch.where(valid, k_seg, torch.full_like(k_seg, -1))
    return MaskIndex(
        q_coord=q_coord, q_seg=q_seg, k_seg=k_seg, causal=bool(call.causal), window=(left, right)
    )


def _block_min_max(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max of ``x [B, T]`` -> two ``[B, ceil(T / block)]`` (edge-padded tail)."""
    b, t = x.shape
    n = -(-t // block)
    pad = n * block - t
    if pad:
        x = torch.cat([x, x[:, -1:].expand(b, pad)], dim=1)
    x = x.view(b, n, block)
    return x.amin(dim=-1), x.amax(dim=-1)


def classify_blocks(index: MaskIndex, block_q: int, block_k: int) -> torch.Tensor:
    """Label every tile ``(q-block, k-block)`` as :data:`EMPTY`, :data:`PARTIAL` or :data:`FULL`.

    Returns ``int8 [batch, ceil(Tq / block_q), ceil(Tk / block_k)]`` on the index's device. Exact
    for causal/window masks inside one segment; conservative (``PARTIAL`` instead of ``EMPTY`` or
    ``FULL``) only where a tile straddles segment boundaries or invalid keys, which the element mask
    then resolves. Cost: O(T) to reduce plus O((T / block)²) comparisons.
    """
    device = index.device
    nq, nk = -(-index.tq // block_q), -(-index.tk // block_k)
    if nq == 0 or nk == 0:
        return torch.zeros(index.batch, nq, nk, dtype=torch.int8, device=device)
    qc_min, qc_max = (t[:, :, None] for t in _block_min_max(index.q_coord, block_q))  # [Bq, nq, 1]
    qs_min, qs_max = (t[:, :, None] for t in _block_min_max(index.q_seg, block_q))
    ks_min, ks_max = (t[:, None, :] for t in _block_min_max(index.k_seg, block_k))  # [Bk, 1, nk]
    k_first = (torch.arange(nk, device=device) * block_k)[None, None, :]
    k_last = torch.clamp(k_first + block_k, max=index.tk) - 1

    empty = (qs_max < 0) | (ks_max < 0) | (qs_max < ks_min) | (qs_min > ks_max)
    full = (qs_min == qs_max) & (ks_min == ks_max) & (qs_min == ks_min) & (qs_min >= 0)
    left, right = index.window
    if index.causal:
        empty = empty | (k_first > qc_max)
        full = full & (k_last <= qc_min)
    if left >= 0:
        empty = empty | (k_last < qc_min - left)
        full = full & (k_first >= qc_max - left)
    if right >= 0:
        empty = empty | (k_first > qc_max + right)
        full = full & (k_last <= qc_min + right)
    cls = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)
    return cls.expand(index.batch, nq, nk)


def union_over_batch(cls: torch.Tensor) -> torch.Tensor:
    """One plan for all batch rows: ``[nq, nk]``, EMPTY/FULL only where every row agrees."""
    if cls.shape[0] == 1:
        return cls[0]
    all_empty = (cls == EMPTY).all(dim=0)
    all_full = (cls == FULL).all(dim=0)
    return torch.where(all_empty, EMPTY, torch.where(all_full, FULL, PARTIAL)).to(torch.int8)


def allowed_pairs(index: MaskIndex, block_q: int = 256, block_k: int = 256) -> torch.Tensor:
    """Number of allowed ``(query, key)`` pairs per batch row ``[batch]`` (FLOP counting), O(T·block)."""
    cls = classify_blocks(index, block_q, block_k)
    plan = union_over_batch(cls).tolist()
    total = torch.zeros(index.batch, dtype=torch.int64, device=index.device)
    for qb, row in enumerate(plan):
        q0, q1 = qb * block_q, min((qb + 1) * block_q, index.tq)
        for kb, c in enumerate(row):
            if c == EMPTY:
                continue
            k0, k1 = kb * block_k, min((kb + 1) * block_k, index.tk)
            if c == FULL:
                total += (q1 - q0) * (k1 - k0)
            else:
                total += index.element_mask(q0, q1, k0, k1).sum(dim=(1, 2))
    return total
