"""Context parallelism: load balancers, styles, all-to-all transforms, ring attention, Ulysses.

* :mod:`.load_balancers` — zig-zag / llama3 / Ulysses sharding with exact inverses (pure functions).
* :mod:`.styles` — ``RingContextParallelStyle``, ``UlyssesContextParallelStyle``.
* :mod:`.all_to_all` — sequence-sharded ↔ head-sharded exchanges (autograd-aware).
* :mod:`.ring` — zig-zag and llama3 ring attention on any backend's LSE kernel.
* :mod:`.ulysses` — Ulysses attention on any backend.
* :mod:`.inputs` — sharding a batch with per-document RoPE rows; gathering outputs back.
* :mod:`.check` — the cross-rank check every CP call makes before its first collective
  (:class:`~olmo_attn.exceptions.CPInputMismatchError`; ``OLMO_ATTN_CP_CHECK=0`` turns it off).
"""

from ..exceptions import CPInputMismatchError
from .all_to_all import (
    all_to_all_cp2hp,
    all_to_all_hp2cp,
    all_to_all_single_cp2hp,
    all_to_all_single_cp2hp_qkvpacked,
    all_to_all_single_hp2cp,
    all_to_all_single_hp2cp_qkvpacked,
)
from .check import CHECK_ENV_VAR
from .errors import (
    ContextParallelError,
    ContextParallelInputError,
    ContextParallelUnsupportedError,
    CPDivisibilityError,
    ShardingArgumentError,
    ShardingError,
    ShardingNotSupportedError,
)
from .inputs import CPBatch, gather_sequence, rope_rows, shard_batch
from .load_balancers import (
    RingAttentionLlama3LoadBalancer,
    RingAttentionLoadBalancer,
    RingAttentionLoadBalancerType,
    RingAttentionZigZagLoadBalancer,
    UlyssesLoadBalancer,
)
from .ring import llama3_ring_attention, ring_attention, zigzag_ring_attention
from .styles import RingContextParallelStyle, UlyssesContextParallelStyle
from .ulysses import kv_replication_factor, ulysses_attention

__all__ = [
    "CHECK_ENV_VAR",
    "CPBatch",
    "CPDivisibilityError",
    "CPInputMismatchError",
    "ContextParallelError",
    "ContextParallelInputError",
    "ContextParallelUnsupportedError",
    "RingAttentionLlama3LoadBalancer",
    "RingAttentionLoadBalancer",
    "RingAttentionLoadBalancerType",
    "RingAttentionZigZagLoadBalancer",
    "RingContextParallelStyle",
    "ShardingArgumentError",
    "ShardingError",
    "ShardingNotSupportedError",
    "UlyssesContextParallelStyle",
    "UlyssesLoadBalancer",
    "all_to_all_cp2hp",
    "all_to_all_hp2cp",
    "all_to_all_single_cp2hp",
    "all_to_all_single_cp2hp_qkvpacked",
    "all_to_all_single_hp2cp",
    "all_to_all_single_hp2cp_qkvpacked",
    "gather_sequence",
    "kv_replication_factor",
    "llama3_ring_attention",
    "ring_attention",
    "rope_rows",
    "shard_batch",
    "ulysses_attention",
    "zigzag_ring_attention",
]
