"""The torch backend's kernel: one dispatcher over SDPA, FlexAttention and the blockwise kernel.

* :func:`attend` — differentiable attention for the modules (dense ``[B, T, H, D]`` or varlen).
* :class:`TorchKernel` — the ``AttentionKernel`` protocol (``forward -> (out, lse)`` and the
  flash-style ``backward``) that ring attention runs on.

Choice per call: FlexAttention on CUDA (fp16/bf16/fp32, power-of-two head dims, no dropout);
``torch.nn.attention.varlen`` for shared-segmentation documents when :data:`DOCUMENT_KERNEL` is
``"varlen"``; otherwise the blockwise kernel (CPU, float64, dropout, odd head dims). Plain masks
(SDPA) are chosen by the backend, which knows ``Tq == Tk``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from . import flex as flex_ops
from .aten_flash import aten_flash_backward, aten_flash_forward, aten_flash_supported
from .blockwise import BlockPlan, BlockwiseAttention, blockwise_backward, blockwise_forward
from .kernel import KernelCall
from .masking import MaskIndex, build_mask_index
from .sdpa import varlen_attention, varlen_supported

#: Kernel for intra-document masking on CUDA: ``"flex"`` (FlexAttention block mask) or ``"varlen"``
#: (``torch.nn.attention.varlen.varlen_attn``, shared segmentations only). The GPU benchmark times both.
DOCUMENT_KERNEL: str = os.environ.get("OLMO_ATTN_DOCUMENT_KERNEL", "flex")

#: LSE kernel of :class:`TorchKernel` (ring attention's per-block kernel) on CUDA fp16/bf16: ``"flash"``
#: (PyTorch's bundled flash-attention 2, :mod:`.aten_flash`: no compilation, direct flash-style
#: backward) or ``"flex"`` (compiled FlexAttention, backward by recompute + autograd).
LSE_KERNEL: str = os.environ.get("OLMO_ATTN_TORCH_LSE_KERNEL", "flash")

_PLAN_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_PLAN_CACHE_SIZE = 32


@dataclass(frozen=True)
class BlockSizes:
    """Tiling of the blockwise kernel: query rows per block, key tile, keys per matmul."""

    block_q: int = 128
    block_k: int = 128
    max_run: int = 2048


DEFAULT_BLOCKS = BlockSizes()


def _cache_key(
    call: KernelCall, tq: int, tk: int, device: torch.device, kind: str, extra: Any
) -> tuple | None:
    """Key for masks that depend only on shapes and host-known offsets (None: don't cache)."""
    if call.varlen:
        if call.cu_seqlens_q_host is None:
            return None
        segs = (call.cu_seqlens_q_host, call.cu_seqlens_k_host or call.cu_seqlens_q_host)
    else:
        segs = None
    return (kind, str(device), tq, tk, call.causal, tuple(call.window), segs, extra)


def _cached(key: tuple | None, build: Any) -> Any:
    if key is None:
        return build()
    hit = _PLAN_CACHE.get(key)
    if hit is None:
        hit = build()
        _PLAN_CACHE[key] = hit
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    return hit


def clear_plan_cache() -> None:
    """Forget cached block plans and FlexAttention block masks."""
    _PLAN_CACHE.clear()


def _as_4d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall) -> tuple[torch.Tensor, ...]:
    """Varlen ``[total, H, D]`` -> ``[1, total, H, D]``; dense passes through (with checks)."""
    want = 3 if call.varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "[total, H, D] (varlen)" if call.varlen else "[B, T, H, D]"
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    if call.varlen:
        return q[None], k[None], v[None]
    return q, k, v


