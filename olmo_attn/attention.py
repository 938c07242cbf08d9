"""Attention modules and their configs.

``Attention`` (MHA / GQA / MQA), ``FusedAttention`` (packed QKV) and ``NormalizedAttention`` (nGPT)
have OLMo-core's constructor arguments, ``forward`` signatures and parameter names and shapes, so a
``state_dict`` moves between the two libraries in both directions and identical weights give
identical outputs. ``AttentionConfig`` builds them per layer (sliding-window pattern,
``no_global_rope``) and is registered as ``"attention"`` in the ``SequenceMixerConfig`` registry.

Behaviour that deliberately differs from OLMo-core is listed in ``docs/differences.md``: the
headwise gate works with documents and ``B > 1``; ``cache_leftpad`` is tested with ``is not None``;
``n_heads % n_kv_heads`` and ``d_model % n_heads`` are checked at construction; the backend is
chosen from the capability table (never a silent CPU fallback of an explicitly requested GPU
backend); per-document RoPE is correct under context parallelism; complex RoPE takes documents;
``NormalizedAttention`` keeps bf16 activations in bf16.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from .backends.base import AttentionBackend, AttentionBackendName
from .backends.capabilities import Feature
from .buffer_cache import BufferCache
from .config import Config, DType, StrEnum
from .exceptions import ConfigurationError
from .masks import window_from_size
from .mixer import SequenceMixer, SequenceMixerConfig
from .norm import LayerNormConfig, l2_normalize
from .rope import (
    ComplexRotaryEmbedding,
    FusedRotaryEmbedding,
    RoPEConfig,
    RoPEType,
    RotaryEmbedding,
    document_position_ids,
)
from .validate import check_attention_inputs, empty_attention_output, is_empty_batch

if TYPE_CHECKING:
    from .kv_cache import KVCacheManager

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttentionType",
    "FusedAttention",
    "GateConfig",
    "GateGranularity",
    "NormalizedAttention",
    "SlidingWindowAttentionConfig",
    "to_olmo_core_config_dict",
]


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
# helpers
# ---------------------------------------------------------------------------------------------
def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _choice_dtype(param_dtype: torch.dtype) -> torch.dtype | None:
    """Activation dtype to choose a backend for: half-precision parameters mean half-precision
    activations; float32 parameters usually run under autocast, so the dtype is left open (the
    module re-chooses at the first forward if the activations turn out to be float32)."""
    return param_dtype if param_dtype in (torch.bfloat16, torch.float16) else None


def _resolve_backend_name(
    backend: AttentionBackendName | str | None, use_flash: bool | None
) -> AttentionBackendName | None:
    """Coerce ``backend`` and apply the deprecated ``use_flash`` alias (the first steps of backend selection)."""
    if backend is not None and not isinstance(backend, AttentionBackendName):
        try:
            backend = AttentionBackendName(backend)
        except ValueError:
            raise ConfigurationError(
                f"backend={backend!r} is not an attention backend; choose one of "
                f"{[b.value for b in AttentionBackendName]} (or None for automatic choice)"
            ) from None
    if use_flash:
        if backend is not None and backend != AttentionBackendName.flash_2:
            raise ConfigurationError(
                f"use_flash=True conflicts with backend='{backend}'; use_flash is a deprecated alias "
                "for backend='flash_2': drop use_flash"
            )
        if backend is None:
            warnings.warn(
                "'use_flash' is deprecated, use backend='flash_2' instead",
                DeprecationWarning,
                stacklevel=3,
            )
            backend = AttentionBackendName.flash_2
    return backend


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"{name}={value!r} must be a positive int")
    return value


def _init_linear(m: nn.Linear, std: float, generator: torch.Generator | None) -> None:
    """Truncated normal (mean 0, ``std``, cut at ±3·std) weight, zero bias; DTensor-aware."""
    _init_trunc_normal(m.weight, std, generator)
    if m.bias is not None:
        with torch.no_grad():
            m.bias.zero_()


def _init_trunc_normal(p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if not isinstance(p, DTensor):
            nn.init.trunc_normal_(p, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
            return
        # initialise the full tensor (same RNG draws as unsharded), then keep this rank's shard
        full = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        full = distribute_tensor(full, p.device_mesh, p.placements)  # rank 0's draw, sharded
        p.to_local().copy_(full.to_local())


def _init_method_name(init_method: Any) -> str:
    name = str(getattr(init_method, "value", init_method))
    valid = ("normal", "normalized", "llama", "llama_depth", "fan_in")
    if name not in valid:
        raise ValueError(f"init_method={init_method!r} is not one of {list(valid)}")
    return name


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


# where OLMo-core keeps the classes of our configs (for dicts that OLMo-core's from_dict reads)
OLMO_CORE_CLASS_PATHS: dict[str, str] = {
    **{
        n: f"olmo_core.nn.attention.{n}"
        for n in ("AttentionConfig", "SlidingWindowAttentionConfig", "GateConfig")
    },
    **{
        n: f"olmo_core.nn.rope.{n}"
        for n in (
            "RoPEConfig",
            "ABFRoPEScalingConfig",
            "PIRoPEScalingConfig",
            "StepwiseRoPEScalingConfig",
            "YaRNRoPEScalingConfig",
        )
    },
    "LayerNormConfig": "olmo_core.nn.layer_norm.LayerNormConfig",
}


def to_olmo_core_config_dict(config: Config) -> dict[str, Any]:
    """``config.as_config_dict()`` with every ``_CLASS_`` pointing at OLMo-core's class of the same
    name, so ``olmo_core``'s ``Config.from_dict`` rebuilds it as an OLMo-core config."""

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: rewrite(v) for k, v in value.items()}
            cls_path = out.get(Config.CLASS_NAME_FIELD)
            if isinstance(cls_path, str):
                short = cls_path.rsplit(".", 1)[-1]
                out[Config.CLASS_NAME_FIELD] = OLMO_CORE_CLASS_PATHS.get(short, cls_path)
            return out
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    return rewrite(config.as_config_dict())


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
            self.backend = _resolve_backend_name(self.backend, None)
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


