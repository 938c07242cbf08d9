"""Automatic choice: the fastest available backend that supports what a call site needs.

The order is measured, not guessed: ``preference.json`` holds, per GPU architecture and mask kind
(``causal``, ``sliding_window``, ``documents``), the backends ordered by measured forward+backward
time, written by ``benchmarks/backend_bench.py --write-preference`` (:func:`derive_preferences`).
``torch`` closes every list: it supports every feature on every device. A backend that was not
measured on an architecture is never chosen there automatically (it can always be forced), and
neither is one whose table entry's ``verified_on`` lacks the device's architecture (it has not
passed the conformance suite on that hardware in this project) unless ``allow_unverified=True`` or
the environment variable ``OLMO_ATTN_ALLOW_UNVERIFIED=1``.

File format::

    {"sm_90": {"causal": ["flash_4", "torch"], "sliding_window": [...], "documents": [...],
               "_source": "how and where it was measured"}}
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..exceptions import UnsupportedFeatureError
from ..hardware import info_for
from . import capabilities as caps
from .capabilities import Feature

PREFERENCE_FILE = Path(__file__).with_name("preference.json")
MASK_KINDS = ("causal", "sliding_window", "documents")
ALLOW_UNVERIFIED_ENV = "OLMO_ATTN_ALLOW_UNVERIFIED"


@functools.cache
def load_preferences() -> dict:
    if not PREFERENCE_FILE.exists():
        return {}
    return json.loads(PREFERENCE_FILE.read_text())


def reload_preferences() -> None:
    """Forget the cached ``preference.json`` (after rewriting it, or in tests)."""
    load_preferences.cache_clear()


def mask_kind(features: Iterable[Feature | str]) -> str:
    fs = {Feature(f) for f in features}
    if Feature.documents in fs or Feature.documents_qk in fs:
        return "documents"
    if Feature.sliding_window in fs:
        return "sliding_window"
    return "causal"


def preference_order(device: torch.device | str | None, features: Iterable[Feature | str]) -> list[str]:
    """Backends for this device's architecture, fastest first (measured); ``torch`` last resort."""
    arch = info_for(device).arch
    order = [n for n in load_preferences().get(arch, {}).get(mask_kind(features), []) if n in caps.TABLE]
    if "torch" not in order:
        order.append("torch")
    return order


def _allow_unverified(allow_unverified: bool | None) -> bool:
    if allow_unverified is not None:
        return allow_unverified
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "0") == "1"


def device_limits_reason(
    name: str, *, device: torch.device | str | None = None, head_dim: int | None = None
) -> str | None:
    """Limits a backend declares beyond the table (e.g. flash_4's per-architecture head dims)."""
    if name == "torch" or caps.unavailable_reason(name, device) is not None:
        return None
    from .base import AttentionBackendName

    hook = getattr(AttentionBackendName(name).get_class(), "device_limits", None)
    return hook(head_dim=head_dim, device=device) if hook is not None else None


