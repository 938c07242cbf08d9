"""Rotary position embeddings: configs, scaling schemes and the three modules.

Math (``r`` = rotary width ``int(D · partial_rotary_factor)``, ``θ`` = base)::

    inv_freq[i] = 1 / θ^(2i / r)                 i = 0 … r/2 − 1   (a scaling maps it)
    ang[p, i]   = p · inv_freq[i]                p = position

* ``default`` / ``fused`` (rotate-half, HF/NeoX layout): channel pairs ``(i, i + r/2)``;
  ``out = x · cos + rotate_half(x) · sin`` with ``cos = rescale · cos(cat(ang, ang))``.
* ``complex`` (interleaved, Meta layout): channel pairs ``(2i, 2i + 1)`` as complex numbers
  multiplied by ``exp(i · ang)``.

Channels ``[r, D)`` pass through. Positions: without ``start_pos`` queries are aligned to the end of
the keys; with ``start_pos`` (KV cache) both start there; with ``cu_doc_lens`` every document
restarts at 0. RoPE modules own no parameters and no buffers: their tables live in a
:class:`~olmo_attn.buffer_cache.BufferCache`.

Differences from OLMo-core (see ``docs/differences.md``): ``FusedRotaryEmbedding`` is pure PyTorch
(no flash-attn), ``ComplexRotaryEmbedding`` supports ``cu_doc_lens`` and half-precision inputs,
``float64`` inputs rotate with ``float64`` tables, and
:meth:`RotaryEmbedding.get_buffers_for_positions` / :func:`document_position_ids` build the
per-token rows that context parallelism shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .buffer_cache import BufferCache
from .config import Config, StrEnum
from .exceptions import ConfigurationError, ConfigValueError, InvalidInputError, InvalidInputTypeError
from .masks import validate_cu_seqlens

__all__ = [
    "ABFRoPEScalingConfig",
    "ComplexRotaryEmbedding",
    "FusedRotaryEmbedding",
    "PIRoPEScalingConfig",
    "RoPEBuffers",
    "RoPEConfig",
    "RoPEScalingConfig",
    "RoPEType",
    "RotaryEmbedding",
    "RotaryEmbeddingBase",
    "StepwiseRoPEScalingConfig",
    "YaRNRoPEScalingConfig",
    "compute_inv_freqs",
    "document_position_ids",
]


class RoPEType(StrEnum):
    """Which RoPE module :class:`RoPEConfig` builds."""

    default = "default"  # RotaryEmbedding
    fused = "fused"  # FusedRotaryEmbedding (packed qkv)
    complex = "complex"  # ComplexRotaryEmbedding


def compute_inv_freqs(
    theta: float, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[ceil(dim/2)]`` inverse frequencies ``1 / θ^(2i/dim)`` in ``dtype`` (float32 as OLMo-core)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=dtype) / dim))


def document_position_ids(cu_doc_lens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` int64 position of every flat token inside its document.

    ``cu_doc_lens`` (1-D, ``[0, …]``) segments ``total`` flattened tokens; token ``f`` of document
    ``d`` gets ``f − cu_doc_lens[d]``, so every document restarts at 0. Tokens past
    ``cu_doc_lens[-1]`` keep counting from it. Context parallelism shards these ids like the tokens
    and turns them into RoPE rows with :meth:`RotaryEmbedding.get_buffers_for_positions`.
    """
    if not isinstance(cu_doc_lens, torch.Tensor) or cu_doc_lens.dim() != 1 or cu_doc_lens.numel() < 1:
        raise ValueError(
            f"cu_doc_lens must be a 1-D tensor [n_docs + 1] starting at 0, got "
            f"{type(cu_doc_lens).__name__} {tuple(getattr(cu_doc_lens, 'shape', ()))}"
        )
    if cu_doc_lens.is_floating_point():
        raise TypeError(f"cu_doc_lens must be an integer tensor (int32), got {cu_doc_lens.dtype}")
    cu = cu_doc_lens.to(torch.int64)
    flat = torch.arange(total, device=cu.device, dtype=torch.int64)
    # [total] document of each token: bucketize(flat, cu[1:]) for sorted cu, without the slice
    # (Inductor's CUDA lowering of bucketize rejects a sliced boundaries tensor: "SliceView")
    doc = (torch.bucketize(flat, cu, right=True) - 1).clamp(min=0)
    return flat - cu[doc]


