"""Stand-in for ``cached_path.schemes``: the scheme-client names OLMo-core subclasses at import time."""

from __future__ import annotations

from typing import Any


class SchemeClient:
    recoverable_errors: tuple[type[BaseException], ...] = ()


class S3Client(SchemeClient):
    recoverable_errors = ()


def add_scheme_client(*args: Any, **kwargs: Any) -> None:
    """Registering a client is a no-op here (no remote schemes)."""


def __getattr__(name: str) -> type:
    return type(name, (SchemeClient,), {})
