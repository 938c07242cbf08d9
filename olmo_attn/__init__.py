"""olmo_attn: OLMo-core-compatible attention modules.

``from olmo_core.nn.attention import X`` becomes ``from olmo_attn import X``: same constructor
arguments, same ``state_dict`` keys, same outputs (differences: ``docs/differences.md``).
Backend classes (``TorchAttentionBackend``, ``FlashAttention2Backend``, …) and ``KVCacheManager``
are imported on first access, so optional packages are never imported eagerly.
"""

from typing import Any

from ._version import __version__ as __version__
from .attention import (
    Attention,
    AttentionConfig,
    AttentionType,
    FusedAttention,
    GateConfig,
    GateGranularity,
    NormalizedAttention,
    SlidingWindowAttentionConfig,
    to_olmo_core_config_dict,
)
from .backends import TABLE, AttentionBackend, AttentionBackendName, BackendSpec, Feature
from .buffer_cache import BufferCache
from .config import Config, DType, StrEnum
from .cp import (
    RingAttentionLlama3LoadBalancer,
    RingAttentionLoadBalancer,
    RingAttentionLoadBalancerType,
    RingAttentionZigZagLoadBalancer,
    RingContextParallelStyle,
    UlyssesContextParallelStyle,
    UlyssesLoadBalancer,
)
from .exceptions import (
    BackendUnavailableError,
    CompileLimitWarning,
    ConfigurationError,
    OLMoAttnError,
    OLMoConfigurationError,
    UnsupportedFeatureError,
)
from .mixer import SequenceMixer, SequenceMixerConfig
from .norm import (
    CuTeRMSNorm,
    FusedRMSNorm,
    L2Norm,
    LayerNorm,
    LayerNormConfig,
    LayerNormType,
    QwenRMSNorm,
    RMSNorm,
    l2_normalize,
)
from .ops.containment import fault_containment, fault_containment_enabled, set_fault_containment
from .recurrent import GatedDeltaNet, GatedDeltaNetConfig, GDNCache
from .rope import (
    ABFRoPEScalingConfig,
    ComplexRotaryEmbedding,
    FusedRotaryEmbedding,
    PIRoPEScalingConfig,
    RoPEBuffers,
    RoPEConfig,
    RoPEScalingConfig,
    RoPEType,
    RotaryEmbedding,
    StepwiseRoPEScalingConfig,
    YaRNRoPEScalingConfig,
    compute_inv_freqs,
    document_position_ids,
)

# name -> (module, attribute), imported on first access (PEP 562)
_LAZY: dict[str, tuple[str, str]] = {
    "KVCacheManager": (".kv_cache", "KVCacheManager"),
    "TorchAttentionBackend": (".backends.torch_backend", "TorchAttentionBackend"),
    "FlashAttention2Backend": (".backends.flash2", "FlashAttention2Backend"),
    "FlashAttention3Backend": (".backends.flash3", "FlashAttention3Backend"),
    "FlashAttention4Backend": (".backends.flash4", "FlashAttention4Backend"),
    "TEAttentionBackend": (".backends.te", "TEAttentionBackend"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'olmo_attn' has no attribute {name!r}")


__all__ = [
    "TABLE",
    "ABFRoPEScalingConfig",
    "Attention",
    "AttentionBackend",
    "AttentionBackendName",
    "AttentionConfig",
    "AttentionType",
    "BackendSpec",
    "BackendUnavailableError",
    "BufferCache",
    "CompileLimitWarning",
    "ComplexRotaryEmbedding",
    "Config",
    "ConfigurationError",
    "CuTeRMSNorm",
    "DType",
    "Feature",
    "FlashAttention2Backend",
    "FlashAttention3Backend",
    "FlashAttention4Backend",
    "FusedAttention",
    "FusedRMSNorm",
    "FusedRotaryEmbedding",
    "GDNCache",
    "GateConfig",
    "GateGranularity",
    "GatedDeltaNet",
    "GatedDeltaNetConfig",
    "KVCacheManager",
    "L2Norm",
    "LayerNorm",
    "LayerNormConfig",
    "LayerNormType",
    "NormalizedAttention",
    "OLMoAttnError",
    "OLMoConfigurationError",
    "PIRoPEScalingConfig",
    "QwenRMSNorm",
    "RMSNorm",
    "RingAttentionLlama3LoadBalancer",
    "RingAttentionLoadBalancer",
    "RingAttentionLoadBalancerType",
    "RingAttentionZigZagLoadBalancer",
    "RingContextParallelStyle",
    "RoPEBuffers",
    "RoPEConfig",
    "RoPEScalingConfig",
    "RoPEType",
    "RotaryEmbedding",
    "SequenceMixer",
    "SequenceMixerConfig",
    "SlidingWindowAttentionConfig",
    "StepwiseRoPEScalingConfig",
    "StrEnum",
    "TEAttentionBackend",
    "TorchAttentionBackend",
    "UlyssesContextParallelStyle",
    "UlyssesLoadBalancer",
    "UnsupportedFeatureError",
    "YaRNRoPEScalingConfig",
    "compute_inv_freqs",
    "document_position_ids",
    "fault_containment",
    "fault_containment_enabled",
    "l2_normalize",
    "set_fault_containment",
    "to_olmo_core_config_dict",
]
