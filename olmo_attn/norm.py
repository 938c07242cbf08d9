"""Normalisation layers used for QK-norm (OLMo-core's ``LayerNormConfig`` kinds).

``LayerNormConfig(name=...)`` builds one of:

=============  ==================  ===============================================================
``name``       class               math over the last dim (``x̄`` mean, biased variance)
=============  ==================  ===============================================================
``default``    :class:`LayerNorm`  ``(x − x̄) / sqrt(var + eps) · w + b``
``rms``        :class:`RMSNorm`    ``x · rsqrt(mean(x²) + eps)``, then ``w·y + b``
``qwen_rms``   :class:`QwenRMSNorm` as ``rms`` but the normalised value is rounded to the input
                                   dtype before the affine step (HF Qwen3 rounding order)
``cute_rms``   :class:`CuTeRMSNorm` the ``rms`` math
``fused_rms``  :class:`FusedRMSNorm` the ``rms`` math
``l2_norm``    :class:`L2Norm`     ``x / ‖x‖₂`` (no eps, no parameters)
=============  ==================  ===============================================================

``CuTeRMSNorm`` and ``FusedRMSNorm`` keep OLMo-core's names, constructor checks and parameters, but
run the same math as :class:`RMSNorm` in plain PyTorch on every device (no QuACK / flash-attn
kernel, so no optional package is needed); ``torch.compile`` fuses it.

Precision: with ``full_precision=True`` the computation runs in ``float32`` *or wider*: a
``float64`` input is normalised in ``float64`` (OLMo-core would round it through ``float32``).
Autocast is disabled inside; the output has the input's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, DType, StrEnum
from .exceptions import ConfigurationError

__all__ = [
    "CuTeRMSNorm",
    "FusedRMSNorm",
    "L2Norm",
    "LayerNorm",
    "LayerNormConfig",
    "LayerNormType",
    "QwenRMSNorm",
    "RMSNorm",
    "l2_normalize",
]


def _compute_dtype(dtype: torch.dtype, full_precision: bool) -> torch.dtype:
    """``float32`` or wider when ``full_precision`` (float64 stays float64), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32) if full_precision else dtype


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / ‖x‖₂`` along ``dim``; the norm is computed in float32 or wider and cast back.

    No epsilon (OLMo-core semantics): an all-zero vector gives NaN.
    """
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_compute_dtype(x.dtype, True))
    return x / norm.type_as(x)


class LayerNormType(StrEnum):
    """Which normalisation :class:`LayerNormConfig` builds."""

    default = "default"
    rms = "rms"
    qwen_rms = "qwen_rms"
    cute_rms = "cute_rms"
    fused_rms = "fused_rms"
    l2_norm = "l2_norm"


@dataclasses.dataclass
class LayerNormConfig(Config):
    """Config of a normalisation layer; ``None`` fields take the class default.

    Class defaults: ``eps=1e-5``, ``elementwise_affine=True``, ``bias=True`` (ignored when not
    affine), ``full_precision=True``, ``dtype=float32`` (parameter dtype). ``l2_norm`` takes no
    option at all: setting any field on an ``l2_norm`` config is a :class:`ConfigurationError`.
    """

    name: LayerNormType = LayerNormType.default
    eps: float | None = None
    elementwise_affine: bool | None = None
    bias: bool | None = None
    full_precision: bool | None = None
    dtype: DType | None = None

    def __post_init__(self) -> None:
        self.name = LayerNormType(self.name)  # ValueError naming the valid types
        if isinstance(self.dtype, torch.dtype):
            self.dtype = DType.from_pt(self.dtype)
        elif self.dtype is not None:
            self.dtype = DType(self.dtype)

    def num_params(self, size: int) -> int:
        """Parameters of the built layer for a normalised width ``size``."""
        affine = (
            self.elementwise_affine
            if self.elementwise_affine is not None
            else self.name != LayerNormType.l2_norm
        )
        bias = self.bias if self.bias is not None else self.name != LayerNormType.l2_norm
        return size * int(affine) + size * int(affine and bias)

    def build(self, size: int, init_device: str | torch.device = "cpu") -> nn.Module:
        """Build the layer for a normalised width ``size`` with parameters on ``init_device``."""
        kwargs: dict[str, Any] = self.as_dict(exclude_none=True, recurse=False)
        name = LayerNormType(kwargs.pop("name"))
        if "dtype" in kwargs:
            kwargs["dtype"] = DType(kwargs["dtype"]).as_pt()
        classes: dict[LayerNormType, type[nn.Module]] = {
            LayerNormType.default: LayerNorm,
            LayerNormType.rms: RMSNorm,
            LayerNormType.qwen_rms: QwenRMSNorm,
            LayerNormType.cute_rms: CuTeRMSNorm,
            LayerNormType.fused_rms: FusedRMSNorm,
        }
        try:
            if name == LayerNormType.l2_norm:
                return L2Norm(size=size, **kwargs)
            return classes[name](size=size, init_device=init_device, **kwargs)
        except TypeError as e:
            raise ConfigurationError(
                f"invalid options for '{name}' LayerNormConfig: {e}. "
                + (
                    "l2_norm has no options: leave eps/elementwise_affine/bias/full_precision/dtype unset"
                    if name == LayerNormType.l2_norm
                    else "see LayerNormConfig's fields"
                )
            ) from e


class _AffineNorm(nn.Module):
    """Shared constructor: ``weight [size]`` (ones) and ``bias [size]`` (zeros) when affine."""

    def __init__(
        self,
        *,
        size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        full_precision: bool = True,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
    ):
        super().__init__()
        if size <= 0:
            raise ConfigurationError(f"norm size={size} must be positive")
        self.normalized_shape = (size,)
        self.eps = eps
        self.full_precision = full_precision
        if elementwise_affine:
            self.weight: nn.Parameter | None = nn.Parameter(
                torch.empty(self.normalized_shape, dtype=dtype, device=init_device)
            )
            self.bias: nn.Parameter | None = (
                nn.Parameter(torch.empty(self.normalized_shape, dtype=dtype, device=init_device))
                if bias
                else None
            )
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight to ones, bias to zeros."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, full_precision={self.full_precision}"


class LayerNorm(_AffineNorm):
    """Layer normalisation over the last dimension. ``x [..., size]`` → same shape and dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(enabled=False, device_type=x.device.type):
            og_dtype = x.dtype
            x = x.to(_compute_dtype(og_dtype, self.full_precision))
            x = F.layer_norm(
                x,
                self.normalized_shape,
                weight=None if self.weight is None else self.weight.type_as(x),
                bias=None if self.bias is None else self.bias.type_as(x),
                eps=self.eps,
            )
            return x.to(og_dtype)


