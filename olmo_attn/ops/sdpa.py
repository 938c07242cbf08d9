"""PyTorch's fused attention entry points: SDPA (dense) and ``torch.nn.attention.varlen`` (documents).

:func:`sdpa_attention` serves the plain masks (causal or none, no window, no documents) with
``enable_gqa=True``, preferring cuDNN, then the flash kernel, on CUDA; on CPU PyTorch's own flash
kernel (bounded memory, GQA without copies). :func:`varlen_attention` wraps
``torch.nn.attention.varlen.varlen_attn`` (flash-attn 2 kernels vendored in PyTorch) for
documents; its keyword set changed across releases, so it is probed once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_HALF = (torch.float16, torch.bfloat16)


def sdpa_supported(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`sdpa_attention` runs this input without a T×T mask or repeated K/V.

    CPU: PyTorch's CPU flash kernel for float32 and float64, GQA included (its dropout path is the
    O(T²) math kernel, so dropout goes elsewhere). Half precision goes to the blockwise kernel, which
    accumulates in float32: the CPU flash kernel's dK / dV drift from the float32 result as T grows
    (1.5 to 2.2 roundings of the output dtype from T = 64 to 333, 3-4x the plain-math error with
    grouped KV heads) and its float16 dQ / dK were seen non-finite where the true gradients fit in
    float16; the cost is 1.5x (float16) to 3x (bfloat16) at T = 2048-8192 on two cores. CUDA: cuDNN /
    flash need half precision; float32 only without GQA (the memory-efficient kernel refuses GQA and
    the math fallback would repeat K/V).
    """
    if q.device.type == "cpu":
        return dropout_p == 0.0 and q.dtype not in _HALF
    if q.device.type != "cuda":
        return False
    return q.dtype in _HALF or (q.dtype == torch.float32 and q.shape[2] == k.shape[2])


#: CUDA kernel preference (cuDNN, then flash, ...), and whether this PyTorch's ``sdpa_kernel``
#: takes ``set_priority``: read once at import, so a ``torch.compile``-d forward traces no
#: ``inspect`` call (Dynamo cannot, and would break the graph there).
_CUDA_BACKENDS: list[Any] = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_SDPA_KERNEL_PRIORITY: bool = "set_priority" in inspect.signature(sdpa_kernel).parameters


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` -> ``out [B, T, Hq, D]`` (top-left causal, so ``Tq == Tk``)."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"sdpa_attention is top-left causal and needs Tq == Tk, got {q.shape[1]} and {k.shape[1]}; "
            "use the kernel path (bottom-right alignment) for Tq != Tk"
        )
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views
    kwargs = dict(is_causal=causal, scale=scale, dropout_p=dropout_p, enable_gqa=q.shape[2] != k.shape[2])
    if q.is_cuda:
        if _SDPA_KERNEL_PRIORITY:
            ctx = sdpa_kernel(_CUDA_BACKENDS, set_priority=True)  # try cuDNN first, then flash
        else:
            ctx = sdpa_kernel(_CUDA_BACKENDS)
        with ctx:
            out = F.scaled_dot_product_attention(qh, kh, vh, **kwargs)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, **kwargs)
    return out.transpose(1, 2)


@functools.cache
def _varlen() -> tuple[Callable[..., Any] | None, frozenset[str]]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_supported(q: torch.Tensor, k: torch.Tensor, window: tuple[int, int], dropout_p: float) -> bool:
    """Whether :func:`varlen_attention` can run this call on this PyTorch (CUDA, half, no dropout)."""
    fn, params = _varlen()
    if fn is None or not q.is_cuda or q.dtype not in _HALF or dropout_p > 0.0:
        return False
    if q.shape[-2] != k.shape[-2] and "enable_gqa" not in params:
        return False
    return window == (-1, -1) or "window_size" in params


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    window: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` -> ``out [total_q, Hq, D]`` (bottom-right causal per segment)."""
    fn, params = _varlen()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen is not available in this PyTorch (needs >= 2.10)")
    kwargs: dict[str, Any] = {}
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel uses 1/sqrt(D): fold the requested scale into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[-2] != k.shape[-2]:
        kwargs["enable_gqa"] = True
    left, right = window
    if "window_size" in params:
        kwargs["window_size"] = (left, 0) if causal else (left, right)
    else:
        kwargs["is_causal"] = causal
    return fn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), **kwargs)
