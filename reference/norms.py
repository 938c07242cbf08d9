"""Normalisation layers used for QK-norm in NumPy float64.

All normalise over the last dimension (``x̄`` = mean, biased variance)::

    layer_norm:    y = (x − x̄) / sqrt(var(x) + eps) · w + b
    rms_norm:      y = x / sqrt(mean(x²) + eps) · w + b
    qwen_rms_norm: same as rms_norm (HF Qwen3 rounds n to the input dtype before the affine step;
                   in float64 that rounding is the identity)
    l2_norm:       y = x / ‖x‖₂            (no eps, no parameters; an all-zero row gives NaN)

``fused_rms`` and ``cute_rms`` are kernels for the ``rms`` math. OLMo-core's RMSNorm has a bias by
default (initialised to zeros). ``w`` / ``b`` are optional here: ``None`` means "not affine" /
"no bias".
"""

from __future__ import annotations

import numpy as np

NORM_KINDS = ("default", "rms", "qwen_rms", "cute_rms", "fused_rms", "l2_norm")


def _affine(y: np.ndarray, weight, bias) -> np.ndarray:
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm of ``x [..., N]`` with ``weight, bias [N]``."""
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return _affine((x - mean) / np.sqrt(var + eps), weight, bias)


def rms_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """RMSNorm of ``x [..., N]`` with ``weight, bias [N]`` (module default: bias present, zeros)."""
    x = np.asarray(x, np.float64)
    return _affine(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps), weight, bias)


def qwen_rms_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """Qwen3-style RMSNorm: identical to :func:`rms_norm` in float64."""
    return rms_norm(x, weight, bias, eps)


def l2_norm(x) -> np.ndarray:
    """``x / ‖x‖₂`` over the last dim of ``x [..., N]``; no eps (zero rows give NaN, as in OLMo-core)."""
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / np.sqrt((x * x).sum(-1, keepdims=True))


def norm(x, kind: str, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """Dispatch on ``kind`` (one of :data:`NORM_KINDS`) over the last dim of ``x``."""
    if kind == "default":
        return layer_norm(x, weight, bias, eps)
    if kind in ("rms", "cute_rms", "fused_rms"):
        return rms_norm(x, weight, bias, eps)
    if kind == "qwen_rms":
        return qwen_rms_norm(x, weight, bias, eps)
    if kind == "l2_norm":
        if weight is not None or bias is not None:
            raise ValueError("l2_norm has no parameters")
        return l2_norm(x)
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


def qk_norm(
    x,
    kind: str,
    weight=None,
    bias=None,
    eps: float = 1e-5,
    per_head: bool = False,
    head_dim: int | None = None,
) -> np.ndarray:
    """QK-norm of a projection ``x [B, T, H*D]`` (or ``[B, T, H, D]``), returned in the input shape.

    ``per_head=False``: one norm over all ``H*D`` channels (``weight, bias [H*D]``).
    ``per_head=True``: each head's ``D`` channels separately (``weight, bias [D]`` shared by heads);
    a flat ``[..., H*D]`` input then needs ``head_dim``.
    """
    x = np.asarray(x, np.float64)
    shape = x.shape
    if per_head:
        if x.ndim == 3:
            if head_dim is None:
                raise ValueError("per-head qk_norm of a [B, T, H*D] input needs head_dim")
            x = x.reshape(*shape[:-1], -1, head_dim)
        return norm(x, kind, weight, bias, eps).reshape(shape)
    if x.ndim == 4:
        x = x.reshape(*shape[:2], -1)
    return norm(x, kind, weight, bias, eps).reshape(shape)
