"""Pure-torch flash-style attention: online-softmax forward, explicit backward, bounded memory.

Runs on any device and dtype (half inputs compute in float32, float64 in float64). For every query
block it visits only the non-empty key tiles of :func:`~.masking.classify_blocks`, grouped into runs
of consecutive tiles of the same class (one matmul per run); the element mask is built only for
``PARTIAL`` runs. GQA folds the ``G = Hq / Hkv`` query heads of a kv head into the rows of one
matmul, so K/V are never repeated. Peak extra memory: ``O(B·Hq·block_q·max_run)`` for one score
tile plus ``O(T·H·D)`` accumulators — never ``O(T²)``.

Forward: ``out [B, Tq, Hq, D]`` (input dtype), ``lse [B, Hq, Tq]`` (float32; float64 for float64).
Backward (flash-attn's): ``P = exp(scale·q·kᵀ - lse)``, ``Δ = rowsum(dout ∘ out)``,
``dS = P ∘ (dout·vᵀ ∘ Z - Δ)``, ``dv = (P ∘ Z)ᵀ dout``, ``dq = scale·dS k``, ``dk = scale·dSᵀ q``
with ``Z = keep / (1 - p)`` (1 without dropout). Given merged ``out``/``lse`` (ring attention) it
returns this key block's exact share of the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .dropout import keep_tile
from .masking import EMPTY, FULL, PARTIAL, MaskIndex, classify_blocks, union_over_batch


@dataclass(frozen=True)
class BlockPlan:
    """Which key runs each query block visits: ``runs[qb] = [(k0, k1, partial), ...]``."""

    block_q: int
    runs: tuple[tuple[tuple[int, int, bool], ...], ...]

    @classmethod
    def build(cls, index: MaskIndex, block_q: int, block_k: int, max_run: int) -> BlockPlan:
        tile_cls = union_over_batch(classify_blocks(index, block_q, block_k)).tolist()  # host [nq][nk]
        max_tiles = max(1, max_run // block_k)
        runs: list[tuple[tuple[int, int, bool], ...]] = []
        for row in tile_cls:
            row_runs: list[tuple[int, int, bool]] = []
            start, kind, n = -1, EMPTY, 0
            for kb, c in enumerate([*row, EMPTY]):
                if start >= 0 and (c != kind or n == max_tiles):
                    row_runs.append((start * block_k, min(kb * block_k, index.tk), kind == PARTIAL))
                    start, n = -1, 0
                if c != EMPTY:
                    if start < 0:
                        start, kind = kb, c
                    n += 1
            runs.append(tuple(row_runs))
        return cls(block_q=block_q, runs=tuple(runs))


def _no_autocast(device: torch.device) -> Any:
    """The kernel picks its own precisions: autocast must not lower the accumulation matmuls."""
    return torch.autocast(device_type=device.type, enabled=False)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[B, T, H, D]`` -> contiguous ``[B, H, T, D]`` in the accumulation dtype."""
    return x.to(acc).permute(0, 2, 1, 3).contiguous()


