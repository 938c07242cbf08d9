"""Rotary position embeddings in NumPy float64.

Inverse frequencies for rotary width ``r`` (``r = int(D * partial_rotary_factor)``) and base θ::

    inv_freq[i] = 1 / θ^(2i / r),   i = 0 … ceil(r/2) − 1,     ang[p, i] = p · inv_freq[i]

A scaling scheme maps ``inv_freq`` to ``(inv_freq', rescale)``; sin/cos tables are multiplied
by ``rescale`` (complex RoPE supports no scaling). Two rotation conventions on the first ``r``
channels (the rest passes through unchanged):

    rotate-half ("default", "fused"):  pairs (i, i + r/2)
        out[i] = x[i] c_i − x[i + r/2] s_i,   out[i + r/2] = x[i + r/2] c_i + x[i] s_i
    interleaved ("complex"):           pairs (2i, 2i + 1) as z = x[2i] + i·x[2i+1],   z · exp(i·ang)

with ``c_i = rescale · cos(ang[p, i])`` and ``s_i = rescale · sin(ang[p, i])``.

Positions: without ``start_pos`` queries are aligned to the end of the keys
(``q: (Tk − Tq) + [0, Tq)``, ``k: [0, Tk)``); with ``start_pos`` both are ``start_pos + [0, T)``;
with ``cu_doc_lens`` every document restarts at 0 (:func:`document_positions`).

``full_precision`` is accepted for signature compatibility: the reference always computes in
float64, which is at least as precise as either setting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ABFScaling:
    """Absolute base frequency: ``inv_freq`` from ``new_theta`` (θ ignored), rescale = the factor."""

    attention_rescale_factor: float = 1.0
    new_theta: int = 8_000_000

    def compute(self, theta: float, dim: int) -> tuple[np.ndarray, float]:
        return base_inv_freq(self.new_theta, dim), float(self.attention_rescale_factor)

    def to_hf_config(self) -> dict:
        raise NotImplementedError("ABF scaling has no Hugging Face equivalent")


@dataclass(frozen=True)
class PIScaling:
    """Position interpolation (HF "linear"): ``inv_freq / factor``."""

    attention_rescale_factor: float = 1.0
    factor: float = 2.0

    def compute(self, theta: float, dim: int) -> tuple[np.ndarray, float]:
        return base_inv_freq(theta, dim) / self.factor, float(self.attention_rescale_factor)

    def to_hf_config(self) -> dict:
        return {"rope_type": "linear", "factor": self.factor}


@dataclass(frozen=True)
class StepwiseScaling:
    """Llama-3.1 scaling (HF "llama3"), wavelength ``λ_i = 2π / f_i``::

    lf = 1/(1 − low_freq_proportion),  hf = 1/high_freq_proportion
    λ > old/lf:  f/factor        λ < old/hf:  f        else (bounds inclusive):
    w = (old/λ − lf)/(hf − lf),  f' = (1 − w)·f/factor + w·f
    """

    attention_rescale_factor: float = 1.0
    factor: float = 32.0
    low_freq_proportion: float = 0.0
    high_freq_proportion: float = 0.25
    old_context_len: int = 8192

    def compute(self, theta: float, dim: int) -> tuple[np.ndarray, float]:
        f = base_inv_freq(theta, dim)
        lf = 1.0 / (1.0 - self.low_freq_proportion)
        hf = 1.0 / self.high_freq_proportion
        wavelen = 2 * math.pi / f
        with np.errstate(divide="ignore", invalid="ignore"):
            w = (self.old_context_len / wavelen - lf) / (hf - lf)
        mid = (1 - w) * f / self.factor + w * f
        low_band = wavelen > self.old_context_len / lf
        high_band = wavelen < self.old_context_len / hf
        out = np.where(low_band, f / self.factor, np.where(high_band, f, mid))
        return out, float(self.attention_rescale_factor)

    def to_hf_config(self) -> dict:
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "original_max_position_embeddings": self.old_context_len,
            "low_freq_factor": 1.0 / (1.0 - self.low_freq_proportion),
            "high_freq_factor": 1.0 / self.high_freq_proportion,
        }


@dataclass(frozen=True)
class YaRNScaling:
    """YaRN, with the reference's upper clamp at ``n − 1`` (``n = dim/2``; HF clamps at ``dim − 1``)::

    c(rot) = dim · ln(old / (2π · rot)) / (2 ln θ)
    low = max(floor(c(beta_fast)), 0),  high = min(ceil(c(beta_slow)), n − 1)
    ramp_i = clamp((i − low) / max(high − low, 1e-3), 0, 1)
    f'_i = (f_i/factor) · ramp_i + f_i · (1 − ramp_i),   rescale = 0.1 · ln(factor) + 1
    """

    factor: float = 8.0
    beta_fast: float = 32
    beta_slow: float = 1
    old_context_len: int = 8192

    def compute(self, theta: float, dim: int) -> tuple[np.ndarray, float]:
        f = base_inv_freq(theta, dim)
        n = dim // 2

        def c(rot: float) -> float:
            return dim * math.log(self.old_context_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(c(self.beta_fast)), 0)
        high = min(math.ceil(c(self.beta_slow)), n - 1)
        ramp = np.clip((np.arange(f.size) - low) / max(high - low, 1e-3), 0.0, 1.0)
        return (f / self.factor) * ramp + f * (1 - ramp), 0.1 * math.log(self.factor) + 1.0

    def to_hf_config(self) -> dict:
        return {
            "rope_type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.old_context_len,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "attention_factor": 0.1 * math.log(self.factor) + 1.0,
        }


Scaling = ABFScaling | PIScaling | StepwiseScaling | YaRNScaling
SCALINGS: dict[str, type] = {
    "abf": ABFScaling,
    "pi": PIScaling,
    "linear": PIScaling,
    "stepwise": StepwiseScaling,
    "llama3": StepwiseScaling,
    "yarn": YaRNScaling,
}


def as_scaling(scaling) -> Scaling | None:
    """``None``, a scaling dataclass, or a dict ``{"type": "abf"|"pi"|"linear"|"stepwise"|"llama3"|"yarn", **fields}``."""
    if scaling is None or isinstance(scaling, ABFScaling | PIScaling | StepwiseScaling | YaRNScaling):
        return scaling
    fields = dict(scaling)
    kind = fields.pop("type", None) or fields.pop("name", None) or fields.pop("rope_type", None)
    if kind not in SCALINGS:
        raise ValueError(f"unknown RoPE scaling {kind!r}; expected one of {sorted(SCALINGS)}")
    return SCALINGS[kind](**fields)


def scaling_as_dict(scaling: Scaling) -> dict:
    """Inverse of :func:`as_scaling` (canonical type names ``abf``, ``pi``, ``stepwise``, ``yarn``)."""
    name = {ABFScaling: "abf", PIScaling: "pi", StepwiseScaling: "stepwise", YaRNScaling: "yarn"}
    return {"type": name[type(scaling)], **asdict(scaling)}


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``[ceil(dim/2)]``: ``1 / θ^(2i/dim)``."""
    return 1.0 / float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def inv_freq(theta: float, dim: int, scaling=None) -> tuple[np.ndarray, float]:
    """``(inv_freq [ceil(dim/2)], rescale)`` for rotary width ``dim``, after the optional scaling."""
    scaling = as_scaling(scaling)
    if scaling is None:
        return base_inv_freq(theta, dim), 1.0
    return scaling.compute(theta, dim)


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Number of rotated channels ``int(head_dim * partial_rotary_factor)`` (must be even)."""
    r = int(head_dim * partial_rotary_factor)
    if r % 2:
        raise ValueError(f"rotary dim int({head_dim} * {partial_rotary_factor}) = {r} must be even")
    return r


def rope_tables(
    length: int,
    head_dim: int,
    *,
    theta: float = 500_000,
    scaling=None,
    partial_rotary_factor: float = 1.0,
    variant: str = "default",
) -> tuple[np.ndarray, np.ndarray]:
    """``(pos_sin, pos_cos)`` scaled by the rescale factor.

    ``variant="default"``: ``[length, r]`` = ``sin/cos(cat(ang, ang))``; ``"fused"``: ``[length, r/2]``.
    """
    if variant not in ("default", "fused"):
        raise ValueError(f"rope_tables variant must be 'default' or 'fused', got {variant!r}")
    r = rotary_dim(head_dim, partial_rotary_factor)
    freq, rescale = inv_freq(theta, r, scaling)
    ang = np.arange(length, dtype=np.float64)[:, None] * freq[None, :]
    if variant == "default":
        ang = np.concatenate([ang, ang], axis=-1)
    return np.sin(ang) * rescale, np.cos(ang) * rescale


def freqs_cis_table(
    length: int, head_dim: int, *, theta: float = 500_000, partial_rotary_factor: float = 1.0
) -> np.ndarray:
    """Complex RoPE table ``[length, r/2]`` = ``exp(i·ang)`` (no scaling, no rescale)."""
    r = rotary_dim(head_dim, partial_rotary_factor)
    freq, _ = inv_freq(theta, r)
    return np.exp(1j * np.arange(length, dtype=np.float64)[:, None] * freq[None, :])


def document_positions(cu_doc_lens, total: int) -> np.ndarray:
    """``[total]`` position of each flat token inside its document: ``f − cu[doc(f)]``.

    ``doc(f)`` is the number of entries of ``cu[1:]`` that are ``<= f``; tokens past ``cu[-1]`` keep
    counting from ``cu[-1]``.
    """
    cu = np.asarray(cu_doc_lens, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0:
        raise ValueError(f"cu_doc_lens must be 1-D and start with 0, got {cu.tolist()}")
    f = np.arange(total)
    doc = np.searchsorted(cu[1:], f, side="right")
    return f - cu[doc]


def rope_positions(
    Tq: int, Tk: int, *, batch: int = 1, start_pos=None, cu_doc_lens=None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(q_pos, k_pos)``, each ``[T]``, or ``[batch, T]`` with ``cu_doc_lens``."""
    if cu_doc_lens is not None:
        if start_pos is not None:
            raise ValueError("cu_doc_lens and start_pos are mutually exclusive")
        if Tq != Tk:
            raise ValueError(f"per-document RoPE needs Tq == Tk, got {Tq} and {Tk}")
        pos = document_positions(cu_doc_lens, batch * Tk).reshape(batch, Tk)
        return pos, pos
    if start_pos is not None:
        start = int(start_pos)
        return start + np.arange(Tq), start + np.arange(Tk)
    return (Tk - Tq) + np.arange(Tq), np.arange(Tk)