# ---------------------------------------------------------------------------------------------
# scaling configs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RoPEScalingConfig(Config):
    """A context-extension scheme: maps the inverse frequencies and gives a rescale factor."""

    _IGNORE_FIELDS: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def compute_scaled_inv_freq(
        self, theta: float, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, float]:
        """``(inv_freq [dim/2], rescale)`` for rotary width ``dim`` and base ``theta``."""
        raise NotImplementedError

    @abstractmethod
    def to_hf_config(self) -> dict:
        """The Hugging Face ``rope_scaling`` dict."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoPEScalingConfig:  # type: ignore[override]
        """Build the right subclass: from ``_CLASS_`` when present (OLMo-core's dicts), else from the
        field names (every subclass has a distinct field set)."""
        data = dict(data)
        class_path = data.pop(cls.CLASS_NAME_FIELD, None)
        target: type[RoPEScalingConfig] | None = None
        if class_path is not None:
            short = str(class_path).rsplit(".", 1)[-1]
            target = _SCALING_CLASSES.get(short)
            if target is None:
                raise ConfigurationError(
                    f"unknown RoPE scaling class {class_path!r}; expected one of {sorted(_SCALING_CLASSES)}"
                )
        elif cls is not RoPEScalingConfig:
            target = cls
        else:
            keys = set(data)
            fits = [
                c
                for c in _SCALING_CLASSES.values()
                if keys <= ({f.name for f in dataclasses.fields(c)} | set(c._IGNORE_FIELDS))
            ]
            exact = [c for c in fits if keys == {f.name for f in dataclasses.fields(c)}]
            if len(exact) == 1:
                target = exact[0]
            elif len(fits) == 1:
                target = fits[0]
            else:
                raise ConfigurationError(
                    f"cannot tell which RoPE scaling {sorted(keys)} describes "
                    f"(candidates: {[c.__name__ for c in fits] or sorted(_SCALING_CLASSES)}); "
                    f"add '{cls.CLASS_NAME_FIELD}': '<class name>' to the dict"
                )
        if cls is not RoPEScalingConfig and not issubclass(target, cls):
            raise ConfigurationError(f"{cls.__name__}.from_dict got a {target.__name__} dict")
        for ignored in target._IGNORE_FIELDS:
            data.pop(ignored, None)
        return Config.from_dict.__func__(target, data)  # type: ignore[attr-defined]


def _check_scaling_number(owner: str, name: str, value: Any, *, low: float, low_inclusive: bool) -> None:
    """Raise :class:`ConfigValueError` unless ``value`` is a finite number above ``low``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low)
    if not ok:
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ConfigValueError(f"{owner}.{name}={value!r} is invalid: it must be a finite number {bound}")


@dataclasses.dataclass
class ABFRoPEScalingConfig(RoPEScalingConfig):
    """Absolute base frequency: inverse frequencies from ``new_theta`` (the RoPE θ is ignored)."""

    attention_rescale_factor: float = 1.0
    new_theta: int = 8_000_000

    def __post_init__(self) -> None:
        _check_scaling_number(
            "ABFRoPEScalingConfig", "new_theta", self.new_theta, low=1.0, low_inclusive=False
        )
        _check_scaling_number(
            "ABFRoPEScalingConfig",
            "attention_rescale_factor",
            self.attention_rescale_factor,
            low=0.0,
            low_inclusive=False,
        )

    def compute_scaled_inv_freq(
        self, theta: float, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, float]:
        del theta
        return compute_inv_freqs(self.new_theta, dim, device, dtype), self.attention_rescale_factor

    def to_hf_config(self) -> dict:
        raise NotImplementedError(
            "ABF scaling has no Hugging Face rope_scaling equivalent: set the HF config's rope_theta "
            f"to new_theta={self.new_theta} instead"
        )


@dataclasses.dataclass
class PIRoPEScalingConfig(RoPEScalingConfig):
    """Position interpolation (HF ``"linear"``): inverse frequencies divided by ``factor``."""

    attention_rescale_factor: float = 1.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        _check_scaling_number("PIRoPEScalingConfig", "factor", self.factor, low=0.0, low_inclusive=False)
        _check_scaling_number(
            "PIRoPEScalingConfig",
            "attention_rescale_factor",
            self.attention_rescale_factor,
            low=0.0,
            low_inclusive=False,
        )

    def compute_scaled_inv_freq(
        self, theta: float, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, float]:
        inv_freq = compute_inv_freqs(theta, dim, device, dtype)
        if self.factor != 1.0:
            inv_freq = inv_freq / self.factor
        return inv_freq, self.attention_rescale_factor

    def to_hf_config(self) -> dict:
        return {"rope_type": "linear", "factor": self.factor}


@dataclasses.dataclass
class StepwiseRoPEScalingConfig(RoPEScalingConfig):
    """Llama-3.1 per-frequency scaling (HF ``"llama3"``), wavelengths ``λ = 2π / f``:

    low band (``λ > old/lf``) ``f / factor``; high band (``λ < old/hf``) unchanged; between them
    (bounds inclusive) ``(1 − w)·f/factor + w·f`` with ``w = (old/λ − lf) / (hf − lf)``,
    ``lf = 1/(1 − low_freq_proportion)``, ``hf = 1/high_freq_proportion``.
    """

    attention_rescale_factor: float = 1.0
    factor: float = 32.0
    low_freq_proportion: float = 0.0
    high_freq_proportion: float = 0.25
    old_context_len: int = 8192

    def _factors(self) -> tuple[float, float]:
        if not 0.0 <= self.low_freq_proportion < 1.0:
            raise ConfigurationError(
                f"StepwiseRoPEScalingConfig.low_freq_proportion={self.low_freq_proportion} must be in [0, 1)"
            )
        if self.high_freq_proportion <= 0.0:
            raise ConfigurationError(
                f"StepwiseRoPEScalingConfig.high_freq_proportion={self.high_freq_proportion} must be > 0"
            )
        return 1.0 / (1 - self.low_freq_proportion), 1.0 / self.high_freq_proportion

    def __post_init__(self) -> None:
        _check_scaling_number(
            "StepwiseRoPEScalingConfig", "factor", self.factor, low=0.0, low_inclusive=False
        )
        _check_scaling_number(
            "StepwiseRoPEScalingConfig", "old_context_len", self.old_context_len, low=0.0, low_inclusive=False
        )
        self._factors()

    def compute_scaled_inv_freq(
        self, theta: float, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, float]:
        inv_freq = compute_inv_freqs(theta, dim, device, dtype)
        low_freq_factor, high_freq_factor = self._factors()
        low_band_threshold = self.old_context_len / low_freq_factor
        high_band_threshold = self.old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # low band: fully scaled; high band: unchanged
        inv_freq = torch.where(wavelen > low_band_threshold, inv_freq / self.factor, inv_freq)
        # mid band: interpolated in inverse-frequency space
        interp_weight = (self.old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - interp_weight) * inv_freq / self.factor + interp_weight * inv_freq
        is_mid_band = (wavelen <= low_band_threshold) & (wavelen >= high_band_threshold)
        return torch.where(is_mid_band, smoothed, inv_freq), self.attention_rescale_factor

    def to_hf_config(self) -> dict:
        low_freq_factor, high_freq_factor = self._factors()
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "original_max_position_embeddings": self.old_context_len,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
        }


