"""Configs of the attention modules: ``AttentionConfig`` (registered as ``"attention"`` in the
``SequenceMixerConfig`` registry), the sliding-window pattern, the gate, and the export of our
configs as dicts OLMo-core's ``from_dict`` reads."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..backends.base import AttentionBackendName
from ..buffer_cache import BufferCache
from ..config import Config, DType, StrEnum
from ..exceptions import ConfigurationError
from ..mixer import SequenceMixer, SequenceMixerConfig
from ..norm import LayerNormConfig
from ..rope import (
    RoPEConfig,
)
from .common import resolve_backend_name

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------
# small configs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SlidingWindowAttentionConfig(Config):
    """Per-layer sliding windows: ``pattern`` is cycled over the layers; ``-1`` = full attention.

    When the first layer is forced global, the pattern starts at layer 1. A pattern entry ``<= 0``
    other than ``-1``, or an empty pattern, raises :class:`ConfigurationError` when a layer that
    needs it is queried (typically at ``AttentionConfig.build``).
    """

    pattern: list[int]
    force_full_attention_on_first_layer: bool = True
    force_full_attention_on_last_layer: bool = True

    def _get_window_size(self, layer_idx: int, n_layers: int) -> int:
        if self.force_full_attention_on_first_layer and layer_idx == 0:
            return -1
        if self.force_full_attention_on_last_layer and layer_idx == n_layers - 1:
            return -1
        if len(self.pattern) == 0:
            raise ConfigurationError(
                "SlidingWindowAttentionConfig.pattern is empty; give at least one window size "
                "(a positive int, or -1 for full attention), e.g. pattern=[4096, 4096, 4096, -1]"
            )
        eff = layer_idx - 1 if self.force_full_attention_on_first_layer else layer_idx
        window_size = self.pattern[eff % len(self.pattern)]
        if isinstance(window_size, bool) or not isinstance(window_size, int):
            raise ConfigurationError(
                f"sliding window pattern entry {window_size!r} (layer {layer_idx}) must be an int"
            )
        if window_size <= 0 and window_size != -1:
            raise ConfigurationError(
                f"sliding window size {window_size} (layer {layer_idx}, pattern {self.pattern}) is invalid: "
                "a window must be positive, or -1 for full attention"
            )
        return window_size

    def should_use_swa(self, layer_idx: int, n_layers: int) -> bool:
        """Whether layer ``layer_idx`` of ``n_layers`` uses a sliding window."""
        return self._get_window_size(layer_idx, n_layers) != -1

    def get_window_size(self, layer_idx: int, n_layers: int) -> int:
        """The window of a sliding-window layer; ``ValueError`` for a full-attention layer."""
        window_size = self._get_window_size(layer_idx, n_layers)
        if window_size == -1:
            raise ValueError(
                f"layer {layer_idx} of {n_layers} uses full attention and has no window size; "
                "check should_use_swa() first"
            )
        return window_size


class GateGranularity(StrEnum):
    """Output-gate granularity."""

    headwise = "headwise"  # one gate per (token, head), broadcast over the head's D channels
    elementwise = "elementwise"  # one gate per (token, output channel)


@dataclasses.dataclass
class GateConfig(Config):
    """Sigmoid output gate ``att · σ(w_g(x))`` (``full_precision``: sigmoid in float32)."""

    granularity: GateGranularity = GateGranularity.headwise
    full_precision: bool = True

    def __post_init__(self) -> None:
        self.granularity = GateGranularity(self.granularity)


class AttentionType(StrEnum):
    """Which module :class:`AttentionConfig` builds."""

    default = "default"  # Attention
    fused = "fused"  # FusedAttention
    normalized = "normalized"  # NormalizedAttention


# ---------------------------------------------------------------------------------------------
# AttentionConfig
# ---------------------------------------------------------------------------------------------
# OLMo-core 3.x fields outside our API: accepted by from_dict at their inert values
_OLMO_CORE_EXTRA_FIELDS: dict[str, tuple[Any, ...]] = {
    "scalable_softmax": (False, None),
    "attention_sinks": (False, None),
    "qk_norm_per_head_gains": (False, None),
    "mxfp8_projections": (False, None),
    "mxfp8_qkv_projection": (False, None),
    "mxfp8_out_projection": (False, None),
    "mxfp8_save_qkv_for_backward": (False, None),
    "use_recompute_qkv_prep": (False, None, True),  # activation recomputation: no numerical effect
}


def to_olmo_core_config_dict(config: Config) -> dict[str, Any]:
    """``config.as_config_dict()``, whose ``_CLASS_`` entries already name OLMo-core's classes
    (:data:`olmo_attn.config.OLMO_CORE_CLASS_PATHS`), so ``olmo_core``'s ``Config.from_dict``
    rebuilds it as an OLMo-core config. Kept as the named exporter earlier releases documented."""
    return config.as_config_dict()


@SequenceMixerConfig.register("attention")
@dataclasses.dataclass
class AttentionConfig(SequenceMixerConfig["SequenceMixer"]):
    """Builds :class:`Attention`, :class:`FusedAttention` or :class:`NormalizedAttention`.

    ``None`` fields take the module's default. ``type`` is the registry discriminator
    (always ``"attention"``).
    """

    name: AttentionType = AttentionType.default
    n_heads: int = 16
    n_kv_heads: int | None = None
    head_dim: int | None = None
    bias: bool | None = None
    gate: GateConfig | None = None
    rope: RoPEConfig | None = None
    clip_qkv: float | None = None
    qk_norm: LayerNormConfig | None = None
    dropout: float | None = None
    use_flash: bool | None = None
    backend: AttentionBackendName | None = None
    dtype: DType = DType.float32
    sliding_window: SlidingWindowAttentionConfig | None = None
    use_head_qk_norm: bool | None = None
    type: str | None = dataclasses.field(default=None, kw_only=True)

    _registered_name: ClassVar[str]

    def __post_init__(self) -> None:
        self.name = AttentionType(self.name)  # ValueError naming the valid values
        if isinstance(self.dtype, torch.dtype):
            self.dtype = DType.from_pt(self.dtype)
        else:
            self.dtype = DType(self.dtype)
        if self.backend is not None:
            self.backend = resolve_backend_name(self.backend, None)
        if self.type is None:
            self.type = self._registered_name
        elif self.type != self._registered_name:
            raise ConfigurationError(
                f"AttentionConfig.type={self.type!r} must be {self._registered_name!r} (or unset)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:  # type: ignore[override]
        """Accepts our dicts and OLMo-core's (``_CLASS_``, ``type``, and OLMo-core 3.x fields at
        their disabled values; an enabled 3.x-only feature is a :class:`ConfigurationError`)."""
        data = dict(data)
        for key, inert in _OLMO_CORE_EXTRA_FIELDS.items():
            if key not in data:
                continue
            value = data.pop(key)
            if value not in inert:
                raise ConfigurationError(
                    f"AttentionConfig field {key}={value!r} (an OLMo-core 3.x feature) is not supported "
                    f"by olmo_attn; remove it or set it to {inert[0]!r}"
                )
        if data.get("name") == "fused_v2":
            raise ConfigurationError(
                "AttentionConfig name='fused_v2' (OLMo-core 3.x FusedAttentionV2) is not supported; "
                "use name='default' (same math) or name='fused' (packed w_qkv)"
            )
        return SequenceMixerConfig.from_dict.__func__(cls, data)  # type: ignore[attr-defined]

    def num_params(self, d_model: int) -> int:
        """Parameters of the built module."""
        n_heads = self.n_heads
        n_kv_heads = self.n_kv_heads or n_heads
        head_dim = self.head_dim or d_model // n_heads
        bias = self.bias if self.bias is not None else self.name != AttentionType.normalized

        params = d_model * n_heads * head_dim + (n_heads * head_dim if bias else 0)  # w_q
        params += 2 * d_model * n_kv_heads * head_dim + (2 * n_kv_heads * head_dim if bias else 0)  # w_k/v
        if self.qk_norm is not None:
            if self.use_head_qk_norm:
                params += 2 * self.qk_norm.num_params(head_dim)
            else:
                params += self.qk_norm.num_params(n_heads * head_dim)
                params += self.qk_norm.num_params(n_kv_heads * head_dim)
        params += n_heads * head_dim * d_model + (d_model if bias else 0)  # w_out
        if self.gate is not None:
            width = n_heads if self.gate.granularity == GateGranularity.headwise else n_heads * head_dim
            params += d_model * width + (width if bias else 0)  # w_g
        if self.name == AttentionType.normalized:
            params += n_heads * head_dim + n_kv_heads * head_dim  # sq, sk
        return params

    def build(
        self,
        d_model: int,
        *,
        layer_idx: int,
        n_layers: int,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
    ) -> SequenceMixer:
        """Build layer ``layer_idx`` of ``n_layers``. Invalid combinations raise
        :class:`ConfigurationError` naming the option."""
        kwargs: dict[str, Any] = self.as_dict(exclude_none=True, recurse=False)
        name = AttentionType(kwargs.pop("name"))
        kwargs.pop("type", None)
        sliding_window: SlidingWindowAttentionConfig | None = kwargs.pop("sliding_window", None)
        if sliding_window is not None and sliding_window.should_use_swa(layer_idx, n_layers):
            kwargs["window_size"] = sliding_window.get_window_size(layer_idx, n_layers)
        else:  # a global (full-attention) layer
            rope: RoPEConfig | None = kwargs.get("rope")
            if rope is not None and rope.no_global_rope:
                kwargs["rope"] = None
        kwargs.update(
            dtype=DType(kwargs.pop("dtype")).as_pt(), d_model=d_model, init_device=init_device, cache=cache
        )
        from .default import Attention  # the modules import this file
        from .fused import FusedAttention
        from .normalized import NormalizedAttention

        try:
            if name == AttentionType.default:
                return Attention(**kwargs)
            if name == AttentionType.fused:
                kwargs.pop("use_flash", None)
                if "window_size" in kwargs:
                    raise ConfigurationError(
                        f"layer {layer_idx} is a sliding-window layer but 'fused' attention has no window; "
                        "use name='default' or a sliding_window pattern of -1 for this layer"
                    )
                return FusedAttention(**kwargs)
            if name == AttentionType.normalized:
                if "window_size" in kwargs:
                    raise ConfigurationError(
                        f"layer {layer_idx} is a sliding-window layer but 'normalized' attention has no "
                        "window; drop sliding_window or use name='default'"
                    )
                return NormalizedAttention(**kwargs)
            raise NotImplementedError(name)
        except TypeError as e:
            raise ConfigurationError(
                f"invalid options for '{name}' AttentionConfig: {e}. Options each type takes: "
                "default: all; fused: no n_kv_heads/head_dim/gate/qk_norm/use_head_qk_norm/window; "
                "normalized: no head_dim/bias/gate/clip_qkv/dropout/use_head_qk_norm/window"
            ) from e
