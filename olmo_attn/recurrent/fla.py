"""flash-linear-attention (``fla``, PyPI ``fla-core``) dispatch for Gated DeltaNet. Optional.

Calls exactly what OLMo-core calls: ``chunk_gated_delta_rule`` with
``use_qk_l2norm_in_kernel=True`` and gate/beta computed outside, ``causal_conv1d(...,
activation="silu", backend="triton")`` and the fused gated RMSNorm. Imported lazily; never needed.

fla's own guard is respected: its gated backward (``chunk_bwd_dqkwg``) raises on Hopper with
Triton >= 3.4 and < 3.7.1 unless tilelang is installed ("produces incorrect results").
:func:`fla_kernel_usable` reports that *before* a forward is recorded for autograd, so the module
runs its own chunked kernel for training there and still uses fla's forward for inference.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from ..exceptions import BackendUnavailableError
from ..hardware import package_status

__all__ = [
    "fla_available",
    "fla_backward_refusal",
    "fla_causal_conv1d",
    "fla_chunk_gated_delta_rule",
    "fla_gated_rms_norm",
    "fla_kernel_usable",
]


# host facts (these three): a compiled forward reads them as constants, never tracing importlib
@torch.compiler.assume_constant_result
def fla_available() -> bool:
    """Whether ``fla`` imports (cached)."""
    return package_status("fla", "fla-core").available


def _require() -> None:
    if not fla_available():
        _raise_unavailable()


@torch.compiler.disable  # builds the message eagerly (importlib is not traceable)
def _raise_unavailable() -> None:
    status = package_status("fla", "fla-core")
    if not status.available:
        raise BackendUnavailableError(
            f"Gated DeltaNet backend 'fla' needs flash-linear-attention ({status.reason}); "
            "install it with `pip install fla-core` (CUDA GPU + Triton), or use backend='torch'"
        )


@functools.cache
def _module(name: str) -> Any:
    return importlib.import_module(name)


def _version_at_least(version: str, floor: tuple[int, ...]) -> bool:
    parts: list[int] = []
    for piece in version.split("+")[0].split(".")[: len(floor)]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= floor


@functools.cache
@torch.compiler.assume_constant_result
def fla_backward_refusal(device_index: int = 0) -> str | None:
    """Why fla's gated-delta-rule backward refuses to run on this GPU, or ``None`` if it runs.

    Mirrors ``fla.ops.common.chunk_o.chunk_bwd_dqkwg``: Hopper (SM 9.x) with Triton in
    ``[3.4.0, 3.7.1)`` raises unless the tilelang backend (``tilelang`` package) is importable.
    """
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device_index)
    if major != 9:
        return None
    triton = package_status("triton")
    if not triton.available or triton.version is None:
        return None
    if _version_at_least(triton.version, (3, 4, 0)) and not _version_at_least(triton.version, (3, 7, 1)):
        if package_status("tilelang").available:
            return None
        return (
            f"flash-linear-attention's gated backward refuses Hopper with Triton {triton.version} "
            "(needs Triton >= 3.7.1 or tilelang)"
        )
    return None


@torch.compiler.assume_constant_result
def fla_kernel_usable(device: torch.device, dtype: torch.dtype, *, backward: bool) -> tuple[bool, str | None]:
    """Whether fla's chunk kernel can run (forward, and backward if ``backward``) for these inputs.

    Returns ``(ok, reason_if_not)``.
    """
    if not fla_available():
        return False, f"fla is not importable ({package_status('fla', 'fla-core').reason})"
    if device.type != "cuda":
        return False, f"fla's Triton kernels need a CUDA device, inputs are on {device}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"fla's kernels take float32/bfloat16/float16, got {dtype}"
    if backward:
        refusal = fla_backward_refusal(
            device.index if device.index is not None else torch.cuda.current_device()
        )
        if refusal is not None:
            return False, refusal
    return True, None


def fla_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` with our argument conventions.

    ``q, k [B, T, H, Dk]`` (fla handles ``HV > H`` itself), ``v [B, T, HV, Dv]``, ``g`` (float32
    log-decay) and ``beta`` ``[B, T, HV]``. ``cu_seqlens`` segments the flattened batch, as in
    :func:`olmo_attn.recurrent.chunked.chunk_gated_delta_rule` (fla needs ``B == 1`` there, so the
    batch is flattened first). Returns ``(o [B, T, HV, Dv], final [n_seq, HV, Dk, Dv] | None)``.
    """
    _require()
    fn = _module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
    B, T = q.shape[:2]
    cu = None
    if cu_seqlens is not None:
        q, k, v, g, beta = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))
        cu = cu_seqlens.to(torch.int64)
    o, final = fn(
        q=q,
        k=k,
        v=v,
        g=g.float(),
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=cu,
    )
    return o.reshape(B, T, *o.shape[2:]), (final if output_final_state else None)


def fla_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """fla's Triton causal conv + SiLU: ``x [B, T, C]``, ``weight [C, 1, Kc]`` -> ``[B, T, C]``."""
    _require()
    try:
        conv = _module("fla.modules.convolution").causal_conv1d
    except (ImportError, AttributeError):
        conv = _module("fla.modules.causal_conv1d").causal_conv1d
    B, T, C = x.shape
    cu = None
    if cu_seqlens is not None:
        x = x.reshape(1, B * T, C)
        cu = cu_seqlens.to(torch.int64)
    y = conv(x, weight=weight.reshape(C, -1), bias=bias, activation="silu", backend="triton", cu_seqlens=cu)[
        0
    ]
    return y.reshape(B, T, C)


def fla_gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fla's fused ``rmsnorm(o) * weight * silu(z)`` over the last dim (``[..., Dv]``)."""
    _require()
    fn = _module("fla.modules.fused_norm_gate").rms_norm_gated
    return fn(x=o, g=z, weight=weight, bias=None, activation="swish", eps=eps)