@dataclasses.dataclass
class YaRNRoPEScalingConfig(RoPEScalingConfig):
    """YaRN: blend of interpolated (``f / factor``) and original frequencies along a linear ramp
    between the dimensions given by ``beta_fast`` and ``beta_slow``; rescale
    ``0.1 · ln(factor) + 1`` (the "mscale"). The ramp's upper clamp is ``dim/2 − 1`` as in OLMo-core
    (HF clamps at ``dim − 1``)."""

    factor: float = 8.0
    beta_fast: int = 32
    beta_slow: int = 1
    old_context_len: int = 8192

    # older OLMo-core configs carry this field; its value is derived, so it is dropped on load
    _IGNORE_FIELDS: ClassVar[tuple[str, ...]] = ("attention_rescale_factor",)

    def __post_init__(self) -> None:
        for name in ("factor", "beta_fast", "beta_slow", "old_context_len"):
            _check_scaling_number(
                "YaRNRoPEScalingConfig", name, getattr(self, name), low=0.0, low_inclusive=False
            )

    def compute_scaled_inv_freq(
        self, theta: float, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, float]:
        extrapolation = compute_inv_freqs(theta, dim, device, dtype)
        interpolation = extrapolation / self.factor
        half_dim = extrapolation.shape[0]
        idx = torch.arange(half_dim, device=device, dtype=dtype)

        def dim_from_rot(n_rot: float) -> float:
            return dim * math.log(self.old_context_len / (n_rot * 2.0 * math.pi)) / (2.0 * math.log(theta))

        low = max(math.floor(dim_from_rot(self.beta_fast)), 0)
        high = min(math.ceil(dim_from_rot(self.beta_slow)), half_dim - 1)
        span = max(high - low, 1e-3)
        ramp = ((idx - low) / span).clamp_(0, 1)  # 0: extrapolation, 1: interpolation
        inv_freq = interpolation * ramp + extrapolation * (1.0 - ramp)
        return inv_freq, self.get_attention_rescale_factor()

    def get_attention_rescale_factor(self) -> float:
        """``0.1 · ln(factor) + 1`` (YaRN paper §3.4)."""
        return 0.1 * math.log(self.factor) + 1.0

    def to_hf_config(self) -> dict:
        return {
            "rope_type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.old_context_len,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "attention_factor": self.get_attention_rescale_factor(),
        }


_SCALING_CLASSES: dict[str, type[RoPEScalingConfig]] = {
    c.__name__: c
    for c in (ABFRoPEScalingConfig, PIRoPEScalingConfig, StepwiseRoPEScalingConfig, YaRNRoPEScalingConfig)
}


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RoPEConfig(Config):
    """Config of a RoPE module."""

    name: RoPEType = RoPEType.default
    theta: int = 500_000
    full_precision: bool = True
    no_global_rope: bool = False  # consumed by AttentionConfig.build only
    scaling: RoPEScalingConfig | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        self.name = RoPEType(self.name)  # ValueError naming the valid types

    def build(self, head_size: int, cache: BufferCache | None = None) -> RotaryEmbeddingBase:
        """Build the module for heads of width ``head_size``; buffers go to ``cache``."""
        kwargs: dict[str, Any] = self.as_dict(exclude_none=True, recurse=False)
        name = RoPEType(kwargs.pop("name"))
        kwargs.pop("no_global_rope")
        kwargs.update(head_size=head_size, cache=cache)
        cls: type[RotaryEmbeddingBase] = {
            RoPEType.default: RotaryEmbedding,
            RoPEType.fused: FusedRotaryEmbedding,
            RoPEType.complex: ComplexRotaryEmbedding,
        }[name]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigurationError(f"invalid options for '{name}' RoPEConfig: {e}") from e


@dataclasses.dataclass
class RoPEBuffers:
    """RoPE tables: ``pos_sin``/``pos_cos`` (default ``[L, r]``, fused ``[L, D/2]``) or complex
    ``freqs_cis [L, r/2]``; whichever the module uses."""

    pos_sin: torch.Tensor | None = None
    pos_cos: torch.Tensor | None = None
    freqs_cis: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
