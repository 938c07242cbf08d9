"""Stand-in for ``cached_path`` so that OLMo-core imports on a machine without its cloud dependencies.

Only what ``import olmo_core`` touches exists; fetching anything raises.
"""

from __future__ import annotations

from typing import Any


def cached_path(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "cached_path is not available here (scripts/peer stand-in); load checkpoints from local paths"
    )


def __getattr__(name: str) -> type:
    # any other name OLMo-core imports from cached_path: an inert placeholder class
    return type(name, (), {})
