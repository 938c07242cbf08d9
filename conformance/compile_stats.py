"""Compilation accounting per case: how much of a case's wall time was ``torch.compile``.

The GPU tier's cost is dominated by compiling FlexAttention kernels (one per kernel signature:
shape, dtype, mask kind). :func:`snapshot` reads PyTorch's own compilation records
(``torch._dynamo.utils.get_compilation_metrics``: one record per compiled frame and per lazily
compiled backward, with its duration and the guard that forced a recompile), and
:func:`since` gives what was compiled between two snapshots. Nothing is imported or enabled that a
run would not load anyway: without ``torch._dynamo`` loaded, nothing was compiled.

:func:`use_compile_cache` points Inductor's, Triton's and flash-attn-4's on-disk caches at one folder; it must run
before torch compiles anything (``olmo-attn conformance --compile-cache DIR`` calls it before it
imports torch), so a second run on the same machine reuses the first run's kernels.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_LIMIT = 1_000_000  # keep every record of a run (PyTorch's default keeps the last 64)


@dataclass(frozen=True)
class CompileSnapshot:
    """The compilation records seen so far (``keys``) and their total duration."""

    keys: frozenset[tuple[str, int]] = frozenset()


@dataclass
class CompileDelta:
    """What was compiled while one case ran.

    Attributes:
        seconds: summed duration of the compilations (forward frames and lazy backwards).
        frames: forward frames compiled (a second one of the same function is a recompile).
        backwards: backward graphs compiled.
        recompile_reasons: the first line of each guard failure that forced a recompile.
    """

    seconds: float = 0.0
    frames: int = 0
    backwards: int = 0
    recompile_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "frames": self.frames,
            "backwards": self.backwards,
            "recompile_reasons": self.recompile_reasons,
        }


def _records() -> list[Any]:
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None or not hasattr(utils, "get_compilation_metrics"):
        return []
    try:
        return list(utils.get_compilation_metrics())
    except Exception:  # a PyTorch without the records: report nothing rather than fail a case
        return []


def _key(record: Any) -> tuple[str, int]:
    return (str(getattr(record, "compile_id", "")), int(getattr(record, "start_time_us", 0) or 0))


def raise_metrics_limit() -> None:
    """Keep every compilation record of the run (called once the harness has imported torch)."""
    utils = sys.modules.get("torch._dynamo.utils")
    setter = getattr(utils, "set_compilation_metrics_limit", None) if utils is not None else None
    if setter is not None:
        with contextlib.suppress(Exception):
            setter(METRICS_LIMIT)


# The harness compiles FlexAttention for hundreds of (shape, dtype, mask, grad / deterministic
# mode) signatures in one process (the --full gpu tier reached 64, the library's floor, on the H200);
# past the limit PyTorch would run it uncompiled and a case's bit-level probes would see the switch.
HARNESS_RECOMPILE_LIMIT = 4096
HARNESS_ACCUMULATED_RECOMPILE_LIMIT = 1 << 16


def raise_recompile_limits() -> None:
    """Lift ``torch._dynamo``'s recompile limits for this process once Dynamo is loaded (a case that
    still reaches them fails: :func:`conformance.families.run_case` makes the library's
    ``CompileLimitWarning`` an error)."""
    config = sys.modules.get("torch._dynamo.config")
    if config is None:
        return
    for name, floor in (
        ("recompile_limit", HARNESS_RECOMPILE_LIMIT),
        ("accumulated_recompile_limit", HARNESS_ACCUMULATED_RECOMPILE_LIMIT),
    ):
        if getattr(config, name, floor) < floor:
            setattr(config, name, floor)


def snapshot() -> CompileSnapshot:
    """The compilation records so far."""
    raise_metrics_limit()
    raise_recompile_limits()
    return CompileSnapshot(frozenset(_key(r) for r in _records()))


def since(before: CompileSnapshot) -> CompileDelta:
    """What was compiled after ``before`` was taken."""
    delta = CompileDelta()
    for r in _records():
        if _key(r) in before.keys:
            continue
        delta.seconds += (getattr(r, "duration_us", 0) or 0) / 1e6
        if getattr(r, "backward_cumulative_compile_time_us", None):
            delta.backwards += 1
        else:
            delta.frames += 1
        reason = getattr(r, "recompile_reason", None)
        if reason:
            first = " ".join(str(reason).splitlines()[0].split())
            if first not in delta.recompile_reasons:
                delta.recompile_reasons.append(first[:300])
    return delta


CACHE_VARIABLES = (
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED",  # flash-attn-4 keeps compiled kernels in memory only
    "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR",  # unless its disk cache is switched on
)


def use_compile_cache(folder: str | os.PathLike) -> dict[str, str]:
    """Point Inductor's (``TORCHINDUCTOR_CACHE_DIR``) and Triton's (``TRITON_CACHE_DIR``) caches at
    ``folder`` (created; Triton's under ``folder/triton``) and switch on flash-attn-4's disk cache of
    CuTe DSL kernels under ``folder/cute`` (off by default: each process compiles them again).
    Returns the variables set.

    Raises:
        RuntimeError: torch has already compiled something in this process (the caches are read
            when the first compilation starts, so setting them later would be silently ignored).
    """
    if _records():
        raise RuntimeError(
            "--compile-cache must be set before torch compiles anything in this process; "
            "pass it on the command line (or set TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR yourself)"
        )
    root = Path(folder).expanduser().resolve()
    for sub in ("triton", "cute"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    values = dict(
        zip(CACHE_VARIABLES, (str(root), str(root / "triton"), "1", str(root / "cute")), strict=True)
    )
    os.environ.update(values)
    return values


__all__ = [
    "CACHE_VARIABLES",
    "CompileDelta",
    "CompileSnapshot",
    "raise_metrics_limit",
    "raise_recompile_limits",
    "since",
    "snapshot",
    "use_compile_cache",
]
