"""olmo_attn: OLMo-core-compatible attention modules (filled in as the modules land)."""

from .config import Config, DType, StrEnum
from .exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    OLMoAttnError,
    OLMoConfigurationError,
    UnsupportedFeatureError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Config",
    "ConfigurationError",
    "DType",
    "OLMoAttnError",
    "OLMoConfigurationError",
    "StrEnum",
    "UnsupportedFeatureError",
]