# ---------------------------------------------------------------------------------------------
# backend ownership shared by the three modules
# ---------------------------------------------------------------------------------------------
class _BackendMixin:
    """Builds the backend, explicitly or by automatic choice, and re-chooses an automatically
    chosen backend when the actual inputs (device type / dtype) are outside its capabilities."""

    backend: AttentionBackend
    _backend_kwargs: dict[str, Any]
    _backend_features: tuple[Feature, ...]
    _backend_auto: bool

    def _setup_backend(
        self,
        name: AttentionBackendName | None,
        *,
        features: Iterable[Feature],
        param_dtype: torch.dtype,
        head_dim: int,
        **backend_kwargs: Any,
    ) -> None:
        from .backends.registry import select_backend

        self._backend_features = tuple(features)
        self._backend_kwargs = dict(head_dim=head_dim, **backend_kwargs)
        # a named backend that cannot run here falls back to the automatic choice with a warning
        # (OLMO_ATTN_STRICT_BACKEND=1: BackendUnavailableError); the choice is logged at INFO
        choice = select_backend(
            name,
            self._backend_features,
            device=_default_device(),
            dtype=_choice_dtype(param_dtype),
            head_dim=head_dim,
        )
        self._backend_auto = choice.auto
        self.backend = self._build_backend(AttentionBackendName(choice.name))

    def _build_backend(self, name: AttentionBackendName) -> AttentionBackend:
        name.assert_supported()  # BackendUnavailableError naming the package / hardware and the fix
        cls = name.get_class()
        for feature in self._backend_features:  # UnsupportedFeatureError naming backends that have it
            cls.assert_supports(feature)
        return name.build(**self._backend_kwargs)

    def _backend_for(self, x: torch.Tensor) -> AttentionBackend:
        """The backend to run ``x`` (activations, any layout) on; re-chooses an automatic one."""
        backend = self.backend
        if not self._backend_auto or backend.cp_enabled:
            return backend
        spec = backend.spec()
        if x.device.type in spec.devices and x.dtype in spec.dtypes:
            return backend
        from .backends.registry import choose_backend

        name = AttentionBackendName(
            choose_backend(
                self._backend_features,
                device=x.device,
                dtype=x.dtype,
                head_dim=self._backend_kwargs["head_dim"],
            )
        )
        new = self._build_backend(name)
        new.train(backend.training)
        self.backend = new
        return new


