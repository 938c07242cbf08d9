"""Configuration arithmetic: sliding-window layer mapping, parameter counts and the ``no_global_rope`` rule."""

from __future__ import annotations

from reference.rope import layer_uses_rope


class ConfigurationError(Exception):
    """Mirror of OLMo-core's ``OLMoConfigurationError`` (an ``Exception``, not a ``ValueError``)."""


def window_for_layer(
    pattern: list[int], layer_idx: int, n_layers: int, force_first: bool = True, force_last: bool = True
) -> int:
    """Window size of layer ``layer_idx`` (``-1`` = full attention), exactly as OLMo-core's
    ``SlidingWindowAttentionConfig`` maps it:

    forced first/last layers are full; otherwise ``pattern[eff % len(pattern)]`` with
    ``eff = layer_idx - 1`` when the first layer is forced (else ``layer_idx``). A pattern entry
    ``<= 0`` other than ``-1`` raises :class:`ConfigurationError` when queried; an empty pattern
    raises ``ZeroDivisionError`` for any non-forced layer (as OLMo-core does).
    """
    if force_first and layer_idx == 0:
        return -1
    if force_last and layer_idx == n_layers - 1:
        return -1
    eff = layer_idx - 1 if force_first else layer_idx
    ws = pattern[eff % len(pattern)]
    if ws <= 0 and ws != -1:
        raise ConfigurationError(f"sliding window size must be positive or -1, got {ws} in pattern {pattern}")
    return ws


def window_tuple(window_size: int | None) -> tuple[int, int]:
    """User window ``w`` → backend tuple ``(w - 1, 0)``; ``None`` / ``-1`` → ``(-1, -1)``."""
    if window_size is None or window_size == -1:
        return (-1, -1)
    if window_size <= 0:
        raise ConfigurationError(f"window_size must be positive, got {window_size}")
    return (window_size - 1, 0)


def attention_layer_options(
    layer_idx: int,
    n_layers: int,
    *,
    rope: bool = False,
    no_global_rope: bool = False,
    sliding_window: dict | None = None,
) -> dict:
    """What ``AttentionConfig.build`` gives layer ``layer_idx`` (its per-layer window and RoPE choice).

    ``sliding_window``: ``{"pattern": [...], "force_full_attention_on_first_layer": bool,
    "force_full_attention_on_last_layer": bool}`` or ``None``. Returns
    ``{"window_size": int | None, "rope": bool}``; without any sliding-window config
    ``no_global_rope=True`` removes RoPE from every layer.
    """
    window = -1
    if sliding_window is not None:
        window = window_for_layer(
            sliding_window["pattern"],
            layer_idx,
            n_layers,
            sliding_window.get("force_full_attention_on_first_layer", True),
            sliding_window.get("force_full_attention_on_last_layer", True),
        )
    uses_swa = window != -1
    return {
        "window_size": window if uses_swa else None,
        "rope": rope and layer_uses_rope(no_global_rope=no_global_rope, uses_swa=uses_swa),
    }


def layernorm_num_params(
    size: int,
    *,
    name: str = "default",
    elementwise_affine: bool | None = None,
    bias: bool | None = None,
    eps=None,
    full_precision=None,
    dtype=None,
) -> int:
    """``LayerNormConfig.num_params(size)``: ``size·affine + size·(affine and bias)``; ``affine`` and
    ``bias`` default to ``name != "l2_norm"``. Other config fields (eps, dtype, ...) do not count."""
    affine = elementwise_affine if elementwise_affine is not None else name != "l2_norm"
    has_bias = bias if bias is not None else name != "l2_norm"
    return size * affine + size * (affine and has_bias)


def attention_num_params(
    d_model: int,
    *,
    name: str = "default",
    n_heads: int = 16,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    bias: bool | None = None,
    gate: dict | str | None = None,
    qk_norm: dict | None = None,
    use_head_qk_norm: bool | None = None,
    rope=None,
    clip_qkv=None,
    dropout=None,
    use_flash=None,
    backend=None,
    dtype=None,
    sliding_window=None,
) -> int:
    """``AttentionConfig.num_params(d_model)``.

    ``gate``: ``None``, a granularity string, or ``{"granularity": ..., ...}``; ``qk_norm``: ``None``
    or a dict of ``LayerNormConfig`` fields. ``rope`` … ``sliding_window`` carry no parameters.
    """
    H = n_heads
    Hkv = n_kv_heads or H
    D = head_dim or d_model // H
    bias = bias if bias is not None else name != "normalized"
    p = d_model * H * D + (H * D if bias else 0)
    p += 2 * d_model * Hkv * D + (2 * Hkv * D if bias else 0)
    if qk_norm is not None:
        if use_head_qk_norm:
            p += 2 * layernorm_num_params(D, **qk_norm)
        else:
            p += layernorm_num_params(H * D, **qk_norm) + layernorm_num_params(Hkv * D, **qk_norm)
    p += H * D * d_model + (d_model if bias else 0)
    if gate is not None:
        granularity = gate if isinstance(gate, str) else gate.get("granularity", "headwise")
        width = H if granularity == "headwise" else H * D
        p += d_model * width + (width if bias else 0)
    if name == "normalized":
        p += H * D + Hkv * D
    return p


def gdn_num_params(
    d_model: int,
    *,
    n_heads: int = 16,
    n_v_heads: int | None = None,
    head_dim: int | None = None,
    expand_v: float = 2.0,
    conv_size: int = 4,
    conv_bias: bool = False,
    allow_neg_eigval=None,
    norm_eps=None,
    dtype=None,
) -> int:
    """``GatedDeltaNetConfig.num_params(d_model)``."""
    HV = n_v_heads or n_heads
    Dk = head_dim or d_model // n_heads
    Dv = int(Dk * expand_v)
    K, V = n_heads * Dk, HV * Dv
    p = 2 * d_model * K + 2 * d_model * V + V * d_model + 2 * d_model * HV + 2 * HV
    p += conv_size * (2 * K + V) + (2 * K + V if conv_bias else 0)
    return p + Dv
