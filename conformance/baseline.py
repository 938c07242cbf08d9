"""``low``: plain PyTorch math in the case dtype — the error the dtype alone causes.

The error budget (docs/judging.md) compares a backend with this baseline's distance to the float64 reference.
Every function here computes in the dtype of its inputs, the way a straightforward PyTorch
implementation would (matmuls produce the dtype, softmax returns the dtype, the LSE is reduced in
float32 the way every kernel keeps its statistics); masks, positions and RoPE tables are exact and
come from ``reference/`` (they are not a precision question). Autograd gives the baseline gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from reference import rope as ref_rope


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in ``q.dtype``.

    Args:
        q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]`` (query head ``h`` uses kv head ``h // G``).
        allowed: bool ``[B or 1, Tq, Tk]``.
        keep: bool ``[B, Hq, Tq, Tk]`` dropout keep mask (with ``dropout_p``).

    Returns:
        ``out [B, Tq, Hq, D]`` (``q.dtype``; rows without keys give 0) and ``lse [B, Hq, Tq]``
        (float32, ``-inf`` for empty rows; float64 for float64 inputs).
    """
    _B, _Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale  # [B, Hq, Tq, Tk] in the dtype
    mask = allowed.to(q.device)[:, None]  # [B or 1, 1, Tq, Tk]
    s = s.masked_fill(~mask, -math.inf)
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    total = e.sum(-1, keepdim=True)
    nonempty = total > 0
    p = e / torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(
        nonempty,
        m.to(stat) + torch.log(torch.where(nonempty, total, torch.ones_like(total)).to(stat)),
        torch.full_like(m, -math.inf, dtype=stat),
    )[..., 0]
    if keep is not None:
        p = p * keep.to(q.device) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), vv)
    return out, lse


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight.t()
    return y + bias if bias is not None else y


def norm(
    x: torch.Tensor, kind: str, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm / RMSNorm / L2 norm over the last dim, in ``x.dtype``."""
    if kind == "default":
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps)
    elif kind in ("rms", "qwen_rms", "cute_rms", "fused_rms"):
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    elif kind == "l2_norm":
        y = x / torch.sqrt((x * x).sum(-1, keepdim=True))
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rope_tables(
    positions_q: np.ndarray,
    positions_k: np.ndarray,
    head_dim: int,
    *,
    variant: str,
    theta: float,
    scaling,
    partial_rotary_factor: float,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(sin, cos)`` for query and key positions ``[B, T]`` → ``[B, T, 1, R]`` each, from the
    reference's exact tables rounded to ``dtype`` (complex RoPE: the real/imaginary parts)."""
    need = int(max(positions_q.max(initial=0), positions_k.max(initial=0))) + 1
    if variant == "complex":
        table = ref_rope.freqs_cis_table(
            need, head_dim, theta=theta, partial_rotary_factor=partial_rotary_factor
        )
        sin_t, cos_t = np.imag(table), np.real(table)
    else:
        sin_t, cos_t = ref_rope.rope_tables(
            need,
            head_dim,
            theta=theta,
            scaling=scaling,
            partial_rotary_factor=partial_rotary_factor,
            variant="default",
        )

    def gather(t: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(t)[pos][..., None, :], dtype=dtype, device=device)

    return (gather(sin_t, positions_q), gather(cos_t, positions_q)), (
        gather(sin_t, positions_k),
        gather(cos_t, positions_k),
    )


def rotate_half(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``sin.shape[-1]`` channels; the rest pass through."""
    r = sin.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    return torch.cat([x_rot * cos + torch.cat([-x2, x1], -1) * sin, x_pass], -1)


def rotate_complex(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Interleaved (complex) RoPE on the first ``2 * sin.shape[-1]`` channels."""
    r = 2 * cos.shape[-1]
    re, im = x[..., 0:r:2], x[..., 1:r:2]
    rotated = torch.stack([re * cos - im * sin, re * sin + im * cos], -1).flatten(-2)
    return torch.cat([rotated, x[..., r:]], -1)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    cu_seqlens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule in the input dtype (fla's naive recurrence).

    ``q, k [B, T, HV, Dk]``, ``v [B, T, HV, Dv]``, ``g, beta [B, T, HV]``; returns ``o [B, T, HV, Dv]``
    and the final state ``[N, HV, Dk, Dv]`` (``N`` = B, or the number of documents of the one row).
    """
    B, T, HV, Dv = v.shape
    Dk = q.shape[-1]
    scale = Dk**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    segments = (
        [(0, B, 0, T)]
        if cu_seqlens is None
        else [(0, 1, cu_seqlens[n], cu_seqlens[n + 1]) for n in range(len(cu_seqlens) - 1)]
    )
    outs: list[torch.Tensor] = []
    finals = []
    for n, (b0, b1, t0, t1) in enumerate(segments):
        if initial_state is None:
            S = torch.zeros(b1 - b0, HV, Dk, Dv, dtype=q.dtype, device=q.device)
        else:
            S = initial_state[b0:b1] if cu_seqlens is None else initial_state[n : n + 1]
        seg = []
        for t in range(t0, t1):
            S = torch.exp(g[b0:b1, t])[..., None, None] * S
            u = beta[b0:b1, t][..., None] * (v[b0:b1, t] - torch.einsum("bhkv,bhk->bhv", S, k[b0:b1, t]))
            S = S + k[b0:b1, t][..., None] * u[..., None, :]
            seg.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[b0:b1, t]))
        outs.append(torch.stack(seg, 1) if seg else v.new_zeros(b1 - b0, 0, HV, Dv))
        finals.append(S)
    o = torch.cat(outs, 1) if cu_seqlens is not None else outs[0]
    return o, torch.cat(finals, 0)
