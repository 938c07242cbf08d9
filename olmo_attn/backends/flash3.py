"""``flash_3``: the FlashAttention-3 adapter (flash-attn's ``hopper/`` build, Hopper sm_90).

The build installs the module ``flash_attn_interface`` (newer builds also ``flash_attn_3.
flash_attn_interface``); written against the interface shipped in flash-attn 2.8.3's ``hopper/``.
Entry points:

=====================================  ==========================================================
call                                   flash_attn_interface function
=====================================  ==========================================================
``(q, k, v)``, no documents            ``flash_attn_func``
``(q, k, v)`` with documents           ``flash_attn_varlen_func`` on the flattened batch
packed ``[B, T, 3, H, D]``             ``flash_attn_qkvpacked_func`` (FA3 has no varlen packed
                                       function: documents use views and the varlen function)
KV cache                               ``flash_attn_with_kvcache`` (in place, ``cache_leftpad``)
``kernel()`` (ring attention)          ``_flash_attn_forward`` / ``_flash_attn_backward``
=====================================  ==========================================================

FA3 has no dropout: ``dropout_p > 0`` is refused at construction by the capability table. Window,
scale, GQA and document conventions are those of :mod:`.flash2`. Depending on the build,
``flash_attn_func`` returns ``out`` or ``(out, lse)``; both are handled.

Two generations of the private kernel functions exist, and both are handled: the ``hopper/`` of
flash-attn 2.8.3 takes ``window_size=(left, right)`` (and names the output buffer ``out``); FA3
3.0.0 (the ``torch.library`` custom ops, the first ``hopper/`` that builds with CUDA 13) takes
``window_size_left`` / ``window_size_right`` (``out_``, and ``is_causal`` in the backward). The
arguments are passed by position up to ``causal`` — the same order in both — and the window in
whichever form the installed function declares.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..exceptions import BackendUnavailableError, UnsupportedFeatureError
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
    lse_to_flash,
    lse_to_ours,
    max_seqlens,
    refuse_kv_cache_dropout,
    visible_cache,
)

if TYPE_CHECKING:
    from ..kv_cache import KVCacheManager


def fa3_interface() -> ModuleType:
    """The FA3 Python interface module, whichever name this build installed."""
    spec = caps.get_spec("flash_3")
    errors = []
    for name in (spec.module, *spec.alternative_modules):
        assert name is not None
        try:
            return import_backend_module("flash_3", name)
        except BackendUnavailableError as e:
            errors.append(str(e))
    raise BackendUnavailableError("; ".join(errors))


def parameter_names(fn: Callable[..., Any]) -> frozenset[str]:
    """Parameter names of ``fn``: a plain function, or a ``torch.library.custom_op`` (its schema)."""
    target = getattr(fn, "_init_fn", fn)  # CustomOpDef keeps the decorated Python function
    try:
        return frozenset(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        op = getattr(fn, "_opoverload", None)
        schema = getattr(op, "_schema", None)
        return frozenset(a.name for a in schema.arguments) if schema is not None else frozenset()


def window_kwargs(fn: Callable[..., Any], window: tuple[int, int]) -> dict[str, Any]:
    """The window as ``fn`` takes it: ``window_size_left/_right`` (FA3 3.0) or ``window_size`` (2.8.3)."""
    left, right = (int(w) for w in window)
    if "window_size_left" in parameter_names(fn):
        return {"window_size_left": left, "window_size_right": right}
    return {"window_size": (left, right)}


def deterministic_for(head_dim: int, requested: bool) -> bool:
    """``requested``, refused with :class:`UnsupportedFeatureError` where FA3 has no deterministic
    backward (``head_dim`` above ``deterministic_head_dim_max``: there it crashed instead); with
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` a warning and the usual backward."""
    spec = caps.get_spec("flash_3")
    if requested and not spec.supports_deterministic(head_dim):
        msg = (
            f"attention backend 'flash_3' has no deterministic backward at head_dim={head_dim} (above "
            f"{spec.deterministic_head_dim_max} FA3 may run its 256 kernel, which has none, and crashed "
            "when asked): turn torch.use_deterministic_algorithms off around this layer, or use "
            "backend='flash_4' or 'torch', which have one"
        )
        if torch.is_deterministic_algorithms_warn_only_enabled():  # PyTorch's rule: warn, run as usual
            warnings.warn(msg + "; running the non-deterministic backward (warn_only=True)", stacklevel=3)
            return False
        raise UnsupportedFeatureError(msg)
    return requested


def _no_dropout(call: KernelCall) -> None:
    if call.dropout_p > 0.0:
        caps.assert_feature("flash_3", "dropout", " (its kernels have no dropout; use flash_2 or torch)")


class Flash3Kernel:
    """FA3 forward with log-sum-exp and its backward (``AttentionKernel`` protocol).

    Dense: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``.
    Varlen: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` -> ``out [total_q, Hq, D]``,
    ``lse [Hq, total_q]``.
    """

    name = "flash_3"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _no_dropout(call)
        fi = fa3_interface()
        max_q, max_k = max_seqlens(call) if call.varlen else (None, None)
        fwd = fi._flash_attn_forward
        with torch.no_grad():
            # positional through ``causal``: 2.8.3 names the output buffer ``out``, FA3 3.0 ``out_``
            out, lse, *_ = fwd(
                q,
                k,
                v,
                None,  # k_new
                None,  # v_new
                None,  # qv
                None,  # out / out_
                call.cu_seqlens_q,
                call.cu_seqlens_k,
                None,  # cu_seqlens_k_new
                None,  # seqused_q
                None,  # seqused_k
                max_q,
                max_k,
                None,  # page_table
                None,  # kv_batch_idx
                None,  # leftpad_k
                None,  # rotary_cos
                None,  # rotary_sin
                None,  # seqlens_rotary
                None,  # q_descale
                None,  # k_descale
                None,  # v_descale
                call.scale,
                call.causal,
                **window_kwargs(fwd, call.window),
            )
        return out, lse_to_ours(lse)

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
        fi = fa3_interface()
        max_q, max_k = max_seqlens(call) if call.varlen else (None, None)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bwd = fi._flash_attn_backward
        with torch.no_grad():
            # positional through ``causal`` (FA3 spells two of these names "sequed_q/_k", and FA3 3.0
            # calls the causal flag "is_causal")
            bwd(
                dout.to(q.dtype),
                q,
                k,
                v,
                out.to(q.dtype),
                lse_to_flash(lse),
                call.cu_seqlens_q,
                call.cu_seqlens_k,
                None,  # seqused_q
                None,  # seqused_k
                max_q,
                max_k,
                dq,
                dk,
                dv,
                call.scale,
                call.causal,
                **window_kwargs(bwd, call.window),
                softcap=0.0,
                deterministic=deterministic_for(q.shape[-1], call.deterministic or deterministic_requested()),
            )
        return dq, dk, dv


class FlashAttention3Backend(AttentionBackend):
    """FlashAttention-3 (Hopper): fp16/bf16, head_dim <= 256 (multiple of 8), no dropout; deterministic
    backward (``torch.use_deterministic_algorithms``) up to head_dim 128.

    Inputs ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` or packed ``[B, T, 3, H, D]``; output
    ``[B, T, Hq, D]``.
    """

    name: ClassVar[str] = "flash_3"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        caps.assert_head_dim(self.name, self.head_dim)
        fa3_interface()

    def kernel(self) -> Flash3Kernel:
        return Flash3Kernel()

    def _common(self) -> dict[str, Any]:
        return {
            "softmax_scale": self.softmax_scale,
            "causal": True,
            "window_size": self.window_size,
            "deterministic": deterministic_for(self.head_dim, deterministic_requested()),
        }

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        """``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, Hq, D]``."""
        fi = fa3_interface()
        if docs is None:
            return first(fi.flash_attn_func(q, k, v, **self._common()))
        out = first(
            fi.flash_attn_varlen_func(
                flatten_batch(q),
                flat_keys(k, docs),
                flat_keys(v, docs),
                docs.cu_q,
                docs.cu_k,
                docs.max_q,
                docs.max_k,
                **self._common(),
            )
        )
        return out.view(q.shape)

    def _attend_packed(self, qkv: torch.Tensor, docs: DocSegments | None, dropout_p: float) -> torch.Tensor:
        """Packed ``[B, T, 3, H, D]`` -> ``[B, T, H, D]``."""
        if docs is None:
            return first(fa3_interface().flash_attn_qkvpacked_func(qkv, **self._common()))
        return super()._attend_packed(qkv, docs, dropout_p)

    def _attend_kvcache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manager: KVCacheManager, dropout_p: float
    ) -> torch.Tensor:
        """Append ``k, v [B, T_new, Hkv, D]`` to the cache and attend over ``[leftpad, pos + T_new)``
        through ``flash_attn_varlen_func`` on the gathered visible slots (:func:`visible_cache`: the
        H200 run of FA3 3.0.0's ``flash_attn_with_kvcache`` let NaN in unused slots through and
        wrote new keys over the left padding)."""
        refuse_kv_cache_dropout(self.name, dropout_p)
        pos = kv_cache_position(manager, q, k)
        B, T_new, Hq, D = q.shape
        q_flat, k_vis, v_vis, cu_q, cu_k, max_k = visible_cache(manager, q, k, v, pos)
        out = first(
            fa3_interface().flash_attn_varlen_func(
                q_flat,
                k_vis,
                v_vis,
                cu_q,
                cu_k,
                T_new,
                max_k,
                softmax_scale=self.softmax_scale,
                causal=True,
                window_size=self.window_size,
            )
        )
        return out.view(B, T_new, Hq, D)
