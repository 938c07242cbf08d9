"""Opt-in fault containment for packed documents: NaN/Inf in one document stays in that document.

Tiled attention kernels (FlexAttention, flash-attn, cuDNN) compute masked pairs of a partially
masked tile and then zero them; ``0 * NaN`` is NaN, so a non-finite key or value in one document
reaches other documents' outputs and gradients through the tile they share (the containment
family of the conformance harness measures this per backend). With containment on, a document
holding any non-finite ``q``, ``k`` or ``v`` entry is zeroed before the kernel and its outputs and
its input gradients are NaN afterwards, so:

- every other document's outputs and gradients are exactly those of a clean run;
- the poisoned document is NaN in every row (a clean kernel would leave the rows before the bad
  token finite): louder, never finite-and-wrong.

Off by default: it reads ``q``, ``k``, ``v`` once more and writes them once (plus the same for the
gradients), which costs more than the 2% budget on the H200 benchmarks (README, "What we
guarantee"). Turn it on with ``OLMO_ATTN_CONTAIN_FAULTS=1``, :func:`set_fault_containment` or the
:func:`fault_containment` context manager. No host sync: everything stays on the device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

_ENABLED: bool | None = None  # None: follow OLMO_ATTN_CONTAIN_FAULTS


def fault_containment_enabled() -> bool:
    """Whether document attention contains non-finite inputs (see the module docstring)."""
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get("OLMO_ATTN_CONTAIN_FAULTS", "0").strip().lower() in ("1", "true", "yes", "on")


def set_fault_containment(enabled: bool | None) -> None:
    """Turn containment on or off for this process (``None``: follow ``OLMO_ATTN_CONTAIN_FAULTS``)."""
    global _ENABLED
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _ENABLED = enabled


@contextlib.contextmanager
def fault_containment(enabled: bool = True) -> Iterator[None]:
    """Containment on (or off) inside the block; the previous setting afterwards."""
    global _ENABLED
    prev = _ENABLED
    set_fault_containment(enabled)
    try:
        yield
    finally:
        _ENABLED = prev


class _NanGradAt(torch.autograd.Function):
    """Identity forward; the gradient is NaN where ``bad`` (broadcast) is set."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(bad)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (bad,) = ctx.saved_tensors
        return torch.where(bad, float("nan"), grad), None


def _segment_ids(cu: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` segment of each flat token (``n_seg`` for tokens past ``cu[-1]``)."""
    pos = torch.arange(n, device=cu.device, dtype=cu.dtype)
    # = searchsorted(cu[1:], ...) for sorted cu; a slice here broke Inductor's CUDA lowering (SliceView)
    return (torch.searchsorted(cu, pos, right=True) - 1).clamp(min=0)


def _bad_tokens(*xs: torch.Tensor) -> torch.Tensor:
    """``[N]`` True where any entry of any ``x [N, H, D]`` is NaN or infinite."""
    bad = None
    for x in xs:
        b = ~torch.isfinite(x).flatten(1).all(dim=1)
        bad = b if bad is None else bad | b
    assert bad is not None
    return bad


def contain_documents(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
) -> torch.Tensor:
    """``attend(q, k, v)`` with each poisoned document zeroed before and NaN after.

    ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``; documents ``cu_q`` / ``cu_k`` (int32
    ``[n_seg + 1]``) over the flattened ``B * Tq`` queries and ``B * Tk`` keys; ``attend`` returns
    ``[B, Tq, Hq, D]``.
    """
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    n_seg = cu_q.numel() - 1
    seg_q = _segment_ids(cu_q, B * Tq)
    seg_k = _segment_ids(cu_k, B * Tk)
    hits = torch.zeros(n_seg + 1, device=q.device, dtype=torch.int32)
    hits.index_add_(0, seg_q, _bad_tokens(q.reshape(B * Tq, *q.shape[2:])).to(torch.int32))
    hits.index_add_(
        0,
        seg_k,
        _bad_tokens(k.reshape(B * Tk, *k.shape[2:]), v.reshape(B * Tk, *v.shape[2:])).to(torch.int32),
    )
    poisoned = hits > 0  # [n_seg + 1]
    pq = poisoned[seg_q].view(B, Tq, 1, 1)
    pk = poisoned[seg_k].view(B, Tk, 1, 1)
    q_in = torch.where(pq, 0, _NanGradAt.apply(q, pq))
    k_in = torch.where(pk, 0, _NanGradAt.apply(k, pk))
    v_in = torch.where(pk, 0, _NanGradAt.apply(v, pk))
    out = attend(q_in, k_in, v_in)
    return torch.where(pq, float("nan"), out)
