"""Attention modules and their configs (the package OLMo-core calls ``olmo_core.nn.attention``).

``Attention`` (MHA / GQA / MQA, :mod:`.default`), ``NormalizedAttention`` (nGPT,
:mod:`.normalized`) and ``FusedAttention`` (packed QKV, :mod:`.fused`) have OLMo-core's
constructor arguments, ``forward`` signatures and parameter names and shapes, so a ``state_dict``
moves between the two libraries in both directions and identical weights give identical outputs.
``AttentionConfig`` (:mod:`.config`) builds them per layer (sliding-window pattern,
``no_global_rope``) and is registered as ``"attention"`` in the ``SequenceMixerConfig`` registry;
:mod:`.common` holds what the three share (argument checks, initialisation, backend ownership).

Behaviour that deliberately differs from OLMo-core is listed in ``docs/differences.md``: the
headwise gate works with documents and ``B > 1``; ``cache_leftpad`` is tested with ``is not None``;
``n_heads % n_kv_heads`` and ``d_model % n_heads`` are checked at construction; the backend is
chosen from the capability table (a named backend that cannot run here falls back with a
warning, never silently); per-document RoPE is correct under context parallelism; complex RoPE
takes documents; ``NormalizedAttention`` keeps bf16 activations in bf16.
"""

from __future__ import annotations

from .config import (
    AttentionConfig,
    AttentionType,
    GateConfig,
    GateGranularity,
    SlidingWindowAttentionConfig,
    to_olmo_core_config_dict,
)
from .default import Attention
from .fused import FusedAttention
from .normalized import NormalizedAttention

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
