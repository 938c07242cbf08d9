"""Error types. Every message names the argument, the value and the fix."""

from __future__ import annotations


class OLMoAttnError(Exception):
    """Base class of this library's own errors."""


class ConfigurationError(OLMoAttnError):
    """An invalid configuration (the equivalent of OLMo-core's ``OLMoConfigurationError``)."""


OLMoConfigurationError = ConfigurationError


class ConfigValueError(ConfigurationError, ValueError):
    """A config field (or argument) holds a value outside its valid set or range."""


class InvalidEnumValueError(ConfigValueError):
    """A string that is not a value of the enum it must convert to; the message lists the valid values.

    Attributes:
        enum_cls: the enum class; ``value``: the rejected value; ``field``: the config field, once known.
    """

    def __init__(self, message: str, *, enum_cls: type, value: object, field: str | None = None) -> None:
        super().__init__(message)
        self.enum_cls = enum_cls
        self.value = value
        self.field = field


class InvalidInputError(OLMoAttnError, ValueError):
    """A forward argument with the wrong shape, device or value; names the argument."""


class CPInputMismatchError(InvalidInputError):
    """Context-parallel ranks passed inputs that do not fit together (shapes, dtypes, document
    metadata, attention settings); raised on every rank of the group, naming what differs where."""


class InvalidInputTypeError(OLMoAttnError, TypeError):
    """A forward argument of the wrong Python type or tensor dtype; names the argument."""


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here: its package is missing or the device is unsupported."""


class UnsupportedFeatureError(RuntimeError):
    """A backend that runs here lacks a requested feature (names the backends that have it)."""


class CompileLimitWarning(UserWarning):
    """A kernel this library compiles (FlexAttention) reached ``torch._dynamo``'s recompile limit:
    the call runs uncompiled (same math, much slower, ``Tq x Tk`` scores in memory). PyTorch itself
    would fall back without a word; the message names the limit and the fix."""
