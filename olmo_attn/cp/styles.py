"""Context-parallel styles: which strategy ``Attention.apply_cp`` / ``AttentionBackend.apply_cp`` runs."""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..exceptions import ConfigurationError
from .load_balancers import RingAttentionLoadBalancerType


@dataclasses.dataclass
class RingContextParallelStyle(Config):
    """Ring attention: heads stay whole, keys/values travel between the CP ranks.

    Attributes:
        load_balancer: ``zig_zag`` (K/V passed around the ring, causal work balanced) or ``llama3``
            (contiguous shards, K/V all-gathered; made for packed documents).
        head_stride: kv heads exchanged and computed per step of the llama3 variant (larger: fewer,
            bigger messages; smaller: less memory for the gathered K/V). Must divide ``n_kv_heads``.
    """

    load_balancer: RingAttentionLoadBalancerType = RingAttentionLoadBalancerType.zig_zag
    head_stride: int = 1

    def __post_init__(self) -> None:
        try:
            self.load_balancer = RingAttentionLoadBalancerType(self.load_balancer)
        except ValueError:
            raise ConfigurationError(
                f"load_balancer={self.load_balancer!r} is not one of "
                f"{[m.value for m in RingAttentionLoadBalancerType]}"
            ) from None
        if (
            isinstance(self.head_stride, bool)
            or not isinstance(self.head_stride, int)
            or self.head_stride < 1
        ):
            raise ConfigurationError(
                f"head_stride={self.head_stride!r} must be a positive int (a divisor of n_kv_heads)"
            )


@dataclasses.dataclass
class UlyssesContextParallelStyle(Config):
    """Ulysses: all-to-all from sequence-sharded to head-sharded, attention over the full sequence."""

    @property
    def load_balancer(self) -> RingAttentionLoadBalancerType:
        return RingAttentionLoadBalancerType.ulysses


__all__ = ["RingContextParallelStyle", "UlyssesContextParallelStyle"]
