"""Error types. Every message names the argument, the value and the fix."""

from __future__ import annotations


class OLMoAttnError(Exception):
    """Base class of this library's own errors."""


class ConfigurationError(OLMoAttnError):
    """An invalid configuration (the equivalent of OLMo-core's ``OLMoConfigurationError``)."""


OLMoConfigurationError = ConfigurationError


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here: its package is missing or the device is unsupported."""


class UnsupportedFeatureError(RuntimeError):
    """A backend that runs here lacks a requested feature (names the backends that have it)."""
