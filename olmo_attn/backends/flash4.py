"""``flash_4``: the flash-attn-4 adapter (``pip install flash-attn-4``; CuTe DSL, module ``flash_attn.cute``).

Written against flash-attn-4 4.0.0b36. Unlike OLMo-core (which documents flash_4 as Blackwell-only)
this adapter runs on Hopper sm_90 and Blackwell sm_100-sm_103, where the library has forward and
backward kernels. Entry points:

=====================================  ==========================================================
call                                   flash_attn.cute function
=====================================  ==========================================================
``(q, k, v)``, no documents            ``flash_attn_func``
``(q, k, v)`` with documents           ``flash_attn_varlen_func`` on the flattened batch
packed ``[B, T, 3, H, D]``             views into the unpacked path (FA4 has no packed function)
KV cache                               ``flash_attn_varlen_func`` over the cache (see below)
``kernel()`` (ring attention)          ``interface._flash_attn_fwd(return_lse=True)`` /
                                       ``interface._flash_attn_bwd``
=====================================  ==========================================================

Window: FA4 takes ``window_size=(left, right)`` with ``None`` = unbounded, and turns
``causal=True`` + ``(None, None)`` into the plain causal kernel; ours ``-1`` maps to ``None``, and
``(-1, -1)`` or ``(-1, 0)`` with ``causal=True`` become ``(None, None)``. A left window with
``causal=True`` is sent as ``(left, 0)`` (FA4 runs it as a local mask; same set of keys).

KV cache with left padding (OLMo-core's flash_4 ignores ``cache_leftpad``: padded prompts attend
to their padding keys). FA4 has no ``leftpad`` argument, but its varlen kernel reads segment ``b``'s
keys at rows ``cu_seqlens_k[b] ... cu_seqlens_k[b] + seqused_k[b]`` of a flat key tensor. So the
cache ``[B, S, Hkv, D]`` is viewed flat as ``[B*S, Hkv, D]`` and row ``b``'s segment starts at
``b*S + leftpad[b]`` with ``seqused_k[b] = cache_seqlens + T_new - leftpad[b]`` keys: exactly the
visible keys ``leftpad[b] <= j < cache_seqlens + T_new``, and bottom-right causal alignment inside
the segment puts query ``t`` at cache index ``cache_seqlens + t``. One kernel call, no copy, no
device sync (the position comes from the manager's host mirror).

FA4 has no dropout (refused at construction by the capability table); deterministic backward is
available on sm_90 and sm_100 (``deterministic=True``).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..exceptions import UnsupportedFeatureError
from ..hardware import info_for
from ..masks import DocSegments
from ..ops.kernel import KernelCall
from . import capabilities as caps
from .base import AttentionBackend
from .flash2 import (
    deterministic_requested,
    first,
    flat_keys,
    flatten_batch,
    import_backend_module,
    kv_cache_position,
    max_seqlens,
    refuse_kv_cache_dropout,
    visible_cache,
)

if TYPE_CHECKING:
    from ..kv_cache import KVCacheManager


def fa4_window(window: tuple[int, int], causal: bool) -> tuple[int | None, int | None]:
    """Our ``(left, right)`` (``-1`` = unbounded) -> FA4's ``(left, right)`` (``None`` = unbounded)."""
    left, right = (None if w < 0 else int(w) for w in window)
    if causal:
        # causal already bounds the right side: FA4 forces right = 0 whenever causal=True
        return (None, None) if left is None else (left, 0)
    return left, right


def head_dim_reason(head_dim: int, sm: tuple[int, int] | None) -> str | None:
    """Why FA4 cannot run ``head_dim`` on compute capability ``sm`` (``None`` when it can).

    sm_90: 8..256 in steps of 8; sm_100-sm_103: 8..128 in steps of 8, or 256 (q/k and v alike).
    """
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"head_dim={head_dim} is not a multiple of 8 in [8, 256]"
    if sm is not None and sm[0] == 10 and head_dim > 128 and head_dim != 256:
        return f"head_dim={head_dim} is not supported on sm_{sm[0]}{sm[1]} (FA4 there takes 8..128 or 256)"
    return None


def _cute() -> ModuleType:
    return import_backend_module("flash_4", "flash_attn.cute")


def _interface() -> ModuleType:
    return import_backend_module("flash_4", "flash_attn.cute.interface")