def _dropout_z(
    seed: int,
    p: float,
    b: int,
    hq: int,
    hkv: int,
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``keep / (1 - p)`` for one tile, shaped like the folded scores ``[B, Hkv, G·bq, bk]``."""
    keep = keep_tile(
        seed,
        p,
        torch.arange(b, device=device),
        torch.arange(hq, device=device),
        torch.arange(q0, q1, device=device),
        torch.arange(k0, k1, device=device),
    )
    return (keep.to(dtype) / (1.0 - p)).reshape(b, hkv, (hq // hkv) * (q1 - q0), k1 - k0)


def _disallowed(index: MaskIndex, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
    """Where a tile's pairs are masked out: ``[Bm, 1, 1, bq, bk]`` bool (broadcasts over heads)."""
    return ~index.element_mask(q0, q1, k0, k1)[:, None, None]


def _masked(s: torch.Tensor, off: torch.Tensor, g: int, fill: float) -> torch.Tensor:
    """Fill the disallowed entries (``off``, :func:`_disallowed`) of the folded tile
    ``s [B, Hkv, G·bq, bk]`` with ``fill``."""
    b, hkv, rows, bk = s.shape
    return s.view(b, hkv, g, rows // g, bk).masked_fill(off, fill).view_as(s)


def _bad_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Rows of ``x [..., T, D]`` holding NaN/Inf (``[..., T]`` bool), or ``None`` when every value
    is finite or ``x`` is not on the CPU (the test needs the host; one pass over ``x`` per call)."""
    if x.device.type != "cpu":
        return None
    bad = ~torch.isfinite(x).all(dim=-1)
    return bad if bool(bad.any()) else None


def _contained_mm(
    a: torch.Tensor,
    x: torch.Tensor,
    off: torch.Tensor,
    g: int,
    bad: torch.Tensor | None,
    transposed: bool = False,
) -> torch.Tensor:
    """``a [B, Hkv, m, n] @ x [B, Hkv, n, D]`` of a PARTIAL tile whose ``a`` is zero at the
    disallowed pairs ``off`` (:func:`_disallowed`; ``transposed``: ``a`` is a transposed tile, its
    rows keys, ``x`` the folded query rows): a disallowed pair contributes exactly nothing, also
    when row ``x[j]`` holds NaN/Inf (``bad [B, Hkv, n]``, from :func:`_bad_rows`), where a plain
    matmul gives ``0 · nan = nan`` and leaks one document's bad token into every row of the tile."""
    if bad is None or not bool(bad.any()):
        return torch.matmul(a, x)
    out = torch.matmul(a, x.masked_fill(bad[..., None], 0.0))
    m = a.shape[2]
    for j in bad.any(dim=1).any(dim=0).nonzero().flatten().tolist():  # the few non-finite rows
        if transposed:  # x row j: head group j // bq, query j % bq
            keep = ~off[:, :, 0, j % (x.shape[2] // g), :, None]  # [Bm, 1, n, 1]
        else:  # x row j: key j
            keep = ~off[..., j : j + 1].expand(-1, -1, g, -1, -1).reshape(off.shape[0], 1, m, 1)
        keep = keep & bad[:, :, j, None, None]  # [B, Hkv, rows of a, 1]
        out = out + torch.where(keep, a[..., j : j + 1] * x[:, :, j : j + 1], 0.0)
    return out


def blockwise_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: MaskIndex,
    plan: BlockPlan,
    *,
    scale: float,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward. ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``."""
    with _no_autocast(q.device):
        return _forward(q, k, v, index, plan, scale=scale, dropout_p=dropout_p, dropout_seed=dropout_seed)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: MaskIndex,
    plan: BlockPlan,
    *,
    scale: float,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    qh = _heads(q, acc).view(B, Hkv, G, Tq, D)
    kh, vh = _heads(k, acc), _heads(v, acc)  # [B, Hkv, Tk, D]
    bad_v = _bad_rows(vh)  # None unless some v holds NaN/Inf (then PARTIAL tiles contain it)
    out = torch.zeros(B, Hkv, G, Tq, D, dtype=acc, device=q.device)
    lse = torch.full((B, Hkv, G, Tq), -math.inf, dtype=acc, device=q.device)
    bq = plan.block_q
    for qb, runs in enumerate(plan.runs):
        if not runs:
            continue  # every row of this block sees nothing: out 0, lse -inf
        q0, q1 = qb * bq, min((qb + 1) * bq, Tq)
        rows = G * (q1 - q0)
        qblk = qh[:, :, :, q0:q1].reshape(B, Hkv, rows, D)
        m = torch.full((B, Hkv, rows, 1), -math.inf, dtype=acc, device=q.device)
        denom = torch.zeros(B, Hkv, rows, 1, dtype=acc, device=q.device)
        o = torch.zeros(B, Hkv, rows, D, dtype=acc, device=q.device)
        for k0, k1, partial in runs:
            s = torch.matmul(qblk, kh[:, :, k0:k1].transpose(-1, -2)).mul_(scale)  # [B, Hkv, rows, bk]
            off = _disallowed(index, q0, q1, k0, k1) if partial else None
            if off is not None:
                s = _masked(s, off, G, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = torch.where(m_new == -math.inf, 0.0, m_new)  # rows with nothing yet: any shift
            p = torch.exp(s - m_safe)
            corr = torch.exp(m - m_safe)
            denom = denom * corr + p.sum(dim=-1, keepdim=True)
            if dropout_p > 0.0:
                assert dropout_seed is not None
                p = p * _dropout_z(dropout_seed, dropout_p, B, Hq, Hkv, q0, q1, k0, k1, q.device, acc)
            pv = (
                torch.matmul(p, vh[:, :, k0:k1])
                if off is None
                else _contained_mm(p, vh[:, :, k0:k1], off, G, None if bad_v is None else bad_v[:, :, k0:k1])
            )
            o = o * corr + pv
            m = m_new
        nonempty = denom > 0
        safe = torch.where(nonempty, denom, torch.ones_like(denom))
        o = o / safe
        blk_lse = torch.where(nonempty, m + torch.log(safe), -math.inf)
        out[:, :, :, q0:q1] = o.view(B, Hkv, G, q1 - q0, D)
        lse[:, :, :, q0:q1] = blk_lse.view(B, Hkv, G, q1 - q0)
    out_bthd = out.view(B, Hq, Tq, D).permute(0, 2, 1, 3).to(q.dtype).contiguous()
    return out_bthd, lse.view(B, Hq, Tq)


def blockwise_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    index: MaskIndex,
    plan: BlockPlan,
    *,
    scale: float,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq [B, Tq, Hq, D]``, ``dk, dv [B, Tk, Hkv, D]`` given ``dout``, the final ``out [B, Tq, Hq, D]`` and ``lse [B, Hq, Tq]``."""
    with _no_autocast(q.device):
        return _backward(
            dout, q, k, v, out, lse, index, plan, scale=scale, dropout_p=dropout_p, dropout_seed=dropout_seed
        )


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    index: MaskIndex,
    plan: BlockPlan,
    *,
    scale: float,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    qh = _heads(q, acc).view(B, Hkv, G, Tq, D)
    kh, vh = _heads(k, acc), _heads(v, acc)
    bad_k, bad_q = _bad_rows(kh), _bad_rows(qh)  # [B, Hkv, Tk], [B, Hkv, G, Tq] or None
    doh = _heads(dout, acc).view(B, Hkv, G, Tq, D)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1).permute(0, 2, 1).reshape(B, Hkv, G, Tq)
    # a non-finite v (dP) or out (delta) makes dS = 0 · nan at masked pairs: mask dS only then
    mask_ds = _bad_rows(vh) is not None or _bad_rows(delta[..., None]) is not None
    lse_a = lse.to(acc).reshape(B, Hkv, G, Tq)
    lse_a = torch.where(lse_a == -math.inf, math.inf, lse_a)  # empty rows: exp(s - inf) = 0
    dq = torch.zeros(B, Hkv, G, Tq, D, dtype=acc, device=q.device)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    bq = plan.block_q
    for qb, runs in enumerate(plan.runs):
        if not runs:
            continue
        q0, q1 = qb * bq, min((qb + 1) * bq, Tq)
        rows = G * (q1 - q0)
        qblk = qh[:, :, :, q0:q1].reshape(B, Hkv, rows, D)
        doblk = doh[:, :, :, q0:q1].reshape(B, Hkv, rows, D)
        lse_blk = lse_a[:, :, :, q0:q1].reshape(B, Hkv, rows, 1)
        delta_blk = delta[:, :, :, q0:q1].reshape(B, Hkv, rows, 1)
        dq_blk = torch.zeros(B, Hkv, rows, D, dtype=acc, device=q.device)
        for k0, k1, partial in runs:
            kblk, vblk = kh[:, :, k0:k1], vh[:, :, k0:k1]
            s = torch.matmul(qblk, kblk.transpose(-1, -2)).mul_(scale)
            p = torch.exp(s - lse_blk)
            off = _disallowed(index, q0, q1, k0, k1) if partial else None
            if off is not None:
                p = _masked(p, off, G, 0.0)
            dp = torch.matmul(doblk, vblk.transpose(-1, -2))
            if dropout_p > 0.0:
                assert dropout_seed is not None
                z = _dropout_z(dropout_seed, dropout_p, B, Hq, Hkv, q0, q1, k0, k1, q.device, acc)
                pz, dp = p * z, dp * z
            else:
                pz = p
            dv[:, :, k0:k1] += torch.matmul(pz.transpose(-1, -2), doblk)
            ds = p * (dp - delta_blk)
            if off is None:
                dq_blk += torch.matmul(ds, kblk)
                dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qblk)
            else:  # a bad v or k of another document must not reach this tile's dq / dk (0 · nan)
                if mask_ds:
                    ds = _masked(ds, off, G, 0.0)
                bk_ = None if bad_k is None else bad_k[:, :, k0:k1]
                bq_ = None if bad_q is None else bad_q[:, :, :, q0:q1].reshape(B, Hkv, rows)
                dq_blk += _contained_mm(ds, kblk, off, G, bk_)
                dk[:, :, k0:k1] += _contained_mm(ds.transpose(-1, -2), qblk, off, G, bq_, transposed=True)
        dq[:, :, :, q0:q1] = dq_blk.view(B, Hkv, G, q1 - q0, D)
    dq_bthd = (dq.view(B, Hq, Tq, D) * scale).permute(0, 2, 1, 3).to(q.dtype)
    dk_bthd = (dk * scale).permute(0, 2, 1, 3).to(k.dtype)
    dv_bthd = dv.permute(0, 2, 1, 3).to(v.dtype)
    return dq_bthd, dk_bthd, dv_bthd


class BlockwiseAttention(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, index, plan, scale, dropout_p, seed) -> out [B, Tq, Hq, D]``."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: MaskIndex,
        plan: BlockPlan,
        scale: float,
        dropout_p: float,
        dropout_seed: int | None,
    ) -> torch.Tensor:
        out, lse = blockwise_forward(
            q, k, v, index, plan, scale=scale, dropout_p=dropout_p, dropout_seed=dropout_seed
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.index, ctx.plan, ctx.scale = index, plan, scale
        ctx.dropout_p, ctx.dropout_seed = dropout_p, dropout_seed
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = blockwise_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            ctx.index,
            ctx.plan,
            scale=ctx.scale,
            dropout_p=ctx.dropout_p,
            dropout_seed=ctx.dropout_seed,
        )
        return dq, dk, dv, None, None, None, None, None


__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockPlan",
    "BlockwiseAttention",
    "blockwise_backward",
    "blockwise_forward",
]