def prepare_mask(
    q4: torch.Tensor,
    k4: torch.Tensor,
    call: KernelCall,
    *,
    kind: str,
    q_start: int | torch.Tensor | None,
    key_lo: torch.Tensor | None,
    key_hi: int | torch.Tensor | None,
    blocks: BlockSizes,
) -> tuple[MaskIndex, Any]:
    """Index vectors plus the blockwise plan (``kind="blockwise"``) or the Flex ``BlockMask`` (``"flex"``).

    ``q4 [B, Tq, Hq, D]`` and ``k4 [B, Tk, Hkv, D]`` give shapes and device. Masks that depend only on
    shapes and host-known offsets are cached (LRU of 32), so a model's layers build each one once.
    """
    tq, tk = q4.shape[1], k4.shape[1]
    dynamic = q_start is not None or key_lo is not None or key_hi is not None

    def build() -> tuple[MaskIndex, Any]:
        index = build_mask_index(
            call, tq=tq, tk=tk, device=q4.device, q_start=q_start, key_lo=key_lo, key_hi=key_hi
        )
        if kind == "flex":
            return index, flex_ops.build_block_mask(index)
        return index, BlockPlan.build(index, blocks.block_q, blocks.block_k, blocks.max_run)

    key = (
        None
        if dynamic
        else _cache_key(call, tq, tk, q4.device, kind, blocks if kind == "blockwise" else None)
    )
    return _cached(key, build)


def _check_dropout(call: KernelCall) -> None:
    if call.dropout_p > 0.0 and call.dropout_seed is None:
        raise ValueError(
            f"dropout_p={call.dropout_p} needs dropout_seed (an int): the keep mask is a pure function of "
            "(seed, b, h, i, j) so the backward pass can regenerate it; draw one with ops.dropout.new_seed()"
        )


def planned_forward(
    q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, index: Any, plan: Any, impl: str, call: KernelCall
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``impl`` ("flex" / "blockwise") over a mask from :func:`prepare_mask`."""
    with torch.no_grad():
        if impl == "flex":
            return flex_ops.flex_forward(q4, k4, v4, plan, scale=call.scale)
        return blockwise_forward(
            q4,
            k4,
            v4,
            index,
            plan,
            scale=call.scale,
            dropout_p=call.dropout_p,
            dropout_seed=call.dropout_seed,
        )


def planned_backward(
    dout: torch.Tensor,
    q4: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    index: Any,
    plan: Any,
    impl: str,
    call: KernelCall,
    flex_context: Any = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`planned_forward`; FlexAttention's backward recomputes with
    autograd, inside ``flex_context()``."""
    if impl == "flex":
        with flex_context():
            return flex_ops.flex_kernel_backward(dout, q4, k4, v4, out, lse, plan, scale=call.scale)
    with torch.no_grad():
        return blockwise_backward(
            dout, q4, k4, v4, out, lse, index, plan,
            scale=call.scale, dropout_p=call.dropout_p, dropout_seed=call.dropout_seed,
        )  # fmt: skip


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: KernelCall,
    *,
    q_start: int | torch.Tensor | None = None,
    key_lo: torch.Tensor | None = None,
    key_hi: int | torch.Tensor | None = None,
    blocks: BlockSizes = DEFAULT_BLOCKS,
    impl: str | None = None,
) -> torch.Tensor:
    """Differentiable masked attention -> ``out`` shaped like ``q``.

    Args:
        q: ``[B, Tq, Hq, D]`` (varlen: ``[total_q, Hq, D]``); k, v: ``[B, Tk, Hkv, D]`` (``[total_k, Hkv, D]``).
        call: scale, causal, window, segments, dropout (``dropout_seed`` required when ``p > 0``).
        q_start, key_lo, key_hi: KV-cache geometry (see :func:`~.masking.build_mask_index`).
        impl: force ``"flex"``, ``"varlen"`` or ``"blockwise"`` (default: chosen per device/dtype).
    """
    _check_dropout(call)
    q4, k4, v4 = _as_4d(q, k, v, call)
    if impl is None:
        impl = "flex" if flex_ops.flex_supported(q4, call.dropout_p) else "blockwise"
        if (
            impl == "flex"
            and DOCUMENT_KERNEL == "varlen"
            and call.varlen
            and key_lo is None
            and key_hi is None
            and call.cu_seqlens_q_host is not None
            and call.cu_seqlens_q_host == (call.cu_seqlens_k_host or call.cu_seqlens_q_host)
            and varlen_supported(q, k, call.window, call.dropout_p)
        ):
            impl = "varlen"
    if impl == "varlen":
        assert call.cu_seqlens_q is not None
        cu_k = call.cu_seqlens_k if call.cu_seqlens_k is not None else call.cu_seqlens_q
        hq = call.cu_seqlens_q_host or tuple(call.cu_seqlens_q.tolist())
        hk = call.cu_seqlens_k_host or hq
        return varlen_attention(
            q,
            k,
            v,
            cu_q=call.cu_seqlens_q,
            cu_k=cu_k,
            max_q=call.max_seqlen_q or max(b - a for a, b in itertools.pairwise(hq)),
            max_k=call.max_seqlen_k or max(b - a for a, b in itertools.pairwise(hk)),
            causal=call.causal,
            window=call.window,
            scale=call.scale,
        )
    index, plan = prepare_mask(
        q4, k4, call, kind=impl, q_start=q_start, key_lo=key_lo, key_hi=key_hi, blocks=blocks
    )
    if impl == "flex":
        out, _ = flex_ops.flex_forward(q4, k4, v4, plan, scale=call.scale)
    elif impl == "blockwise":
        out = BlockwiseAttention.apply(q4, k4, v4, index, plan, call.scale, call.dropout_p, call.dropout_seed)
    else:
        raise ValueError(f"impl={impl!r} is not one of 'flex', 'varlen', 'blockwise'")
    return out[0] if call.varlen else out


