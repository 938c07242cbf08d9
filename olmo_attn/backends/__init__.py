"""Attention backends and the capability table they share."""

from .base import AttentionBackend, AttentionBackendName
from .capabilities import TABLE, BackendSpec, Feature

__all__ = ["TABLE", "AttentionBackend", "AttentionBackendName", "BackendSpec", "Feature"]