def _traced_rope_rows(
    rope: nn.Module, positions: torch.Tensor, n_rows: int, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """While ``torch.compile`` traces: the RoPE table rows of ``positions [N]`` (a device tensor,
    every value below ``n_rows``), as the ``pos_sin``/``pos_cos`` (or ``freqs_cis``) keywords of
    ``rope``; row ``j`` belongs to token ``j``. The same tables and rows the module builds itself
    from host positions, so the rotation is the same, without reading a position on the host."""
    from .rope import _compute_dtype, _table_dtype

    dtype = _table_dtype(_compute_dtype(x.dtype, rope.full_precision))
    tables = rope._get_rotary_embedding(n_rows, x.device, dtype)
    if isinstance(tables, torch.Tensor):  # complex RoPE: freqs_cis
        (rows,) = rope._gather_rows([tables], positions, x.device)
        return {"freqs_cis": rows}
    sin, cos = rope._gather_rows(list(tables), positions, x.device)
    return {"pos_sin": sin, "pos_cos": cos}


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
class Attention(_BackendMixin, SequenceMixer):
    """Multi-head self-attention with GQA / MQA, optional gate, QK-norm, RoPE, QKV clipping and
    sliding window. Always causal.

    Args (keyword-only):
        d_model: input / output width.
        n_heads: query heads ``H``.
        n_kv_heads: key/value heads ``H_kv`` (``None`` → ``H``; must divide ``H``).
        head_dim: ``D`` (``None`` → ``d_model // n_heads``, which must then divide exactly).
        bias: biases on every linear layer.
        gate: :class:`GateConfig` (creates ``w_g``).
        rope: :class:`RoPEConfig` (``default`` or ``complex``).
        clip_qkv: clamp q, k and v to ``[-clip_qkv, clip_qkv]``.
        qk_norm: :class:`LayerNormConfig` for ``q_norm`` / ``k_norm``.
        dropout: attention-probability dropout (training mode only).
        softmax_scale: ``None`` → ``1/sqrt(D)``.
        use_flash: deprecated alias for ``backend="flash_2"``.
        backend: an :class:`AttentionBackendName` (or its string); ``None`` chooses the fastest
            backend that supports this layer's features on this machine.
        window_size: sliding window ``w`` (keys visible per query, itself included).
        dtype: parameter dtype.
        init_device: parameter device (``"meta"`` allowed).
        cache: :class:`BufferCache` shared with RoPE and the backend.
        use_head_qk_norm: normalise each head over ``D`` instead of all heads jointly.

    State-dict keys: ``w_q.*``, ``w_k.*``, ``w_v.*``, ``w_out.*``, ``w_g.*`` (gate),
    ``q_norm.*`` / ``k_norm.*`` (QK-norm); RoPE, backend and KV cache hold no persistent state.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        gate: GateConfig | None = None,
        rope: RoPEConfig | None = None,
        clip_qkv: float | None = None,
        qk_norm: LayerNormConfig | None = None,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        use_flash: bool | None = None,
        backend: AttentionBackendName | str | None = None,
        window_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
        use_head_qk_norm: bool = False,
    ):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        _check_positive_int("n_kv_heads", self.n_kv_heads)
        if n_heads % self.n_kv_heads:
            raise ConfigurationError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; choose n_kv_heads "
                f"among {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}"
            )
        self.d_model = d_model
        if head_dim is not None:
            self.head_dim = _check_positive_int("head_dim", head_dim)
        else:
            if d_model % n_heads:
                raise ConfigurationError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}; set head_dim explicitly "
                    f"(e.g. head_dim={max(d_model // n_heads, 1)}) or choose n_heads dividing d_model"
                )
            self.head_dim = d_model // n_heads
        if not 0.0 <= dropout < 1.0:
            raise ConfigurationError(f"dropout={dropout} must be in [0, 1)")
        if clip_qkv is not None and not clip_qkv > 0:
            raise ConfigurationError(f"clip_qkv={clip_qkv} must be positive (or None for no clipping)")
        if softmax_scale is not None and not softmax_scale > 0:
            raise ConfigurationError(
                f"softmax_scale={softmax_scale} must be positive (or None for 1/sqrt(D))"
            )
        if gate is not None and not isinstance(gate, GateConfig):
            raise ConfigurationError(f"gate must be a GateConfig or None, got {type(gate).__name__}")

        H, Hkv, D = n_heads, self.n_kv_heads, self.head_dim
        factory = dict(dtype=dtype, device=init_device)
        self.w_q = nn.Linear(d_model, H * D, bias=bias, **factory)
        self.w_k = nn.Linear(d_model, Hkv * D, bias=bias, **factory)
        self.w_v = nn.Linear(d_model, Hkv * D, bias=bias, **factory)
        self.w_out = nn.Linear(H * D, d_model, bias=bias, **factory)

        self.gate = gate
        self.w_g: nn.Linear | None = None
        if gate is not None:
            width = H if GateGranularity(gate.granularity) == GateGranularity.headwise else H * D
            self.w_g = nn.Linear(d_model, width, bias=bias, **factory)

        self.clip_qkv = clip_qkv
        self.use_head_qk_norm = use_head_qk_norm
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if qk_norm is not None:
            q_size, k_size = (D, D) if use_head_qk_norm else (H * D, Hkv * D)
            self.q_norm = qk_norm.build(size=q_size, init_device=init_device)
            self.k_norm = qk_norm.build(size=k_size, init_device=init_device)

        self.rope: RotaryEmbedding | ComplexRotaryEmbedding | None = None
        if rope is not None:
            if RoPEType(rope.name) == RoPEType.fused:
                raise ConfigurationError(
                    f"fused RoPE is not compatible with {type(self).__name__}; use RoPEConfig(name='default') "
                    "(same math) or FusedAttention"
                )
            built = rope.build(D, cache=cache)
            assert isinstance(built, (RotaryEmbedding, ComplexRotaryEmbedding))
            self.rope = built

        name = _resolve_backend_name(backend, use_flash)
        self.window_size = window_size
        window_tuple = window_from_size(window_size)  # ConfigurationError for window <= 0
        features: list[Feature] = []
        if window_size is not None:
            features.append(Feature.sliding_window)
        if dropout > 0:
            features.append(Feature.dropout)
        self._setup_backend(
            name,
            features=features,
            param_dtype=dtype,
            head_dim=D,
            n_heads=H,
            n_kv_heads=Hkv,
            scale=softmax_scale,
            dropout_p=dropout,
            window_size=window_tuple,
            cache=cache,
        )
        self.kv_cache_manager: KVCacheManager | None = None

    @property
    def cp_enabled(self) -> bool:
        return self.backend.cp_enabled

    # ----- attention core -----------------------------------------------------------------------
    def sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the backend on ``q [B, T, H, D]``, ``k, v [B, T, H_kv, D]`` → ``[B, T, H, D]``.

        With a KV cache the leftpad is recorded first (when given) and the cache length advanced by
        ``T`` afterwards.
        """
        manager = self.kv_cache_manager
        if manager is not None and cache_leftpad is not None:
            manager.record_leftpad(cache_leftpad)
        att = self._backend_for(q)(
            (q, k, v),
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
            kv_cache_manager=manager,
        )
        if manager is not None:
            manager.update_seqlen(q.shape[1])
        return att

    def _apply_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        pos_sin: torch.Tensor | None,
        pos_cos: torch.Tensor | None,
        freqs_cis: torch.Tensor | None,
        cu_doc_lens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on ``q [B, T, H, D]``, ``k [B, T, H_kv, D]`` (with the CP fix)."""
        assert self.rope is not None
        if self.cp_enabled:
            if pos_sin is None and pos_cos is None and freqs_cis is None:
                raise RuntimeError(
                    "RoPE buffers must be passed through to attention after being properly sharded by "
                    "the context parallel load balancer (pos_sin/pos_cos, or freqs_cis for complex RoPE)"
                )
            # Under CP the passed rows are per local token (row j <-> local token j), already built
            # from per-document positions before sharding: cu_doc_lens must not re-index them.
            cu_doc_lens = None
        manager = self.kv_cache_manager
        if torch.compiler.is_compiling() and pos_sin is None and pos_cos is None and freqs_cis is None:
            # RoPE's own position handling reads the cache position / document offsets on the
            # host (a graph break, or a recompile per decode step): gather the rows on the device
            B, T = q.shape[:2]
            if manager is not None:
                positions = manager.position_counter.to(q.device) + torch.arange(T, device=q.device)
                # past the cache's end the KV write raises KVCacheOverflowError: clamp until then
                positions = positions.clamp(max=manager.max_seq_len - 1)
                return self.rope(
                    q, k, head_first=False, **_traced_rope_rows(self.rope, positions, manager.max_seq_len, q)
                )
            if cu_doc_lens is not None:
                positions = document_position_ids(cu_doc_lens.to(q.device), B * T)
                rows = _traced_rope_rows(self.rope, positions, B * T, q)
                qr, kr = self.rope(
                    q.reshape(1, B * T, *q.shape[2:]),
                    k.reshape(1, B * T, *k.shape[2:]),
                    head_first=False,
                    **rows,
                )
                return qr.view(q.shape), kr.view(k.shape)
        start_pos: int | torch.Tensor | None = None
        if manager is not None:
            # the host mirror of cache_seqlens avoids a device sync per layer and decode step
            start_pos = getattr(manager, "seqlen", None)
            if start_pos is None:
                start_pos = manager.current_position()
        return self.rope(
            q,
            k,
            head_first=False,
            start_pos=start_pos,
            pos_sin=pos_sin,
            pos_cos=pos_cos,
            freqs_cis=freqs_cis,
            cu_doc_lens=cu_doc_lens,
        )

    def _gate(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Gate ``att [B, T, H, D]`` with ``σ(w_g(x))`` (``x [B, T, d_model]``) → ``[B, T, H, D]``."""
        assert self.gate is not None and self.w_g is not None
        g = self.w_g(x)  # [B, T, H] or [B, T, H*D]
        if self.gate.full_precision:  # float32 or wider (float64 stays float64)
            g = g.to(torch.promote_types(g.dtype, torch.float32))
        gate = torch.sigmoid(g).to(att.dtype)
        if GateGranularity(self.gate.granularity) == GateGranularity.headwise:
            return att * gate.unsqueeze(-1)
        return (att.reshape(*att.shape[:2], -1) * gate).view(att.shape)

    def forward(
        self,
        x: torch.Tensor,
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``x [B, T, d_model]`` → ``[B, T, d_model]``.

        Args:
            cu_doc_lens: ``[n_docs + 1]`` int32 cumulative document lengths over the flattened
                ``B · T`` tokens; attention never crosses a document and RoPE positions restart
                in every document. ``max_doc_len`` is derived when omitted.
            cu_doc_lens_q, cu_doc_lens_k, max_doc_len_q, max_doc_len_k, local_k_slice: separate
                query/key segmentations (llama3 ring context parallelism).
            pos_sin, pos_cos (``[rows, r]``) / freqs_cis (``[rows, r/2]``, complex RoPE): RoPE rows;
                under context parallelism row ``j`` belongs to local token ``j``.
            cache_leftpad: ``[B]`` int32 left-padding per row for KV-cache prefill.

        Bad arguments raise :class:`~olmo_attn.exceptions.InvalidInputError` /
        :class:`~olmo_attn.exceptions.InvalidInputTypeError` (see :mod:`olmo_attn.validate`);
        ``B == 0`` or ``T == 0`` gives an empty ``[B, T, d_model]`` output.
        """
        local_k_slice = check_attention_inputs(
            self,
            x,
            proj=self.w_q,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
            cache_leftpad=cache_leftpad,
        )
        if is_empty_batch(x):
            return empty_attention_output(self, x, self.w_out)
        B, T, _ = x.shape
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # [B, T, H*D], [B, T, Hkv*D] x2

        if self.clip_qkv is not None:
            q.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
            k.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
            v.clamp_(min=-self.clip_qkv, max=self.clip_qkv)

        if not self.use_head_qk_norm:
            if self.q_norm is not None:
                q = self.q_norm(q)
            if self.k_norm is not None:
                k = self.k_norm(k)

        # -1: under tensor parallelism the local head counts are inferred
        q = q.view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = k.view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]

        if self.use_head_qk_norm:
            if self.q_norm is not None:
                q = self.q_norm(q)
            if self.k_norm is not None:
                k = self.k_norm(k)

        if self.rope is not None:
            q, k = self._apply_rope(
                q, k, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis, cu_doc_lens=cu_doc_lens
            )

        att = self.sdpa(
            q,
            k,
            v,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
            cache_leftpad=cache_leftpad,
        )  # [B, T, H, D] on every backend path
        if self.gate is not None:
            att = self._gate(x, att)
        return self.w_out(att.reshape(B, T, -1))

    # ----- parallelism ------------------------------------------------------------------------
    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        """Tensor parallelism over the 1-D ``tp_mesh``.

        The input is made replicated; ``w_q/w_k/w_v/w_g`` are column-parallel (each rank owns a
        contiguous block of heads, so ``n_heads`` and ``n_kv_heads`` must divide by the TP size);
        QK-norms run sequence-parallel with replicated parameters; ``w_out`` is row-parallel and
        its output is laid out as ``output_layout``. ``float8_enabled`` uses torchao's float8 styles.
        """
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import parallelize_module

        tp = tp_mesh.size()
        if self.n_heads % tp or self.n_kv_heads % tp:
            raise ConfigurationError(
                f"tensor parallelism of size {tp} needs n_heads={self.n_heads} and "
                f"n_kv_heads={self.n_kv_heads} divisible by {tp}"
            )
        rowwise, colwise, prepare_input = _tp_styles(float8_enabled)
        parallelize_module(
            self,
            device_mesh=tp_mesh,
            parallelize_plan=prepare_input(
                input_layouts=None if input_layout is None else (input_layout,),
                desired_input_layouts=(Replicate(),),
            ),
        )
        plan: dict[str, Any] = {
            # with a norm, keep whole feature vectors per token: sequence-sharded DTensor output
            "w_q": colwise(
                output_layouts=None if self.q_norm is None else Shard(1),
                use_local_output=self.q_norm is None,
            ),
            "w_k": colwise(
                output_layouts=None if self.k_norm is None else Shard(1),
                use_local_output=self.k_norm is None,
            ),
            "w_v": colwise(),
            "w_out": rowwise(output_layouts=output_layout, use_local_output=use_local_output),
        }
        if self.w_g is not None:
            plan["w_g"] = colwise()
        # full norm: output [B, T, E] sharded on E (-> heads after the view);
        # per-head norm: output [B, T, H, D] sharded on H
        if self.q_norm is not None:
            plan["q_norm"] = _sequence_parallel(Shard(2))
        if self.k_norm is not None:
            plan["k_norm"] = _sequence_parallel(Shard(2))
        parallelize_module(module=self, device_mesh=tp_mesh, parallelize_plan=plan)

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Context parallelism: delegated to the backend. The caller shards ``x``, the
        RoPE rows and the document metadata with the matching load balancer."""
        self.backend.apply_cp(cp_mesh, ring=ring, uly=uly)
        self._backend_auto = False  # the CP configuration is bound to this backend

    # ----- init / flops / kv cache -------------------------------------------------------------
    def init_weights(
        self,
        *,
        init_method: Any,
        d_model: int,
        block_idx: int,
        num_blocks: int,
        std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        """Truncated-normal init of the projections; norms keep ones/zeros.

        ``init_method``: ``"normal" | "normalized" | "llama" | "llama_depth" | "fan_in"`` (or
        OLMo-core's ``InitMethod``). Draw order (``w_q, w_k, w_v, w_g, w_out``) matches OLMo-core,
        so a shared ``generator`` gives identical weights.
        """
        method = _init_method_name(init_method)
        if method == "fan_in":
            for w in (self.w_q, self.w_k, self.w_v):
                _init_linear(w, w.in_features**-0.5, generator)
        else:
            if method == "normalized":
                std = d_model**-0.5
            for w in (self.w_q, self.w_k, self.w_v):
                _init_linear(w, std, generator)
        if self.w_g is not None:
            _init_linear(self.w_g, self.w_g.in_features**-0.5 if method == "fan_in" else std, generator)
        if method == "fan_in":
            out_std = self.w_out.in_features**-0.5
        elif method in ("llama", "normalized"):
            out_std = std / (2 * num_blocks) ** 0.5
        elif method == "llama_depth":
            out_std = std / (2 * (block_idx + 1)) ** 0.5
        else:
            out_std = std
        _init_linear(self.w_out, out_std, generator)

    def num_flops_per_token(self, seq_len: int) -> int:
        """``6 · params + 12 · H · D · L_eff`` with ``L_eff = min(window, seq_len)``."""
        param_flops = 6 * sum(p.numel() for p in self.parameters())
        effective = min(self.window_size, seq_len) if self.window_size is not None else seq_len
        return param_flops + 12 * self.n_heads * self.head_dim * effective

    def init_kv_cache_manager(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate a KV cache ``[batch_size, max_seq_len, H_kv, D]``; from now on every forward
        decodes against it (set ``kv_cache_manager = None`` to stop).

        ``dtype``: cache dtype; ``None`` → the parameter dtype, so cached decoding reproduces the
        cache-free forward (OLMo-core always uses bf16: pass ``torch.bfloat16`` for that).
        """
        from .kv_cache import KVCacheManager

        self.backend.assert_supports_kv_cache()
        self._backend_auto = False
        self.kv_cache_manager = KVCacheManager(
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            num_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            device=self.w_k.weight.device,
            dtype=dtype if dtype is not None else self.w_k.weight.dtype,
        )


def _sequence_parallel(output_layout: Any) -> Any:
    """torch's ``SequenceParallel`` (input sharded on the sequence, replicated parameters) whose
    output is re-laid-out as ``output_layout`` and returned as a local tensor."""
    from functools import partial

    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import SequenceParallel

    class _SequenceParallelTo(SequenceParallel):
        def __init__(self, layout: Any):
            super().__init__(sequence_dim=1, use_local_output=True)
            self.layout = layout

        @staticmethod
        def _to_layout(layout: Any, mod: nn.Module, outputs: Any, device_mesh: Any) -> torch.Tensor:
            if outputs.placements != (layout,):
                outputs = outputs.redistribute(placements=(layout,))
            return outputs.to_local()

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            return distribute_module(
                module,
                device_mesh,
                self._replicate_module_fn,
                partial(self._prepare_input_fn, self.sequence_sharding),
                partial(self._to_layout, self.layout),
            )

    return _SequenceParallelTo(output_layout)


def _tp_styles(float8_enabled: bool) -> tuple[Any, Any, Any]:
    """``(rowwise, colwise, prepare_module_input)`` parallel styles, float8 variants via torchao."""
    if not float8_enabled:
        from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

        return RowwiseParallel, ColwiseParallel, PrepareModuleInput
    try:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )
    except ImportError as e:
        raise ImportError(
            "float8_enabled=True needs torchao (pip install torchao); or call apply_tp(float8_enabled=False)"
        ) from e
    return Float8RowwiseParallel, Float8ColwiseParallel, PrepareFloat8ModuleInput


# ---------------------------------------------------------------------------------------------
# NormalizedAttention
# ---------------------------------------------------------------------------------------------
class NormalizedAttention(Attention):
    """nGPT attention (beta): no biases, QK-norm over all heads jointly (nGPT configs use
    ``LayerNormConfig(name="l2_norm")``), learned per-channel scales ``sq [H·D]`` / ``sk [H_kv·D]``
    (effective scale ``sq · sqrt(d_model)``, 1 at init) and softmax scale ``sqrt(D)``.

    Call :meth:`normalize_matrices` after every optimizer step. bf16 activations stay bf16 (the
    scales are cast to the activation dtype; OLMo-core promotes to float32).
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope: RoPEConfig | None = None,
        qk_norm: LayerNormConfig | None = None,
        use_flash: bool | None = None,
        backend: AttentionBackendName | str | None = None,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
    ):
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        super().__init__(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            rope=rope,
            qk_norm=qk_norm,
            use_flash=use_flash,
            backend=backend,
            softmax_scale=math.sqrt(d_model // n_heads),
            bias=False,
            dtype=dtype,
            init_device=init_device,
            cache=cache,
        )
        self.sq_init_value = 1.0
        self.sq_init_scaling = 1.0 / math.sqrt(d_model)
        self.sq = nn.Parameter(torch.empty(self.head_dim * self.n_heads, dtype=dtype, device=init_device))
        self.sk_init_value = 1.0
        self.sk_init_scaling = 1.0 / math.sqrt(d_model)
        self.sk = nn.Parameter(torch.empty(self.head_dim * self.n_kv_heads, dtype=dtype, device=init_device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``sq`` and ``sk`` to ``1/sqrt(d_model)`` everywhere (effective scale 1)."""
        with torch.no_grad():
            nn.init.ones_(self.sq)
            nn.init.ones_(self.sk)
            self.sq.mul_(self.sq_init_scaling)
            self.sk.mul_(self.sk_init_scaling)

    def forward(
        self,
        x: torch.Tensor,
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """nGPT attention over ``x [B, T, d_model]`` → ``[B, T, d_model]`` (arguments as
        :meth:`Attention.forward`; ``cache_leftpad`` is not supported)."""
        if cache_leftpad is not None:
            raise NotImplementedError(
                "cache_leftpad is not supported for the normalized attention variant; use Attention "
                "for left-padded KV-cache decoding"
            )
        local_k_slice = check_attention_inputs(
            self,
            x,
            proj=self.w_q,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
        )
        if is_empty_batch(x):
            return empty_attention_output(self, x, self.w_out)
        B, T, _ = x.shape
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # [B, T, H*D], [B, T, Hkv*D] x2
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)  # jointly over all heads (checkpoint-compatible with OLMo-core)
            k = self.k_norm(k)
        sq = (self.sq * (self.sq_init_value / self.sq_init_scaling)).to(q.dtype)  # [H*D]
        sk = (self.sk * (self.sk_init_value / self.sk_init_scaling)).to(k.dtype)  # [Hkv*D]
        q = sq.view(1, 1, -1) * q
        k = sk.view(1, 1, -1) * k
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self._apply_rope(
                q, k, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis, cu_doc_lens=cu_doc_lens
            )
        att = self.sdpa(
            q,
            k,
            v,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
        )  # [B, T, H, D]
        return self.w_out(att.reshape(B, T, -1))

    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        raise NotImplementedError("TP is not implemented for the normalized attention variant")

    @torch.no_grad()
    def normalize_matrices(self) -> None:
        """Unit-norm rows of ``w_q/w_k/w_v.weight`` (over ``d_model``, their input dim) and unit-norm
        columns of ``w_out.weight`` (over ``d_model``, its output dim); norm in float32, no eps."""
        for w in (self.w_q.weight, self.w_k.weight, self.w_v.weight):
            w.copy_(l2_normalize(w, dim=-1))
        self.w_out.weight.copy_(l2_normalize(self.w_out.weight, dim=0))


# ---------------------------------------------------------------------------------------------
# FusedAttention
# ---------------------------------------------------------------------------------------------
class FusedAttention(_BackendMixin, SequenceMixer):
    """Multi-head attention with one packed projection ``w_qkv``. MHA only
    (``D = d_model // n_heads``); RoPE must be ``name="fused"``; no gate, QK-norm, window or KV cache.

    ``w_qkv.weight [3·d_model, d_model]`` is ``cat([w_q, w_k, w_v])`` of an :class:`Attention`
    checkpoint. The backend is chosen automatically among those supporting packed QKV (OLMo-core
    requires flash_2); the torch backend runs it on CPU and GPU.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        bias: bool = True,
        rope: RoPEConfig | None = None,
        clip_qkv: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        backend: AttentionBackendName | str | None = None,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
    ):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ConfigurationError(
                f"FusedAttention needs d_model={d_model} divisible by n_heads={n_heads} (D = d_model // "
                "n_heads); use Attention with head_dim for other shapes"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigurationError(f"dropout={dropout} must be in [0, 1)")
        if clip_qkv is not None and not clip_qkv > 0:
            raise ConfigurationError(f"clip_qkv={clip_qkv} must be positive (or None for no clipping)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.clip_qkv = clip_qkv
        factory = dict(dtype=dtype, device=init_device)
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.w_out = nn.Linear(d_model, d_model, bias=bias, **factory)

        self.rope: FusedRotaryEmbedding | None = None
        if rope is not None:
            if RoPEType(rope.name) != RoPEType.fused:
                raise ConfigurationError(
                    f"FusedAttention needs RoPEConfig(name='fused'), got name='{rope.name}'"
                )
            built = rope.build(self.head_dim, cache=cache)
            assert isinstance(built, FusedRotaryEmbedding)
            self.rope = built

        features = [Feature.packed_qkv] + ([Feature.dropout] if dropout > 0 else [])
        self._setup_backend(
            _resolve_backend_name(backend, None),
            features=features,
            param_dtype=dtype,
            head_dim=self.head_dim,
            n_heads=n_heads,
            dropout_p=dropout,
            cache=cache,
        )

    @property
    def cp_enabled(self) -> bool:
        return self.backend.cp_enabled

    def forward(
        self,
        x: torch.Tensor,
        max_doc_len: int | None = None,
        cu_doc_lens: torch.Tensor | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``x [B, T, d_model]`` → ``[B, T, d_model]`` (note: ``max_doc_len`` comes
        before ``cu_doc_lens``, as in OLMo-core). ``pos_sin, pos_cos [rows, D/2]``: fused RoPE rows.
        Documents restart RoPE positions (OLMo-core refuses documents together with RoPE)."""
        if cache_leftpad is not None:
            raise NotImplementedError("FusedAttention has no KV cache (cache_leftpad); use Attention")
        check_attention_inputs(self, x, proj=self.w_qkv, cu_doc_lens=cu_doc_lens, max_doc_len=max_doc_len)
        if is_empty_batch(x):
            return empty_attention_output(self, x, self.w_out)
        B, T, _ = x.shape
        qkv = self.w_qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # [B, T, 3, H, D]
        if self.clip_qkv is not None:
            qkv.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
        if self.rope is not None:
            rope_docs = cu_doc_lens
            if self.cp_enabled:
                if pos_sin is None and pos_cos is None and freqs_cis is None:
                    raise RuntimeError(
                        "RoPE buffers must be passed through to attention after being properly sharded "
                        "by the context parallel load balancer"
                    )
                rope_docs = None  # rows are per local token (see Attention._apply_rope)
            if (
                torch.compiler.is_compiling()
                and rope_docs is not None
                and pos_sin is None
                and pos_cos is None
                and freqs_cis is None
            ):
                # per-document rows gathered on the device (see _traced_rope_rows)
                positions = document_position_ids(rope_docs.to(qkv.device), B * T)
                rows = _traced_rope_rows(self.rope, positions, B * T, qkv)
                qkv = self.rope(qkv.reshape(1, B * T, *qkv.shape[2:]), **rows).view(qkv.shape)
            else:
                qkv = self.rope(
                    qkv, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis, cu_doc_lens=rope_docs
                )
        att = self._backend_for(qkv)(qkv, cu_doc_lens=cu_doc_lens, max_doc_len=max_doc_len)  # [B, T, H, D]
        return self.w_out(att.reshape(B, T, -1))

    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        raise NotImplementedError("TP is not implemented for the fused attention variant; use Attention")

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Context parallelism: delegated to the backend."""
        self.backend.apply_cp(cp_mesh, ring=ring, uly=uly)
        self._backend_auto = False

    def init_weights(
        self,
        *,
        init_method: Any,
        d_model: int,
        block_idx: int,
        num_blocks: int,
        std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        """As :meth:`Attention.init_weights` with ``w_qkv`` drawn as one matrix."""
        method = _init_method_name(init_method)
        if method in ("fan_in", "normalized"):
            qkv_std = d_model**-0.5
        else:
            qkv_std = std
        if method == "normalized":
            std = d_model**-0.5
        _init_linear(self.w_qkv, qkv_std, generator)
        if method == "fan_in":
            out_std = self.w_out.in_features**-0.5
        elif method in ("llama", "normalized"):
            out_std = std / (2 * num_blocks) ** 0.5
        elif method == "llama_depth":
            out_std = std / (2 * (block_idx + 1)) ** 0.5
        else:
            out_std = std
        _init_linear(self.w_out, out_std, generator)

    def num_flops_per_token(self, seq_len: int) -> int:
        """``6 · params + 12 · H · D · seq_len``."""
        return 6 * sum(p.numel() for p in self.parameters()) + 12 * self.n_heads * self.head_dim * seq_len
