"""Automatic choice: the fastest available backend that supports what a call site needs.

The order is measured, not guessed: ``preference.json`` holds, per GPU architecture and mask kind
(``causal``, ``sliding_window``, ``documents``), the backends ordered by measured forward+backward
time, written by ``benchmarks/backend_bench.py --write-preference`` (:func:`derive_preferences`).
``torch`` closes every list: it supports every feature on every device. A backend that was not
measured on an architecture is never chosen there automatically (it can always be forced), and
neither is one whose table entry's ``verified_on`` lacks the device's architecture (it has not
passed the conformance suite on that hardware in this project) unless ``allow_unverified=True`` or
the environment variable ``OLMO_ATTN_ALLOW_UNVERIFIED=1``.

A backend named explicitly (``backend="flash_2"``, as OLMo-core's presets do) that cannot run here
(its package is missing, or the device is not one it runs on) does not stop the build: like
OLMo-core, :func:`select_backend` warns (:class:`BackendFallbackWarning`, naming the backend, the
reason and the backend used instead) and uses the automatic choice. ``strict=True`` or the
environment variable ``OLMO_ATTN_STRICT_BACKEND=1`` keeps :class:`BackendUnavailableError`. A named
backend that runs here but lacks a feature, dtype or head dim the layer needs is always an error.

Every automatic choice is logged once, at INFO on the ``olmo_attn`` logger, with the reason.

File format::

    {"sm_90": {"causal": ["flash_4", "torch"], "sliding_window": [...], "documents": [...],
               "_source": "how and where it was measured"}}
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..exceptions import BackendUnavailableError, UnsupportedFeatureError
from ..hardware import info_for
from . import capabilities as caps
from .capabilities import Feature

PREFERENCE_FILE = Path(__file__).with_name("preference.json")
MASK_KINDS = ("causal", "sliding_window", "documents")
ALLOW_UNVERIFIED_ENV = "OLMO_ATTN_ALLOW_UNVERIFIED"
STRICT_BACKEND_ENV = "OLMO_ATTN_STRICT_BACKEND"

log = logging.getLogger("olmo_attn")


class BackendFallbackWarning(UserWarning):
    """A backend named in the config cannot run here; the automatic choice runs in its place."""


@dataclass(frozen=True)
class BackendChoice:
    """The outcome of :func:`select_backend`.

    Attributes:
        name: the backend to build.
        auto: chosen automatically (a module may choose again when its inputs' device or dtype
            turn out to be outside this backend's reach); ``False`` for a backend named and used.
        requested: the backend the caller named (``None`` when it asked for the automatic choice).
        reason: why this backend, in words (also in the INFO log line).
    """

    name: str
    auto: bool
    requested: str | None
    reason: str


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
    if head_dim is not None and not spec.supports_head_dim(head_dim):
        return f"head_dim={head_dim} not supported (needs {spec.head_dim_text()})"
    return device_limits_reason(name, device=device, head_dim=head_dim)


def _strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get(STRICT_BACKEND_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _choose(
    features: Sequence[Feature],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    head_dim: int | None,
    allow_unverified: bool | None,
) -> tuple[str, str]:
    """``(name, why)``: the first backend of the measured order that can serve ``features`` here."""
    allow = _allow_unverified(allow_unverified)
    arch = info_for(device).arch
    order = preference_order(device, features)
    # documents arrive per call (cu_doc_lens): a layer built with a window may get them later
    need = list(features)
    if Feature.sliding_window in need and Feature.documents_window not in need:
        need.append(Feature.documents_window)
    rejected: list[str] = []
    for name in order:
        reason = rejection_reason(name, need, device=device, dtype=dtype, head_dim=head_dim)
        if reason is None and not allow and not caps.get_spec(name).verified_for(arch):
            reason = (
                f"not verified on {arch} hardware (set {ALLOW_UNVERIFIED_ENV}=1 or force backend={name!r})"
            )
        if reason is None:
            if len(order) == 1:
                why = f"no other backend has measured timings on {arch}"
            else:
                why = f"fastest available in the {arch} order {order} for {mask_kind(features)} masks"
            if rejected:
                why += "; passed over " + "; ".join(rejected)
            return name, why
        rejected.append(f"{name}: {reason}")
    raise UnsupportedFeatureError(
        f"no available attention backend supports {[f.value for f in features]} here ({'; '.join(rejected)})"
    )


def _describe(
    features: Sequence[Feature],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    head_dim: int | None,
) -> str:
    dev = info_for(device)
    dt = "any dtype" if dtype is None else str(dtype).replace("torch.", "")
    hd = "" if head_dim is None else f", head_dim={head_dim}"
    return f"features={[f.value for f in features]}, {dev.type} ({dev.arch}), {dt}{hd}"


def choose_backend(
    features: Iterable[Feature | str] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    allow_unverified: bool | None = None,
    log_choice: bool = True,
) -> str:
    """Name of the fastest (measured) backend that is available on ``device`` and has every feature.

    Logs one INFO line on the ``olmo_attn`` logger naming the backend and why (``log_choice=False``
    to stay quiet).
    """
    features = [Feature(f) for f in features]
    name, why = _choose(
        features, device=device, dtype=dtype, head_dim=head_dim, allow_unverified=allow_unverified
    )
    if log_choice:
        log.info(
            "attention backend %r chosen automatically (%s): %s",
            name,
            _describe(features, device, dtype, head_dim),
            why,
        )
    return name


def _caller_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that points at the first frame outside olmo_attn."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("olmo_attn"):
        frame = frame.f_back
        level += 1
    return level


def select_backend(
    backend: str | None,
    features: Iterable[Feature | str] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    strict: bool | None = None,
    allow_unverified: bool | None = None,
) -> BackendChoice:
    """The backend a layer builds: ``backend`` when it can run here, else the automatic choice.

    * ``backend=None``: the automatic choice (:func:`choose_backend`), logged at INFO with the reason.
    * A named backend that runs here is checked against the features, dtype and head dim
      (:class:`UnsupportedFeatureError` naming the backends that have what is missing).
    * A named backend that cannot run here (package missing, wrong device or GPU architecture):
      a :class:`BackendFallbackWarning` naming it, the reason and the replacement, then the automatic
      choice — OLMo-core replaces a GPU backend by ``torch`` on a machine without CUDA the same way.
      ``strict=True`` (or ``OLMO_ATTN_STRICT_BACKEND=1`` when ``strict`` is ``None``) raises
      :class:`BackendUnavailableError` instead.
    """
    features = [Feature(f) for f in features]
    if backend is None:
        name, why = _choose(
            features, device=device, dtype=dtype, head_dim=head_dim, allow_unverified=allow_unverified
        )
        log.info(
            "attention backend %r chosen automatically (%s): %s",
            name,
            _describe(features, device, dtype, head_dim),
            why,
        )
        return BackendChoice(name=name, auto=True, requested=None, reason=why)
    requested = str(backend)
    caps.get_spec(requested)  # ValueError for an unknown name
    unavailable = caps.unavailable_reason(requested, device)
    if unavailable is not None:
        if _strict(strict):
            raise BackendUnavailableError(
                f"attention backend '{requested}' is unavailable: {unavailable} (strict backend selection "
                f"is on; unset {STRICT_BACKEND_ENV} to fall back to the automatic choice with a warning)"
            )
        name, why = _choose(
            features, device=device, dtype=dtype, head_dim=head_dim, allow_unverified=allow_unverified
        )
        warnings.warn(
            f"attention backend '{requested}' was requested but cannot run here: {unavailable}. "
            f"Using backend '{name}' instead (the automatic choice). Set {STRICT_BACKEND_ENV}=1 to make "
            "this an error.",
            BackendFallbackWarning,
            stacklevel=_caller_stacklevel(),
        )
        why = f"in place of unavailable '{requested}' ({unavailable}); {why}"
        log.info(
            "attention backend %r chosen automatically (%s): %s",
            name,
            _describe(features, device, dtype, head_dim),
            why,
        )
        return BackendChoice(name=name, auto=True, requested=requested, reason=why)
    resolve_backend(requested, features, device=device, dtype=dtype, head_dim=head_dim)
    log.info("attention backend %r (requested; %s)", requested, _describe(features, device, dtype, head_dim))
    return BackendChoice(name=requested, auto=False, requested=requested, reason="requested")


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

    A forced backend that is missing here raises :class:`BackendUnavailableError` (use
    :func:`select_backend` for the warn-and-fall-back behaviour); one that lacks a requested feature
    raises :class:`UnsupportedFeatureError` naming the backends that have it.
    """
    features = [Feature(f) for f in features]
    if backend is None:
        return choose_backend(
            features,
            device=device,
            dtype=dtype,
            head_dim=head_dim,
            allow_unverified=allow_unverified,
            log_choice=False,
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
    those lengths of its time divided by the fastest time at that length. ``torch`` is ranked like
    the others (a flash kernel slower than it is never preferred to it) and ends the list when it
    was not measured (it runs everywhere: the fallback).
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
        prefs[kind] = order if "torch" in order else [*order, "torch"]
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
    "STRICT_BACKEND_ENV",
    "BackendChoice",
    "BackendFallbackWarning",
    "choose_backend",
    "derive_preferences",
    "load_preferences",
    "mask_kind",
    "preference_order",
    "rejection_reason",
    "reload_preferences",
    "resolve_backend",
    "select_backend",
    "write_preferences",
]