def _gather(table: np.ndarray, pos: np.ndarray, name: str) -> np.ndarray:
    """Rows of ``table`` at ``pos`` (``[T]`` or ``[B, T]``) → ``[..., T, 1, width]`` (broadcast over heads)."""
    if pos.size and pos.max() >= table.shape[0]:
        raise ValueError(f"RoPE buffer {name} has {table.shape[0]} rows, position {pos.max()} needs more")
    return table[pos][..., None, :]


def _rotate_half(x: np.ndarray, sin: np.ndarray, cos: np.ndarray) -> np.ndarray:
    r = sin.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = x_rot * cos + np.concatenate([-x2, x1], axis=-1) * sin
    return np.concatenate([rotated, x_pass], axis=-1)


def _rotate_complex(x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    r = 2 * freqs.shape[-1]
    z = (x[..., 0:r:2] + 1j * x[..., 1:r:2]) * freqs
    out = x.copy()
    out[..., 0:r:2], out[..., 1:r:2] = z.real, z.imag
    return out


def apply_rope(
    q,
    k,
    *,
    variant: str = "default",
    theta: float = 500_000,
    full_precision: bool = True,
    scaling=None,
    partial_rotary_factor: float = 1.0,
    start_pos=None,
    cu_doc_lens=None,
    head_first: bool = False,
    pos_sin=None,
    pos_cos=None,
    freqs_cis=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate ``q`` and ``k`` (never ``v``); see the module docstring.

    Args:
        q: ``[B, Tq, Hq, D]`` (``[B, Hq, Tq, D]`` if ``head_first``); k: ``[B, Tk, Hkv, D]``.
        variant: ``"default"`` (rotate-half), ``"fused"`` (same math, ``Tq == Tk``, no partial
            rotary, no documents, offset ``start_pos or 0``), ``"complex"`` (interleaved, no scaling).
        start_pos: absolute position of the first new token (KV-cache decoding).
        cu_doc_lens: documents over the flattened ``B * T`` tokens; positions restart per document.
        pos_sin, pos_cos: caller-supplied tables ``[rows, r]`` (fused: ``[rows, D/2]``), rows indexed by
            position (CP passes pre-sharded tables); freqs_cis: complex ``[rows, r/2]`` table.

    Returns:
        ``(q', k')`` with the input shapes, float64.
    """
    del full_precision  # float64 throughout
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    if head_first:
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    B, Tq, _, D = q.shape
    Tk = k.shape[1]
    if variant not in ("default", "fused", "complex"):
        raise ValueError(f"variant must be 'default', 'fused' or 'complex', got {variant!r}")
    if cu_doc_lens is not None and variant != "default":
        raise ValueError(f"per-document positions (cu_doc_lens) need variant 'default', got {variant!r}")
    if variant == "fused":
        if partial_rotary_factor != 1.0:
            raise ValueError("fused RoPE does not support partial_rotary_factor != 1.0")
        if Tq != Tk:
            raise ValueError(f"fused RoPE rotates packed qkv: Tq == Tk required, got {Tq} and {Tk}")
        start_pos = 0 if start_pos is None else start_pos
    q_pos, k_pos = rope_positions(Tq, Tk, batch=B, start_pos=start_pos, cu_doc_lens=cu_doc_lens)
    need = int(max(q_pos.max(initial=0), k_pos.max(initial=0))) + 1

    if variant == "complex":
        if scaling is not None:
            raise ValueError("complex RoPE does not support scaling")
        if pos_sin is not None or pos_cos is not None:
            raise ValueError("complex RoPE takes freqs_cis, not pos_sin/pos_cos")
        if freqs_cis is None:
            freqs_cis = freqs_cis_table(need, D, theta=theta, partial_rotary_factor=partial_rotary_factor)
        freqs_cis = np.asarray(freqs_cis, dtype=np.complex128)
        out_q = _rotate_complex(q, _gather(freqs_cis, q_pos, "freqs_cis"))
        out_k = _rotate_complex(k, _gather(freqs_cis, k_pos, "freqs_cis"))
    else:
        if freqs_cis is not None:
            raise ValueError(f"{variant} RoPE takes pos_sin/pos_cos, not freqs_cis")
        if pos_sin is None or pos_cos is None:
            pos_sin, pos_cos = rope_tables(
                need,
                D,
                theta=theta,
                scaling=scaling,
                partial_rotary_factor=partial_rotary_factor,
                variant=variant,
            )
        pos_sin, pos_cos = np.asarray(pos_sin, np.float64), np.asarray(pos_cos, np.float64)
        if variant == "fused":  # half-width tables [rows, D/2]
            pos_sin, pos_cos = np.concatenate([pos_sin] * 2, -1), np.concatenate([pos_cos] * 2, -1)
        r = rotary_dim(D, partial_rotary_factor)
        if pos_sin.shape[-1] != r or pos_cos.shape[-1] != r:
            raise ValueError(f"RoPE tables must have {r} columns ({r // 2} for fused), got {pos_sin.shape}")
        out_q = _rotate_half(q, _gather(pos_sin, q_pos, "pos_sin"), _gather(pos_cos, q_pos, "pos_cos"))
        out_k = _rotate_half(k, _gather(pos_sin, k_pos, "pos_sin"), _gather(pos_cos, k_pos, "pos_cos"))
    if head_first:
        out_q, out_k = out_q.transpose(0, 2, 1, 3), out_k.transpose(0, 2, 1, 3)
    return out_q, out_k


def apply_rope_packed(
    qkv, *, theta: float = 500_000, scaling=None, start_pos=None, pos_sin=None, pos_cos=None
):
    """Fused RoPE on packed ``qkv [B, T, 3, H, D]``: rotates the q and k slices, v untouched."""
    qkv = np.array(qkv, dtype=np.float64)
    qkv[:, :, 0], qkv[:, :, 1] = apply_rope(
        qkv[:, :, 0],
        qkv[:, :, 1],
        variant="fused",
        theta=theta,
        scaling=scaling,
        start_pos=start_pos,
        pos_sin=pos_sin,
        pos_cos=pos_cos,
    )
    return qkv


def layer_uses_rope(*, no_global_rope: bool, uses_swa: bool) -> bool:
    """The ``no_global_rope`` ("GNoPE") rule: a layer keeps RoPE iff it is a sliding-window layer or
    ``no_global_rope`` is off."""
    return uses_swa or not no_global_rope
