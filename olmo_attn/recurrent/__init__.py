"""Gated DeltaNet: module + config, our chunked kernel, the decoding step, fla dispatch."""

from .chunked import DEFAULT_CHUNK_SIZE, chunk_gated_delta_rule
from .conv import CausalConv1d, causal_conv1d, causal_conv1d_step
from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, GatedRMSNorm, GDNBackendName, GDNCache
from .recurrent import gated_delta_rule_step, recurrent_gated_delta_rule

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CausalConv1d",
    "GDNBackendName",
    "GDNCache",
    "GatedDeltaNet",
    "GatedDeltaNetConfig",
    "GatedRMSNorm",
    "causal_conv1d",
    "causal_conv1d_step",
    "chunk_gated_delta_rule",
    "gated_delta_rule_step",
    "recurrent_gated_delta_rule",
]
