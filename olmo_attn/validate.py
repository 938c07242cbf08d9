"""Checks of the forward arguments of the attention modules.

Every check reads shapes, dtypes, devices and other host metadata only; the one data-dependent
check (the values of ``cache_leftpad``) reads them once per distinct tensor and is skipped while
``torch.compile`` traces. Errors are :class:`~olmo_attn.exceptions.InvalidInputError` (a
``ValueError``) or :class:`~olmo_attn.exceptions.InvalidInputTypeError` (a ``TypeError``) and name
the argument, the value given and the fix.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .exceptions import InvalidInputError, InvalidInputTypeError

if TYPE_CHECKING:
    from .kv_cache import KVCacheManager

__all__ = [
    "check_attention_inputs",
    "check_local_k_slice",
    "check_x",
    "empty_attention_output",
    "is_empty_batch",
]

_DOC_ARGS = ("cu_doc_lens", "cu_doc_lens_q", "cu_doc_lens_k")


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return False


def check_x(x: Any, *, d_model: int, proj: nn.Module, owner: str) -> None:
    """``x`` must be a floating-point ``[B, T, d_model]`` tensor whose dtype the first projection
    ``proj`` accepts (its weight's dtype, or any float dtype under autocast)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputTypeError(
            f"{owner}.forward: x must be a torch.Tensor [B, T, d_model={d_model}], got {type(x).__name__}"
        )
    if x.dim() != 3:
        raise InvalidInputError(
            f"{owner}.forward: x must be [B, T, d_model] (3-D), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single sequence"
        )
    if x.shape[-1] != d_model:
        raise InvalidInputError(
            f"{owner}.forward: x has width x.shape[-1]={x.shape[-1]} but the module was built with "
            f"d_model={d_model}; pass x of shape [B, T, {d_model}] (got {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise InvalidInputTypeError(
            f"{owner}.forward: x must be a floating-point tensor, got dtype {x.dtype}; attention takes "
            "embeddings, not token ids (embed them first, or cast with x.float())"
        )
    weight = getattr(proj, "weight", None)
    # only plain nn.Linear is known to need matching dtypes (float8 / quantised layers may not)
    if (
        type(proj) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and x.dtype != weight.dtype
        and not _autocast_on(x.device.type)
    ):
        raise InvalidInputTypeError(
            f"{owner}.forward: x has dtype {x.dtype} but the parameters are {weight.dtype}; pass "
            f"x.to({weight.dtype}), convert the module with .to({x.dtype}), or run under torch.autocast"
        )


def check_local_k_slice(local_k_slice: Any, n_keys: int, keys: str = "B * T") -> slice | None:
    """Normalise ``local_k_slice`` over ``n_keys`` keys to ``slice(start, stop)`` with
    ``0 <= start < stop <= n_keys``; ``None`` bounds and negative bounds are read the Python way."""
    if local_k_slice is None:
        return None
    if not isinstance(local_k_slice, slice):
        raise InvalidInputTypeError(
            f"local_k_slice must be a slice (e.g. slice(start, stop)) of the {n_keys} keys, got "
            f"{type(local_k_slice).__name__} {local_k_slice!r}"
        )
    if local_k_slice.step not in (None, 1):
        raise InvalidInputError(
            f"local_k_slice={local_k_slice!r} has step {local_k_slice.step!r}; it must select a "
            "contiguous key range (step None or 1)"
        )

    def bound(value: Any, default: int, which: str) -> int:
        if value is None:
            return default
        if isinstance(value, bool):
            raise InvalidInputTypeError(f"local_k_slice.{which}={value!r} must be an int or None")
        try:
            v = operator.index(value)
        except TypeError:
            raise InvalidInputTypeError(
                f"local_k_slice.{which}={value!r} must be an int or None, got {type(value).__name__}"
            ) from None
        if v < 0:
            v += n_keys
            if v < 0:
                raise InvalidInputError(
                    f"local_k_slice={local_k_slice!r}: {which}={value} is before the first of the "
                    f"{n_keys} keys; use a bound in [-{n_keys}, {n_keys}]"
                )
        return v

    start = bound(local_k_slice.start, 0, "start")
    stop = bound(local_k_slice.stop, n_keys, "stop")
    if stop > n_keys:
        raise InvalidInputError(
            f"local_k_slice={local_k_slice!r} reaches key {stop} but there are only {n_keys} keys "
            f"({keys}); use stop <= {n_keys}"
        )
    if start >= stop:
        raise InvalidInputError(
            f"local_k_slice={local_k_slice!r} selects no keys (start {start} >= stop {stop} of "
            f"{n_keys}); every query needs its keys: pass a non-empty slice"
        )
    return slice(start, stop)