def _no_autocast(device_type: str) -> Any:
    """Autocast off on ``device_type`` (a no-op for devices without autocast, e.g. ``meta``)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _compute_dtype(dtype: torch.dtype, full_precision: bool) -> torch.dtype:
    """float32 or wider with ``full_precision`` (float64 stays float64), else the input dtype."""
    return torch.promote_types(dtype, torch.float32) if full_precision else dtype


def _table_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Tables are float32 (OLMo-core), float64 when rotating float64 tensors."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _doc_positions(cu_doc_lens: torch.Tensor, total: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """Validate ``cu_doc_lens`` over ``total`` flat tokens; return (longest document, ``[total]``
    per-document positions on ``device``)."""
    cu_host = validate_cu_seqlens(cu_doc_lens, "cu_doc_lens", total)
    longest = max(b - a for a, b in itertools.pairwise(cu_host))
    return longest, document_position_ids(cu_doc_lens.to(device), total)


def _start_int(start_pos: int | torch.Tensor | None) -> int | None:
    if start_pos is None:
        return None
    if isinstance(start_pos, torch.Tensor):
        if start_pos.numel() != 1 or start_pos.is_floating_point():
            raise TypeError(
                f"start_pos must be an int or a one-element integer tensor, got {start_pos.dtype} "
                f"{tuple(start_pos.shape)}"
            )
        return int(start_pos.item())
    if isinstance(start_pos, bool) or not isinstance(start_pos, int):
        raise TypeError(f"start_pos must be an int or a 0-dim integer tensor, got {start_pos!r}")
    if start_pos < 0:
        raise ValueError(f"start_pos={start_pos} must be >= 0")
    return start_pos


class RotaryEmbeddingBase(nn.Module):
    """Shared constructor and buffer-cache plumbing of the RoPE modules.

    Args:
        head_size: ``D``.
        theta: base ``θ``.
        full_precision: rotate in float32 (or wider) regardless of the input dtype.
        cache: shared :class:`BufferCache` (a private one when ``None``).
        scaling: optional :class:`RoPEScalingConfig`.
        partial_rotary_factor: rotate only the first ``int(D · factor)`` channels.
    """

    def __init__(
        self,
        *,
        head_size: int,
        theta: int = 500_000,
        full_precision: bool = True,
        cache: BufferCache | None = None,
        scaling: RoPEScalingConfig | None = None,
        partial_rotary_factor: float = 1.0,
    ):
        super().__init__()
        if head_size <= 0:
            raise ConfigurationError(f"RoPE head_size={head_size} must be positive")
        if theta <= 0:
            raise ConfigurationError(f"RoPE theta={theta} must be positive")
        if not 0.0 < partial_rotary_factor <= 1.0:
            raise ConfigurationError(f"partial_rotary_factor={partial_rotary_factor} must be in (0, 1]")
        self.dim = head_size
        self.rotary_dim = int(head_size * partial_rotary_factor)
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigurationError(
                f"RoPE rotates int(head_size * partial_rotary_factor) = int({head_size} * "
                f"{partial_rotary_factor}) = {self.rotary_dim} channels, which must be even and >= 2; "
                "choose a partial_rotary_factor that gives an even width"
            )
        self.theta = theta
        self.full_precision = full_precision
        self.scaling = scaling
        self.partial_rotary_factor = partial_rotary_factor
        # everything the tables depend on except dtype and device (those are in the keys): modules
        # sharing one cache share tables only when the tables are the same
        self._cache = (cache if cache is not None else BufferCache()).with_namespace(
            f"RoPE_theta={self.theta}_partial={partial_rotary_factor}_scaling={self.scaling!r}"
            f"_kind={type(self).__name__}_head_size={head_size}_rotary_dim={self.rotary_dim}"
        )

    def _inv_freq(self, dim: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        with _no_autocast(device.type):
            if self.scaling is None:
                return compute_inv_freqs(self.theta, dim, device, dtype), 1.0
            return self.scaling.compute_scaled_inv_freq(self.theta, dim, device, dtype)

    def _cached(self, keys: tuple[str, ...], rows: int, device: torch.device) -> list[torch.Tensor] | None:
        """Cached tables with at least ``rows`` rows, moved to ``device``; ``None`` on a miss."""
        found = [self._cache.get(k) for k in keys]
        if any(t is None or t.shape[0] < rows or t.shape[-1] != self._table_width() for t in found):
            return None
        return [self._cache.get_for_device(k, device) for k in keys]  # type: ignore[misc]

    @staticmethod
    def _key(name: str, dtype: torch.dtype, device: torch.device | None = None) -> str:
        """Cache key of table ``name``: float32 CPU tables keep OLMo-core's names; other dtypes and
        devices get their own entries (so a table is never moved back and forth between devices)."""
        key = name if dtype == torch.float32 else f"{name}_{str(dtype).replace('torch.', '')}"
        if device is not None and device.type != "cpu":
            index = device.index
            if index is None and device.type == "cuda" and torch.cuda.is_available():
                index = torch.cuda.current_device()
            key = f"{key}@{device.type}" + (f":{index}" if index is not None else "")
        return key

    def _table_width(self) -> int:
        """Last-dim width of this variant's tables (default: ``r``)."""
        return self.rotary_dim

    def _check_tables(
        self, pos_sin: Any, pos_cos: Any, ref: torch.Tensor, layout: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Check caller tables ``pos_sin, pos_cos [rows, width]`` for inputs like ``ref``; ``None``
        when neither is given. ``layout`` describes the expected table for the messages."""
        if pos_sin is None and pos_cos is None:
            return None
        if pos_sin is None or pos_cos is None:
            given, missing = ("pos_sin", "pos_cos") if pos_cos is None else ("pos_cos", "pos_sin")
            raise InvalidInputError(
                f"{given} was passed without {missing}; RoPE needs both pos_sin and pos_cos (e.g. from "
                f"rope.get_buffers(...)), or neither to use the module's own tables"
            )
        width = self._table_width()
        for name, t in (("pos_sin", pos_sin), ("pos_cos", pos_cos)):
            if not isinstance(t, torch.Tensor):
                raise InvalidInputTypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
            if not t.is_floating_point():
                raise InvalidInputTypeError(
                    f"{name} must be a real floating-point tensor {layout}, got dtype {t.dtype}"
                )
            if t.dim() != 2:
                raise InvalidInputError(
                    f"{name} must be 2-D {layout} (row = position, or local token under context "
                    f"parallelism), got shape {tuple(t.shape)}"
                )
            if t.shape[-1] != width:
                hint = ""
                if t.shape[-1] * 2 == width and type(self) is RotaryEmbedding:
                    hint = (
                        " (width D/2 is the fused RoPE layout; for partial rotary embeddings set "
                        "RoPEConfig(partial_rotary_factor=...) instead)"
                    )
                raise InvalidInputError(
                    f"{name} has width {t.shape[-1]} but this {type(self).__name__} (head_size={self.dim}, "
                    f"partial_rotary_factor={self.partial_rotary_factor}) needs {layout} with width "
                    f"{width}{hint}; build the rows with this module's get_buffers / "
                    "get_buffers_for_positions"
                )
            if t.device != ref.device:
                raise InvalidInputError(
                    f"{name} is on {t.device} but the inputs are on {ref.device}; pass {name}.to({str(ref.device)!r})"
                )
        if pos_sin.shape != pos_cos.shape:
            raise InvalidInputError(
                f"pos_sin {tuple(pos_sin.shape)} and pos_cos {tuple(pos_cos.shape)} must have the same shape"
            )
        return pos_sin, pos_cos

    def warmup_cache(self, max_seq_len: int, device: torch.device | str) -> None:
        """Compute and cache the tables for ``max_seq_len`` positions on ``device``."""
        self._get_rotary_embedding(max_seq_len, torch.device(device))

    @abstractmethod
    def _get_rotary_embedding(
        self, seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Any:
        """The cached table(s) for at least ``seq_len`` positions."""

    def get_buffers(self, max_seq_len: int, device: torch.device | str) -> RoPEBuffers:
        """The tables for positions ``[0, max_seq_len)`` on ``device`` (``pos_sin, pos_cos``; the complex
        variant overrides this with ``freqs_cis``)."""
        pos_sin, pos_cos = self._get_rotary_embedding(max_seq_len, torch.device(device))
        return RoPEBuffers(pos_sin=pos_sin, pos_cos=pos_cos)

    def get_buffers_for_positions(
        self, position_ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> RoPEBuffers:
        """Table rows for arbitrary positions: row ``j`` belongs to ``position_ids[j]`` (``[N]``).

        Context parallelism builds these rows from :func:`document_position_ids` (or any global
        positions) *before* sharding and passes the local rows to ``Attention.forward``.
        ``dtype``: table dtype (float32 as OLMo-core; float64 for float64 models).
        """
        device = torch.device(device)
        tables = list(self._get_rotary_embedding(self._need_rows(position_ids), device, dtype))
        pos_sin, pos_cos = self._gather_rows(tables, position_ids, device)
        return RoPEBuffers(pos_sin=pos_sin, pos_cos=pos_cos)

    def _gather_rows(
        self, tables: list[torch.Tensor], position_ids: torch.Tensor, device: torch.device
    ) -> list[torch.Tensor]:
        if position_ids.dim() != 1 or position_ids.is_floating_point():
            raise ValueError(
                f"position_ids must be a 1-D integer tensor [N], got {position_ids.dtype} "
                f"{tuple(position_ids.shape)}"
            )
        idx = position_ids.to(device=device, dtype=torch.int64)
        return [t.index_select(0, idx) for t in tables]

    @staticmethod
    def _need_rows(position_ids: torch.Tensor) -> int:
        if position_ids.numel() == 0:
            return 1
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0:
            raise ValueError(f"position_ids must be >= 0, got a minimum of {lo}")
        return hi + 1


class RotaryEmbedding(RotaryEmbeddingBase):
    """Rotate-half RoPE (``name="default"``) on ``q`` and ``k``; see the module docstring."""

    def _get_rotary_embedding(
        self, seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos_sin, pos_cos [seq_len, r]`` (rescaled), cached."""
        keys = (self._key("rope_pos_sin", dtype, device), self._key("rope_pos_cos", dtype, device))
        hit = self._cached(keys, seq_len, device)
        if hit is not None:
            return hit[0][:seq_len, :], hit[1][:seq_len, :]
        with _no_autocast(device.type):
            inv_freq, rescale = self._inv_freq(self.rotary_dim, device, dtype)
            seq = torch.arange(seq_len, device=device, dtype=dtype)
            freqs = torch.einsum("i , j -> i j", seq, inv_freq)  # [seq_len, r/2]
            positions = torch.cat((freqs, freqs), dim=-1)  # [seq_len, r]
            pos_sin, pos_cos = positions.sin() * rescale, positions.cos() * rescale
        self._cache[keys[0]] = pos_sin
        self._cache[keys[1]] = pos_cos
        return pos_sin, pos_cos

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        # [..., r] -> [..., r]: (x1, x2) -> (-x2, x1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def _apply_rotary_pos_emb(
        self, pos_sin: torch.Tensor, pos_cos: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        rotary_dim = pos_sin.shape[-1]
        if rotary_dim == t.shape[-1]:
            return ((t * pos_cos) + (self._rotate_half(t) * pos_sin)).to(t.dtype)
        t_rot, t_pass = t[..., :rotary_dim], t[..., rotary_dim:]
        t_rot = ((t_rot * pos_cos) + (self._rotate_half(t_rot) * pos_sin)).to(t.dtype)
        return torch.cat([t_rot, t_pass], dim=-1)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        head_first: bool = True,
        start_pos: int | torch.Tensor | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cu_doc_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k``.

        Args:
            q: ``[B, H, Tq, D]`` if ``head_first`` else ``[B, Tq, H, D]``.
            k: ``[B, H_kv, Tk, D]`` if ``head_first`` else ``[B, Tk, H_kv, D]``.
            start_pos: absolute position of the first new token (KV-cache decoding); an int or a
                0-dim integer tensor. Queries and keys then sit at ``start_pos + [0, T)``.
            pos_sin, pos_cos: caller tables ``[rows, r]`` (row = position, or under context
                parallelism row ``j`` = local token ``j``).
            cu_doc_lens: ``[n_docs + 1]`` int32 documents over the flattened ``B · T`` tokens;
                positions restart at 0 in every document (needs ``Tq == Tk``, no ``start_pos``).

        Returns:
            ``(q', k')`` with the inputs' shapes and dtypes.
        """
        if freqs_cis is not None:
            raise RuntimeError(f"'freqs_cis' is invalid for {type(self).__name__}; pass pos_sin/pos_cos")
        if cu_doc_lens is not None and start_pos is not None:
            raise RuntimeError("'cu_doc_lens' and 'start_pos' are mutually exclusive")
        self._check_tables(pos_sin, pos_cos, q, f"[rows, r={self.rotary_dim}]")
        seq_dim = 2 if head_first else 1
        q_len, k_len = q.size(seq_dim), k.size(seq_dim)
        compute_dtype = _compute_dtype(q.dtype, self.full_precision)
        q_, k_ = q.to(compute_dtype), k.to(compute_dtype)
        start = _start_int(start_pos)

        with _no_autocast(q.device.type):
            doc_pos: torch.Tensor | None = None
            if cu_doc_lens is not None:
                if q_len != k_len:
                    raise RuntimeError(
                        f"'cu_doc_lens' needs q_len == k_len (got {q_len} and {k_len}); per-document "
                        "positions are not defined for KV-cache decoding"
                    )
                need, doc_pos = _doc_positions(cu_doc_lens, q_.size(0) * k_len, q_.device)
            else:
                need = (start + k_len) if start is not None else k_len
            if pos_sin is None or pos_cos is None:
                pos_sin, pos_cos = self._get_rotary_embedding(need, q_.device, _table_dtype(compute_dtype))
            pos_sin, pos_cos = pos_sin.to(compute_dtype), pos_cos.to(compute_dtype)
            if pos_sin.size(-2) < need or pos_cos.size(-2) < need:
                raise RuntimeError(
                    f"RoPE buffers shorter than required: need {need} rows, have {pos_sin.size(-2)}"
                )

            if doc_pos is not None:
                B = q_.size(0)
                sin = pos_sin.index_select(0, doc_pos).view(B, k_len, -1)  # [B, T, r]
                cos = pos_cos.index_select(0, doc_pos).view(B, k_len, -1)
                head_axis = 1 if head_first else 2  # broadcast over heads
                sin, cos = sin.unsqueeze(head_axis), cos.unsqueeze(head_axis)
                q_ = self._apply_rotary_pos_emb(sin, cos, q_)
                k_ = self._apply_rotary_pos_emb(sin, cos, k_)
            else:
                q_start = start if start is not None else k_len - q_len
                k_start = start if start is not None else 0

                def bcast(t: torch.Tensor) -> torch.Tensor:  # [T, r] -> broadcastable over B, heads
                    return t[None, None, :, :] if head_first else t[None, :, None, :]

                q_ = self._apply_rotary_pos_emb(
                    bcast(pos_sin[q_start : q_start + q_len]), bcast(pos_cos[q_start : q_start + q_len]), q_
                )
                k_ = self._apply_rotary_pos_emb(
                    bcast(pos_sin[k_start : k_start + k_len]), bcast(pos_cos[k_start : k_start + k_len]), k_
                )
        return q_.type_as(q), k_.type_as(k)


class FusedRotaryEmbedding(RotaryEmbeddingBase):
    """Rotate-half RoPE on packed ``qkv [B, T, 3, H, D]`` (``name="fused"``), in pure PyTorch.

    Same math and tables (``pos_sin, pos_cos [L, D/2]``) as OLMo-core's flash-attn kernel, and the
    same in-place contract: when ``full_precision`` is ``False`` or ``qkv`` is already float32 (or
    float64), the q and k slices of the caller's ``qkv`` are overwritten and ``qkv`` itself is
    returned; otherwise a rotated copy is returned. ``partial_rotary_factor`` must be 1.
    """

    def __init__(
        self,
        *,
        head_size: int,
        theta: int = 500_000,
        full_precision: bool = True,
        cache: BufferCache | None = None,
        scaling: RoPEScalingConfig | None = None,
        partial_rotary_factor: float = 1.0,
    ):
        if partial_rotary_factor != 1.0:
            raise ConfigurationError(
                f"partial_rotary_factor={partial_rotary_factor} is not supported by FusedRotaryEmbedding; "
                "use name='default' RoPE (with Attention) for partial rotary embeddings"
            )
        super().__init__(
            head_size=head_size,
            theta=theta,
            full_precision=full_precision,
            cache=cache,
            scaling=scaling,
            partial_rotary_factor=partial_rotary_factor,
        )

    def _table_width(self) -> int:
        return self.dim // 2

    def _get_rotary_embedding(
        self, seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos_sin, pos_cos [L >= seq_len, D/2]`` (rescaled; unsliced when a longer copy is cached)."""
        keys = (self._key("rope_pos_sin", dtype, device), self._key("rope_pos_cos", dtype, device))
        hit = self._cached(keys, seq_len, device)
        if hit is not None:
            return hit[0], hit[1]
        with _no_autocast(device.type):
            inv_freq, rescale = self._inv_freq(self.dim, device, dtype)
            seq = torch.arange(seq_len, device=device, dtype=dtype)
            freqs = torch.einsum("i , j -> i j", seq, inv_freq)  # [seq_len, D/2]
            pos_sin, pos_cos = freqs.sin() * rescale, freqs.cos() * rescale
        self._cache[keys[0]] = pos_sin
        self._cache[keys[1]] = pos_cos
        return pos_sin, pos_cos

    def forward(
        self,
        qkv: torch.Tensor,
        start_pos: int | torch.Tensor | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cu_doc_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotate the q and k slices of ``qkv [B, T, 3, H, D]`` at positions ``start_pos + [0, T)``.

        ``pos_sin, pos_cos``: optional caller tables ``[rows >= start_pos + T, D/2]``.
        ``cu_doc_lens``: ``[n_docs + 1]`` int32 documents over the flattened ``B · T`` tokens;
        positions restart at 0 in every document (an extension: OLMo-core's kernel has no such
        argument). Returns ``[B, T, 3, H, D]`` in the input dtype (see the class docstring for
        in-place use).
        """
        if freqs_cis is not None:
            raise RuntimeError(f"'freqs_cis' is invalid for {type(self).__name__}; pass pos_sin/pos_cos")
        if cu_doc_lens is not None and start_pos is not None:
            raise RuntimeError("'cu_doc_lens' and 'start_pos' are mutually exclusive")
        if qkv.dim() != 5 or qkv.size(2) != 3:
            raise ValueError(f"qkv must be [B, T, 3, H, D], got shape {tuple(qkv.shape)}")
        if qkv.size(-1) != self.dim:
            raise ValueError(f"qkv head dim {qkv.size(-1)} differs from head_size={self.dim}")
        self._check_tables(pos_sin, pos_cos, qkv, f"[rows, D/2={self.dim // 2}]")
        compute_dtype = _compute_dtype(qkv.dtype, self.full_precision)
        qkv_ = qkv if compute_dtype == qkv.dtype else qkv.to(compute_dtype)
        offset = _start_int(start_pos) or 0
        B, T = qkv_.shape[:2]
        doc_pos: torch.Tensor | None = None
        need = T + offset
        if cu_doc_lens is not None:
            need, doc_pos = _doc_positions(cu_doc_lens, B * T, qkv_.device)
        with _no_autocast(qkv.device.type):
            if pos_sin is None or pos_cos is None:
                pos_sin, pos_cos = self._get_rotary_embedding(need, qkv_.device, _table_dtype(compute_dtype))
            if pos_sin.size(0) < need or pos_cos.size(0) < need:
                raise RuntimeError(
                    f"RoPE buffers shorter than required: need {need} rows, have {pos_sin.size(0)}"
                )
            if doc_pos is not None:
                # [B*T, D/2] -> [B, T, 1, 1, D] over (B, T, q|k, H, D)
                sin = pos_sin.index_select(0, doc_pos).view(B, T, -1).to(compute_dtype)
                cos = pos_cos.index_select(0, doc_pos).view(B, T, -1).to(compute_dtype)
                sin = torch.cat((sin, sin), dim=-1)[:, :, None, None, :]
                cos = torch.cat((cos, cos), dim=-1)[:, :, None, None, :]
            else:
                # [T, D/2] -> [1, T, 1, 1, D]
                sin = pos_sin[offset : offset + T].to(compute_dtype)
                cos = pos_cos[offset : offset + T].to(compute_dtype)
                sin = torch.cat((sin, sin), dim=-1)[None, :, None, None, :]
                cos = torch.cat((cos, cos), dim=-1)[None, :, None, None, :]
            qk = qkv_[:, :, :2]  # [B, T, 2, H, D]
            rotated = qk * cos + RotaryEmbedding._rotate_half(qk) * sin
            qkv_[:, :, :2] = rotated  # in place, like the flash-attn kernel
        return qkv_.type_as(qkv)


class ComplexRotaryEmbedding(RotaryEmbeddingBase):
    """Interleaved ("complex") RoPE (``name="complex"``): pairs ``(2i, 2i+1)`` rotated by
    ``exp(i·ang)``. Table ``freqs_cis [L, r/2]`` complex64 (complex128 for float64 inputs). No
    scaling. Unlike OLMo-core it accepts ``cu_doc_lens`` (per-document positions) and half
    precision inputs with ``full_precision=False`` (the rotation is written in real arithmetic)."""

    def __init__(
        self,
        *,
        head_size: int,
        theta: int = 500_000,
        full_precision: bool = True,
        cache: BufferCache | None = None,
        scaling: RoPEScalingConfig | None = None,
        partial_rotary_factor: float = 1.0,
    ):
        if scaling is not None:
            raise ConfigurationError(
                "scaling is not supported by ComplexRotaryEmbedding; use name='default' RoPE for "
                f"{type(scaling).__name__}"
            )
        super().__init__(
            head_size=head_size,
            theta=theta,
            full_precision=full_precision,
            cache=cache,
            scaling=scaling,
            partial_rotary_factor=partial_rotary_factor,
        )

    def _table_width(self) -> int:
        return self.rotary_dim // 2

    def _check_freqs_cis(self, freqs_cis: Any, ref: torch.Tensor) -> None:
        width = self._table_width()
        layout = f"[rows, r/2={width}] complex"
        if not isinstance(freqs_cis, torch.Tensor):
            raise InvalidInputTypeError(
                f"freqs_cis must be a torch.Tensor {layout}, got {type(freqs_cis).__name__}"
            )
        if not freqs_cis.is_complex():
            raise InvalidInputTypeError(
                f"freqs_cis must be a complex tensor {layout} (exp(i * angle)), got dtype {freqs_cis.dtype}; "
                "build it with get_buffers / get_buffers_for_positions"
            )
        if freqs_cis.dim() != 2 or freqs_cis.shape[-1] != width:
            raise InvalidInputError(
                f"freqs_cis has shape {tuple(freqs_cis.shape)} but this ComplexRotaryEmbedding "
                f"(head_size={self.dim}, partial_rotary_factor={self.partial_rotary_factor}) needs {layout}; "
                "build the rows with this module's get_buffers / get_buffers_for_positions"
            )
        if freqs_cis.device != ref.device:
            raise InvalidInputError(
                f"freqs_cis is on {freqs_cis.device} but the inputs are on {ref.device}; pass "
                f"freqs_cis.to({str(ref.device)!r})"
            )

    def get_buffers(self, max_seq_len: int, device: torch.device | str) -> RoPEBuffers:
        return RoPEBuffers(freqs_cis=self._get_rotary_embedding(max_seq_len, torch.device(device)))

    def get_buffers_for_positions(
        self, position_ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> RoPEBuffers:
        """``freqs_cis [N, r/2]`` (complex64; complex128 for ``dtype=float64``), row ``j`` for
        position ``position_ids[j]``."""
        device = torch.device(device)
        table = self._get_rotary_embedding(self._need_rows(position_ids), device, dtype)
        (rows,) = self._gather_rows([table], position_ids, device)
        return RoPEBuffers(freqs_cis=rows)

    def _get_rotary_embedding(
        self, seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``freqs_cis [seq_len, r/2]`` = ``exp(i·ang)``, cached."""
        key = self._key("rope_freqs_cis", dtype, device)
        hit = self._cached((key,), seq_len, device)
        if hit is not None:
            return hit[0][:seq_len, :]
        with _no_autocast(device.type):
            inv_freq = compute_inv_freqs(self.theta, self.rotary_dim, device, dtype)
            seq = torch.arange(seq_len, device=device, dtype=dtype)
            freqs = torch.einsum("i , j -> i j", seq, inv_freq)  # [seq_len, r/2]
            freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        self._cache[key] = freqs_cis
        return freqs_cis

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate pairs ``(2i, 2i+1)`` of ``x [..., r]`` by angles with ``cos, sin [..., r/2]``."""
        pairs = x.unflatten(-1, (-1, 2))  # [..., r/2, 2]
        a, b = pairs[..., 0], pairs[..., 1]
        # (a + ib)(c + is) = (ac − bs) + i(as + bc)
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def _rotate_complex(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        if r == x.shape[-1]:
            return self._rotate(x, cos, sin)
        return torch.cat([self._rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        head_first: bool = True,
        start_pos: int | torch.Tensor | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cu_doc_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` (``[B, H, Tq, D]`` / ``[B, Tq, H, D]``) and ``k`` likewise.

        ``freqs_cis``: optional caller table ``[rows, r/2]`` (complex). Positions as
        :meth:`RotaryEmbedding.forward` (including per-document positions with ``cu_doc_lens``).
        """
        if pos_sin is not None or pos_cos is not None:
            raise RuntimeError(
                f"'pos_sin' and 'pos_cos' are invalid for {type(self).__name__}; pass freqs_cis"
            )
        if cu_doc_lens is not None and start_pos is not None:
            raise RuntimeError("'cu_doc_lens' and 'start_pos' are mutually exclusive")
        if freqs_cis is not None:
            self._check_freqs_cis(freqs_cis, q)
        seq_dim = 2 if head_first else 1
        q_len, k_len = q.size(seq_dim), k.size(seq_dim)
        compute_dtype = _compute_dtype(q.dtype, self.full_precision)
        q_, k_ = q.to(compute_dtype), k.to(compute_dtype)
        start = _start_int(start_pos)

        with _no_autocast(q.device.type):
            doc_pos: torch.Tensor | None = None
            if cu_doc_lens is not None:
                if q_len != k_len:
                    raise RuntimeError(f"'cu_doc_lens' needs q_len == k_len (got {q_len} and {k_len})")
                need, doc_pos = _doc_positions(cu_doc_lens, q_.size(0) * k_len, q_.device)
            else:
                need = (start + k_len) if start is not None else k_len
            if freqs_cis is None:
                freqs_cis = self._get_rotary_embedding(need, q_.device, _table_dtype(compute_dtype))
            if freqs_cis.size(0) < need:
                raise RuntimeError(
                    f"RoPE buffer freqs_cis shorter than required: need {need} rows, have {freqs_cis.size(0)}"
                )
            cos_t, sin_t = freqs_cis.real.to(compute_dtype), freqs_cis.imag.to(compute_dtype)

            if doc_pos is not None:
                B = q_.size(0)
                cos = cos_t.index_select(0, doc_pos).view(B, k_len, -1)  # [B, T, r/2]
                sin = sin_t.index_select(0, doc_pos).view(B, k_len, -1)
                cos, sin = cos.unsqueeze(1 if head_first else 2), sin.unsqueeze(1 if head_first else 2)
                q_, k_ = self._rotate_complex(q_, cos, sin), self._rotate_complex(k_, cos, sin)
            else:
                q_start = start if start is not None else k_len - q_len
                k_start = start if start is not None else 0

                def bcast(t: torch.Tensor) -> torch.Tensor:
                    return t[None, None, :, :] if head_first else t[None, :, None, :]

                q_ = self._rotate_complex(
                    q_, bcast(cos_t[q_start : q_start + q_len]), bcast(sin_t[q_start : q_start + q_len])
                )
                k_ = self._rotate_complex(
                    k_, bcast(cos_t[k_start : k_start + k_len]), bcast(sin_t[k_start : k_start + k_len])
                )
        return q_.type_as(q), k_.type_as(k)
