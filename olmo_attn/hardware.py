"""Hardware and package detection, in one place, cached.

Everything that asks "what GPU is this?" or "is package X importable, and which version?" calls
these functions; the capability table, automatic backend choice and the conformance fingerprint
read them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """What kind of device a tensor would run on."""

    type: str  # "cpu" | "cuda"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    sm: tuple[int, int] | None  # compute capability for CUDA, else None
    count: int = 1
    sm_count: int = 0  # streaming multiprocessors of a CUDA device, 0 for CPUs

    @property
    def arch(self) -> str:
        """``"sm_90"`` style architecture tag, ``"cpu"`` for CPUs."""
        return f"sm_{self.sm[0]}{self.sm[1]}" if self.sm else "cpu"


@functools.cache
def device_info(device: str | None = None) -> DeviceInfo:
    """Describe ``device`` (default: ``cuda:0`` if CUDA is available, else the CPU)."""
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    )
    if dev.type == "cuda":
        index = dev.index or 0
        return DeviceInfo(
            "cuda",
            torch.cuda.get_device_name(index),
            torch.cuda.get_device_capability(index),
            torch.cuda.device_count(),
            torch.cuda.get_device_properties(index).multi_processor_count,
        )
    return DeviceInfo(dev.type, platform.processor() or platform.machine(), None)


def info_for(device: torch.device | str | None) -> DeviceInfo:
    """``device_info`` keyed by a ``torch.device`` (``cuda`` without index means ``cuda:0``)."""
    if device is None:
        return device_info(None)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device_info(str(dev))


@dataclass(frozen=True)
class PackageStatus:
    """Whether an optional module imports, its distribution version, or why it does not."""

    module: str
    available: bool
    version: str | None
    reason: str | None  # None when available

    def __bool__(self) -> bool:
        return self.available


@functools.cache
def package_status(module: str, distribution: str | None = None) -> PackageStatus:
    """Try to import ``module``; report its ``distribution`` version or the import error text."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or anything a broken install raises at import time
        kind = (
            "not installed"
            if isinstance(e, ModuleNotFoundError) and e.name and module.startswith(e.name)
            else "import error"
        )
        return PackageStatus(module, False, None, f"{kind}: {type(e).__name__}: {e}")
    version = getattr(mod, "__version__", None)
    if distribution is not None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version(distribution)
    return PackageStatus(module, True, str(version) if version is not None else None, None)


def clear_caches() -> None:
    """Forget cached detections (tests that fake packages or devices call this)."""
    device_info.cache_clear()
    package_status.cache_clear()
