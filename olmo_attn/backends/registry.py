"""Automatic backend choice: the fastest available backend that supports what a call site needs.

The order is measured, not guessed: ``preference.json`` holds, per GPU architecture and mask kind,
backends ordered by measured forward+backward speed (written by ``benchmarks/backend_bench.py``).
Architectures without a measurement fall back to ``torch``, which supports every feature.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ..exceptions import UnsupportedFeatureError
from ..hardware import info_for
from . import capabilities as caps
from .capabilities import Feature

PREFERENCE_FILE = Path(__file__).with_name("preference.json")


@functools.cache
def load_preferences() -> dict:
    if not PREFERENCE_FILE.exists():
        return {}
    return json.loads(PREFERENCE_FILE.read_text())


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
    order = list(load_preferences().get(arch, {}).get(mask_kind(features), []))
    if "torch" not in order:
        order.append("torch")
    return order


def choose_backend(
    features: Iterable[Feature | str] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str:
    """Name of the fastest backend that is available on ``device`` and has every feature."""
    features = [Feature(f) for f in features]
    rejected: list[str] = []
    for name in preference_order(device, features):
        spec = caps.get_spec(name)
        reason = caps.unavailable_reason(name, device)
        missing = [f.value for f in features if f not in spec.features]
        if (
            reason is None
            and not missing
            and (dtype is None or dtype in spec.dtypes)
            and (
                head_dim is None or (head_dim <= spec.head_dim_max and head_dim % spec.head_dim_multiple == 0)
            )
        ):
            return name
        rejected.append(
            f"{name}: {reason or ('lacks ' + ', '.join(missing) if missing else 'dtype/head_dim')}"
        )
    raise UnsupportedFeatureError(
        f"no available attention backend supports {[f.value for f in features]} here ({'; '.join(rejected)})"
    )
