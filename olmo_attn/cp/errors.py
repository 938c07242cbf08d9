"""Typed errors of the context-parallel package.

Each class also derives from the built-in exception OLMo-core raises in the same situation
(``AssertionError``, ``RuntimeError``, ``NotImplementedError``), so code written against OLMo-core's
behaviour keeps catching them, and from ``ValueError`` where the cause is a bad argument
(``docs/CONVENTIONS.md``). Every message names the argument, the value and the fix.
"""

from __future__ import annotations

from ..exceptions import OLMoAttnError, UnsupportedFeatureError


class ContextParallelError(OLMoAttnError):
    """Base class of every error raised by :mod:`olmo_attn.cp`."""


class ShardingArgumentError(ContextParallelError, AssertionError, ValueError):
    """Inconsistent sharding arguments (OLMo-core asserts): list lengths, sequence lengths."""


class ShardingError(ContextParallelError, RuntimeError, ValueError):
    """Inputs or document metadata that cannot be sharded as asked (OLMo-core: ``RuntimeError``)."""


class ShardingNotSupportedError(ContextParallelError, NotImplementedError):
    """A sharding call the chosen load balancer does not offer (llama3 without documents)."""


class CPDivisibilityError(ContextParallelError, ValueError):
    """Heads or sequence length not divisible by the context-parallel world size."""


class ContextParallelInputError(ContextParallelError, RuntimeError, ValueError):
    """Wrong tensors or metadata reached distributed attention (OLMo-core: ``RuntimeError``)."""


class ContextParallelUnsupportedError(ContextParallelError, UnsupportedFeatureError):
    """A feature the chosen context-parallel strategy cannot run; the message names the alternative."""


__all__ = [
    "CPDivisibilityError",
    "ContextParallelError",
    "ContextParallelInputError",
    "ContextParallelUnsupportedError",
    "ShardingArgumentError",
    "ShardingError",
    "ShardingNotSupportedError",
]