def _check_doc_tensor(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise InvalidInputTypeError(
            f"{name} must be an int32 torch.Tensor [n_docs + 1] of cumulative document lengths, got "
            f"{type(value).__name__}; pass torch.tensor(..., dtype=torch.int32)"
        )
    if value.device.type == "meta":
        raise InvalidInputError(
            f"{name} is on the meta device and holds no values; document offsets must be real: build "
            f"{name} on the CPU or on x's device"
        )


def _check_kv_cache_args(
    manager: KVCacheManager, n_new: int, cache_leftpad: torch.Tensor | None, doc_args: dict[str, Any]
) -> None:
    for name, value in doc_args.items():
        if value is not None:
            shown = name if isinstance(value, torch.Tensor) else f"{name}={value!r}"
            raise InvalidInputError(
                f"{shown} was passed to a layer with a KV cache: documents cannot be combined with the "
                "KV cache. Decode one sequence per batch row (use cache_leftpad for left-padded "
                "prompts), or set kv_cache_manager = None to attend over packed documents"
            )
    if cache_leftpad is not None:
        manager.check_leftpad(cache_leftpad, n_new)


def check_attention_inputs(
    module: Any,
    x: Any,
    *,
    proj: nn.Module,
    cu_doc_lens: Any = None,
    cu_doc_lens_q: Any = None,
    cu_doc_lens_k: Any = None,
    max_doc_len: Any = None,
    max_doc_len_q: Any = None,
    max_doc_len_k: Any = None,
    local_k_slice: Any = None,
    cache_leftpad: Any = None,
) -> slice | None:
    """Validate the forward arguments of ``module`` (an attention module); returns the normalised
    ``local_k_slice``. ``proj`` is the module's first projection (checks ``x``'s dtype)."""
    owner = type(module).__name__
    check_x(x, d_model=module.d_model, proj=proj, owner=owner)
    docs = {"cu_doc_lens": cu_doc_lens, "cu_doc_lens_q": cu_doc_lens_q, "cu_doc_lens_k": cu_doc_lens_k}
    for name, value in docs.items():
        _check_doc_tensor(name, value)
    B, T = x.shape[0], x.shape[1]
    manager = getattr(module, "kv_cache_manager", None)
    if cache_leftpad is not None and manager is None:
        raise InvalidInputError(
            f"{owner}.forward got cache_leftpad but has no KV cache; cache_leftpad describes left-padded "
            "prompts for KV-cache decoding: call init_kv_cache_manager(batch_size, max_seq_len) first, "
            "or drop cache_leftpad (use cu_doc_lens for packed documents without a cache)"
        )
    if manager is not None:
        if manager.batch_size != B:
            raise InvalidInputError(
                f"{owner}.forward: x has batch size {B} but the KV cache was built for "
                f"batch_size={manager.batch_size}; reset it with init_kv_cache_manager({B}, max_seq_len)"
            )
        extras = {
            **docs,
            "max_doc_len": max_doc_len,
            "max_doc_len_q": max_doc_len_q,
            "max_doc_len_k": max_doc_len_k,
            "local_k_slice": local_k_slice,
        }
        _check_kv_cache_args(manager, T, cache_leftpad, extras)
        return None
    if local_k_slice is None:
        return None
    n_keys, keys = B * T, "B * T"
    backend = getattr(module, "backend", None)
    if backend is not None and getattr(backend, "cp_enabled", False):
        import torch.distributed as dist

        n_keys *= dist.get_world_size(backend.cp_pg)  # the keys are gathered over the CP ranks
        keys = "B * T * cp_world_size"
    return check_local_k_slice(local_k_slice, n_keys, keys)


def is_empty_batch(x: torch.Tensor) -> bool:
    """``B == 0`` or ``T == 0`` (a plain tensor: DTensor inputs take the regular path)."""
    return (x.shape[0] == 0 or x.shape[1] == 0) and not _is_dtensor(x)


def empty_attention_output(module: nn.Module, x: torch.Tensor, out_proj: nn.Module) -> torch.Tensor:
    """The (empty) output for ``x`` with ``B == 0`` or ``T == 0``: ``[B, T, d_model]`` from
    ``out_proj`` (so dtype and autocast match the regular path), connected to ``x`` and to every
    trainable parameter, so backward runs and gives zero gradients."""
    B, T = x.shape[0], x.shape[1]
    out = out_proj(x.new_zeros(B, T, out_proj.in_features))  # type: ignore[arg-type]
    anchor = x.sum()  # 0: x is empty
    for p in module.parameters():
        if p.requires_grad:
            local = p.to_local() if _is_dtensor(p) else p  # type: ignore[attr-defined]
            # an empty slice sums to exactly 0 (even for non-finite weights); its gradient is zeros
            anchor = anchor + local.reshape(-1)[:0].sum().to(anchor.dtype)
    return out + anchor.to(out.dtype)