def rejection_reason(
    name: str,
    features: Sequence[Feature],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str | None:
    """Why ``name`` cannot serve a call site with ``features`` here (``None`` when it can)."""
    spec = caps.get_spec(name)
    reason = caps.unavailable_reason(name, device)
    if reason is not None:
        return reason
    missing = [f.value for f in features if f not in spec.features]
    if missing:
        return f"lacks {', '.join(missing)}"
    if dtype is not None and dtype not in spec.dtypes:
        return f"no {dtype}"
    if head_dim is not None and (head_dim > spec.head_dim_max or head_dim % spec.head_dim_multiple):
        return f"head_dim={head_dim} outside multiples of {spec.head_dim_multiple} up to {spec.head_dim_max}"
    return device_limits_reason(name, device=device, head_dim=head_dim)


def choose_backend(
    features: Iterable[Feature | str] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    allow_unverified: bool | None = None,
) -> str:
    """Name of the fastest (measured) backend that is available on ``device`` and has every feature."""
    features = [Feature(f) for f in features]
    allow = _allow_unverified(allow_unverified)
    rejected: list[str] = []
    for name in preference_order(device, features):
        reason = rejection_reason(name, features, device=device, dtype=dtype, head_dim=head_dim)
        if reason is None and not allow and not caps.get_spec(name).verified_for(info_for(device).arch):
            reason = (
                f"not verified on {info_for(device).arch} hardware (set {ALLOW_UNVERIFIED_ENV}=1 or force "
                f"backend={name!r})"
            )
        if reason is None:
            return name
        rejected.append(f"{name}: {reason}")
    raise UnsupportedFeatureError(
        f"no available attention backend supports {[f.value for f in features]} here ({'; '.join(rejected)})"
    )


def resolve_backend(
    backend: str | None,
    features: Iterable[Feature | str] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    allow_unverified: bool | None = None,
) -> str:
    """``backend`` checked against the table (forced), or the automatic choice when ``None``.

    A forced backend that is missing here raises :class:`BackendUnavailableError`; one that lacks a
    requested feature raises :class:`UnsupportedFeatureError` naming the backends that have it.
    """
    features = [Feature(f) for f in features]
    if backend is None:
        return choose_backend(
            features, device=device, dtype=dtype, head_dim=head_dim, allow_unverified=allow_unverified
        )
    name = str(backend)
    caps.get_spec(name)  # ValueError for an unknown name
    for f in features:
        caps.assert_feature(name, f)
    caps.assert_available(name, device)
    if dtype is not None:
        caps.assert_dtype(name, dtype)
    if head_dim is not None:
        caps.assert_head_dim(name, head_dim)
        reason = device_limits_reason(name, device=device, head_dim=head_dim)
        if reason is not None:
            raise UnsupportedFeatureError(f"attention backend '{name}': {reason}")
    return name


# ----- deriving the order from measurements ---------------------------------------------------------
def derive_preferences(results: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Order backends per mask kind by measured forward+backward time.

    ``results`` are benchmark records with keys ``backend``, ``mask`` (one of :data:`MASK_KINDS`),
    ``seq_len``, ``fwd_bwd_ms`` (``None`` or missing when the case failed) for one architecture. A
    backend is ranked for a mask kind only if it ran every sequence length measured for that kind
    (a backend that fails a shape cannot be chosen for it); the rank is the geometric mean over
    those lengths of its time divided by the fastest time at that length. ``torch`` always ends the
    list.
    """
    by_kind: dict[str, dict[str, dict[int, float]]] = {}
    for r in results:
        ms = r.get("fwd_bwd_ms")
        by_kind.setdefault(str(r["mask"]), {}).setdefault(str(r["backend"]), {})
        if ms is not None and ms > 0:
            by_kind[str(r["mask"])][str(r["backend"])][int(r["seq_len"])] = float(ms)
    prefs: dict[str, list[str]] = {}
    for kind, backends in by_kind.items():
        lengths = sorted({t for times in backends.values() for t in times})
        best = {t: min(times[t] for times in backends.values() if t in times) for t in lengths}
        complete = {b: times for b, times in backends.items() if lengths and set(times) == set(lengths)}
        score = {
            b: statistics.geometric_mean([times[t] / best[t] for t in lengths])
            for b, times in complete.items()
        }
        order = sorted(score, key=lambda b: (score[b], b))
        if "torch" in order:
            order.remove("torch")
        prefs[kind] = [*order, "torch"]
    return prefs


def write_preferences(
    arch: str, prefs: Mapping[str, Sequence[str]], *, source: str, path: Path | str | None = None
) -> Path:
    """Store ``prefs`` (from :func:`derive_preferences`) for ``arch`` in ``preference.json``.

    Other architectures' entries are kept; ``source`` says how and where it was measured.
    """
    path = Path(path) if path is not None else PREFERENCE_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    unknown = [b for order in prefs.values() for b in order if b not in caps.TABLE]
    if unknown:
        raise ValueError(f"preference lists name unknown backends {unknown}; known: {sorted(caps.TABLE)}")
    data[arch] = {**{k: list(v) for k, v in prefs.items()}, "_source": source}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if path == PREFERENCE_FILE:
        reload_preferences()
    return path


__all__ = [
    "MASK_KINDS",
    "PREFERENCE_FILE",
    "choose_backend",
    "derive_preferences",
    "load_preferences",
    "mask_kind",
    "preference_order",
    "rejection_reason",
    "reload_preferences",
    "resolve_backend",
    "write_preferences",
]
