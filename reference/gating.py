"""Sigmoid output gating in NumPy float64.

With ``g = w_g(x)`` computed from the block input ``x``::

    headwise:     out[b, t, h, :] = att[b, t, h, :] · σ(g[b, t, h])          g: [B, T, H]
    elementwise:  out[b, t, h, d] = att[b, t, h, d] · σ(g[b, t, h·D + d])     g: [B, T, H*D]

``full_precision`` is accepted for signature compatibility (float64 throughout).
"""

from __future__ import annotations

import numpy as np


def sigmoid(x) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(−x))``, computed without overflow."""
    x = np.asarray(x, np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def apply_gate(att, gate_logits, granularity: str, full_precision: bool = True) -> np.ndarray:
    """Gate ``att [B, T, H, D]`` with ``gate_logits`` (``[B, T, H]`` headwise, ``[B, T, H*D]``
    elementwise); returns ``[B, T, H, D]``."""
    del full_precision
    att = np.asarray(att, np.float64)
    B, T, H, D = att.shape
    gate = sigmoid(gate_logits)
    if granularity == "headwise":
        if gate.shape != (B, T, H):
            raise ValueError(f"headwise gate logits must be {(B, T, H)}, got {gate.shape}")
        return att * gate[..., None]
    if granularity == "elementwise":
        if gate.shape != (B, T, H * D):
            raise ValueError(f"elementwise gate logits must be {(B, T, H * D)}, got {gate.shape}")
        return att * gate.reshape(B, T, H, D)
    raise ValueError(f"granularity must be 'headwise' or 'elementwise', got {granularity!r}")