class TorchKernel:
    """``AttentionKernel`` of the torch backend: PyTorch's bundled flash kernel on CUDA fp16/bf16
    (:data:`LSE_KERNEL`), FlexAttention for the rest of CUDA, the blockwise kernel elsewhere.

    ``forward(q, k, v, call) -> (out, lse)`` records no autograd graph; ``backward`` returns this
    call's share of ``dq, dk, dv`` given the final ``out``/``lse`` (``docs`` of :mod:`.kernel`).
    Layouts: dense ``q [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``; varlen ``q [total_q, Hq, D]``,
    ``lse [Hq, total_q]``. ``lse`` is float32 (float64 for float64 inputs).
    """

    name = "torch"

    def __init__(self, blocks: BlockSizes = DEFAULT_BLOCKS, impl: str | None = None) -> None:
        if impl not in (None, "flash", "flex", "blockwise"):
            raise ValueError(f"impl={impl!r} must be None, 'flash', 'flex' or 'blockwise'")
        self.blocks = blocks
        self.impl = impl

    def _impl(self, q4: torch.Tensor, call: KernelCall) -> str:
        if self.impl is not None:
            return self.impl
        if LSE_KERNEL == "flash" and aten_flash_supported(q4, call):
            return "flash"
        return "flex" if flex_ops.flex_supported(q4, call.dropout_p) else "blockwise"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_dropout(call)
        q4, k4, v4 = _as_4d(q, k, v, call)
        impl = self._impl(q4, call)
        if impl == "flash":
            return aten_flash_forward(q, k, v, call)
        index, plan = prepare_mask(
            q4, k4, call, kind=impl, q_start=None, key_lo=None, key_hi=None, blocks=self.blocks
        )
        out, lse = planned_forward(q4, k4, v4, index, plan, impl, call)
        if call.varlen:
            return out[0], lse[0]
        return out, lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: KernelCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_dropout(call)
        q4, k4, v4 = _as_4d(q, k, v, call)
        impl = self._impl(q4, call)
        if impl == "flash":
            return aten_flash_backward(dout, q, k, v, out, lse, call)
        if call.varlen:
            dout, out, lse = dout[None], out[None], lse[None]
        index, plan = prepare_mask(
            q4, k4, call, kind=impl, q_start=None, key_lo=None, key_hi=None, blocks=self.blocks
        )
        dq, dk, dv = planned_backward(dout, q4, k4, v4, out, lse, index, plan, impl, call)
        if call.varlen:
            return dq[0], dk[0], dv[0]
        return dq, dk, dv


def default_scale(head_dim: int) -> float:
    """``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)