def _no_dropout(call: KernelCall) -> None:
    if call.dropout_p > 0.0:
        caps.assert_feature("flash_4", "dropout", " (its kernels have no dropout; use flash_2 or torch)")


class Flash4Kernel:
    """flash-attn-4 forward with log-sum-exp and its backward (``AttentionKernel`` protocol).

    Dense: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``.
    Varlen: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` -> ``out [total_q, Hq, D]``,
    ``lse [Hq, total_q]``. FA4 already writes ``lse = -inf`` for rows without a visible key.
    """

    name = "flash_4"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _no_dropout(call)
        left, right = fa4_window(call.window, call.causal)
        max_q, max_k = max_seqlens(call) if call.varlen else (None, None)
        with torch.no_grad():
            result = _interface()._flash_attn_fwd(
                q,
                k,
                v,
                cu_seqlens_q=call.cu_seqlens_q,
                cu_seqlens_k=call.cu_seqlens_k,
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
                softmax_scale=call.scale,
                causal=call.causal,
                window_size_left=left,
                window_size_right=right,
                return_lse=True,
            )
        return result[0], result[1]

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
        _no_dropout(call)
        left, right = fa4_window(call.window, call.causal)
        max_q, max_k = max_seqlens(call) if call.varlen else (None, None)
        with torch.no_grad():
            dq, dk, dv = _interface()._flash_attn_bwd(
                q,
                k,
                v,
                out.to(q.dtype),
                dout.to(q.dtype),
                lse.float().contiguous(),
                softmax_scale=call.scale,
                causal=call.causal,
                window_size_left=left,
                window_size_right=right,
                cu_seqlens_q=call.cu_seqlens_q,
                cu_seqlens_k=call.cu_seqlens_k,
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
                deterministic=call.deterministic or deterministic_requested(),
            )[:3]
        return dq, dk, dv


class FlashAttention4Backend(AttentionBackend):
    """flash-attn-4 (CuTe DSL) on sm_90 / sm_100-103: fp16/bf16, GQA, window, documents, KV cache.

    Inputs ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` or packed ``[B, T, 3, H, D]``; output
    ``[B, T, Hq, D]``. No dropout.
    """

    name: ClassVar[str] = "flash_4"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        reason = self.device_limits(head_dim=self.head_dim)
        if reason is not None:
            raise UnsupportedFeatureError(
                f"attention backend 'flash_4': {reason}; backend='torch' takes any head_dim"
            )
        _cute()

    @classmethod
    def device_limits(
        cls, *, head_dim: int | None = None, device: torch.device | str | None = None
    ) -> str | None:
        """Architecture-specific limits the capability table cannot express (per-arch head dims)."""
        if head_dim is None:
            return None
        return head_dim_reason(head_dim, info_for(device).sm)

    def kernel(self) -> Flash4Kernel:
        return Flash4Kernel()

    def _common(self) -> dict[str, Any]:
        return {
            "softmax_scale": self.softmax_scale,
            "causal": True,
            "window_size": fa4_window(self.window_size, True),
            "deterministic": deterministic_requested(),
        }

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        """``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, Hq, D]``."""
        cute = _cute()
        if docs is None:
            return first(cute.flash_attn_func(q, k, v, **self._common()))
        out = first(
            cute.flash_attn_varlen_func(
                flatten_batch(q),
                flat_keys(k, docs),
                flat_keys(v, docs),
                cu_seqlens_q=docs.cu_q,
                cu_seqlens_k=docs.cu_k,
                max_seqlen_q=docs.max_q,
                max_seqlen_k=docs.max_k,
                **self._common(),
            )
        )
        return out.view(q.shape)

    def _attend_kvcache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manager: KVCacheManager, dropout_p: float
    ) -> torch.Tensor:
        """Append ``k, v [B, T_new, Hkv, D]`` to the cache and attend over ``[leftpad, pos + T_new)``."""
        refuse_kv_cache_dropout(self.name, dropout_p)
        pos = kv_cache_position(manager, q, k)
        B, T_new, Hq, D = q.shape
        q_flat, k_vis, v_vis, cu_q, cu_k, max_k = visible_cache(manager, q, k, v, pos)
        out = first(
            _cute().flash_attn_varlen_func(
                q_flat,
                k_vis,
                v_vis,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                max_seqlen_q=T_new,
                max_seqlen_k=max_k,
                softmax_scale=self.softmax_scale,
                causal=True,
                window_size=fa4_window(self.window_size, True),
            )
        )
        return out.view(B, T_new, Hq, D)