class RMSNorm(_AffineNorm):
    """RMS normalisation over the last dimension (with a bias by default, as OLMo-core).

    ``x [..., size]`` → same shape and dtype: ``y = x · rsqrt(mean(x²) + eps)``, then ``w·y + b``.
    """

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # [..., size] in the compute dtype
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(enabled=False, device_type=x.device.type):
            og_dtype = x.dtype
            x = self._normalize(x.to(_compute_dtype(og_dtype, self.full_precision)))
            if self.weight is not None:
                if self.bias is not None:
                    x = self.weight.type_as(x) * x + self.bias.type_as(x)
                else:
                    x = self.weight.type_as(x) * x
            return x.to(og_dtype)


class QwenRMSNorm(RMSNorm):
    """RMSNorm with HF Qwen3's rounding order: normalise in full precision, cast to the input
    dtype, then apply ``w`` (and ``b``) in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(enabled=False, device_type=x.device.type):
            og_dtype = x.dtype
            x = self._normalize(x.to(_compute_dtype(og_dtype, self.full_precision))).to(og_dtype)
            if self.weight is not None:
                x = x * self.weight.type_as(x)
            if self.bias is not None:
                x = x + self.bias.type_as(x)
            return x


class CuTeRMSNorm(RMSNorm):
    """OLMo-core's QuACK-kernel RMSNorm; here the :class:`RMSNorm` math in PyTorch (no ``quack``
    needed). As in OLMo-core, ``full_precision=False`` is refused."""

    def __init__(
        self,
        *,
        size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        full_precision: bool = True,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
    ):
        if not full_precision:
            raise NotImplementedError(
                "CuTeRMSNorm always computes in full precision: set full_precision=True "
                "(or use name='rms' with full_precision=False)"
            )
        super().__init__(
            size=size,
            eps=eps,
            elementwise_affine=elementwise_affine,
            bias=bias,
            full_precision=full_precision,
            dtype=dtype,
            init_device=init_device,
        )


class FusedRMSNorm(RMSNorm):
    """OLMo-core's flash-attn Triton RMSNorm; here the :class:`RMSNorm` math in PyTorch (no
    ``flash-attn`` needed). As in OLMo-core, it must be affine and full precision."""

    def __init__(
        self,
        *,
        size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        full_precision: bool = True,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
    ):
        if not elementwise_affine:
            raise NotImplementedError(
                "FusedRMSNorm needs elementwise_affine=True (use name='rms' for a non-affine RMSNorm)"
            )
        if not full_precision:
            raise NotImplementedError(
                "FusedRMSNorm needs full_precision=True (use name='rms' with full_precision=False)"
            )
        super().__init__(
            size=size,
            eps=eps,
            elementwise_affine=elementwise_affine,
            bias=bias,
            full_precision=full_precision,
            dtype=dtype,
            init_device=init_device,
        )


class L2Norm(nn.Module):
    """``x / ‖x‖₂`` over the last dimension; no parameters, no epsilon; ``size`` is ignored.

    ``x [..., N]`` → same shape and dtype (the norm is computed in float32 or wider).
    """

    def __init__(self, *, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(x, dim=-1)

    def reset_parameters(self) -> None:
        """Nothing to reset (no parameters)."""
