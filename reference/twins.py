"""Float64 torch twins of the differentiable reference operators, for reference gradients.

Each twin has the signature of its NumPy namesake but takes and returns ``torch.float64`` tensors
and is plain autograd over the same formulas (see the NumPy modules for them). Masks, positions and
RoPE tables are not differentiable and come from the NumPy helpers. Rows with no visible key give
output 0, ``lse = -inf`` and zero gradients (never NaN). Attention here is dense (no query blocks):
meant for test-sized inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from reference.attention import allowed_mask
from reference.configs import ConfigurationError, window_tuple
from reference.gated_deltanet import _sequences
from reference.modules import _norm_config, _rope_config
from reference.norms import NORM_KINDS
from reference.rope import freqs_cis_table, rope_positions, rope_tables, rotary_dim

F64 = torch.float64


def _t(x) -> torch.Tensor:
    """A float64 tensor (keeps autograd history of float64 tensors)."""
    return x if isinstance(x, torch.Tensor) and x.dtype == F64 else torch.as_tensor(np.asarray(x), dtype=F64)


def _bool(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=bool))


# ---------------------------------------------------------------------------------------------- attention


def attention(
    q,
    k,
    v,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    key_valid=None,
    keep_mask=None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`reference.attention.attention`: ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``."""
    q, k, v = _t(q), _t(k), _t(v)
    varlen = q.dim() == 3
    if varlen:
        q, k, v = q[None], k[None], v[None]
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if (cu_seqlens_q is not None or cu_seqlens_k is not None) and B != 1:
        raise ValueError(f"cu_seqlens need one flattened sequence (B == 1), got B={B}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    allowed = torch.from_numpy(
        allowed_mask(
            Tq, Tk, causal=causal, window=window, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k
        )
    )[None]
    if key_valid is not None:
        allowed = allowed & _bool(key_valid)[:, None, :]
    allowed = allowed[:, None]  # [B or 1, 1, Tq, Tk]
    G = Hq // Hkv
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = scale * torch.einsum("bqhd,bkhd->bhqk", q, k)
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, m + torch.log(safe), torch.full_like(m, -math.inf))[..., 0]
    if keep_mask is not None:
        p = p * _bool(keep_mask) / (1.0 - dropout_p)
    out = (torch.einsum("bhqk,bkhd->bhqd", p, v) / safe).transpose(1, 2)
    if varlen:
        return out[0], lse[0]
    return out, lse


def sdpa(
    q,
    k,
    v,
    *,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    cu_doc_lens=None,
    cu_doc_lens_q=None,
    cu_doc_lens_k=None,
    local_k_slice: slice | None = None,
    causal: bool = True,
    keep_mask=None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`reference.attention.sdpa`."""
    q, k, v = _t(q), _t(k), _t(v)
    if cu_doc_lens is not None:
        cu_doc_lens_q = cu_doc_lens if cu_doc_lens_q is None else cu_doc_lens_q
        cu_doc_lens_k = cu_doc_lens if cu_doc_lens_k is None else cu_doc_lens_k
    if (cu_doc_lens_q is None) != (cu_doc_lens_k is None):
        raise ValueError("give both cu_doc_lens_q and cu_doc_lens_k (or cu_doc_lens)")
    options = dict(scale=scale, causal=causal, window=window, keep_mask=keep_mask, dropout_p=dropout_p)
    if cu_doc_lens_q is None:
        if local_k_slice is not None:
            k, v = k[:, local_k_slice], v[:, local_k_slice]
        return attention(q, k, v, **options)
    B, Tq, Hq, D = q.shape
    k_flat, v_flat = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    if local_k_slice is not None:
        k_flat, v_flat = k_flat[local_k_slice], v_flat[local_k_slice]
    out, lse = attention(
        q.reshape(1, B * Tq, Hq, D),
        k_flat[None],
        v_flat[None],
        cu_seqlens_q=cu_doc_lens_q,
        cu_seqlens_k=cu_doc_lens_k,
        **options,
    )
    return out.reshape(B, Tq, Hq, D), lse.reshape(Hq, B, Tq).transpose(0, 1)


def kv_cache_attention(
    q_new,
    k_new,
    v_new,
    k_cache,
    v_cache,
    *,
    cache_seqlens: int,
    cache_leftpad=None,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
):
    """Twin of :func:`reference.kv_cache.kv_cache_attention` → ``(out, lse, k_cache', v_cache')``."""
    q_new, k_new, v_new, k_cache, v_cache = (_t(a) for a in (q_new, k_new, v_new, k_cache, v_cache))
    B, Tn = q_new.shape[:2]
    S = k_cache.shape[1]
    start = int(cache_seqlens)
    if start < 0 or start + Tn > S:
        raise ValueError(f"cache_seqlens={start} plus {Tn} new tokens does not fit a cache of length {S}")
    leftpad = (
        torch.zeros(B, dtype=torch.long) if cache_leftpad is None else torch.as_tensor(cache_leftpad).long()
    )
    write = (start + torch.arange(Tn))[None, :] >= leftpad[:, None]  # [B, Tn]
    write = write[..., None, None]
    k_cache = torch.cat(
        [
            k_cache[:, :start],
            torch.where(write, k_new, k_cache[:, start : start + Tn]),
            k_cache[:, start + Tn :],
        ],
        1,
    )
    v_cache = torch.cat(
        [
            v_cache[:, :start],
            torch.where(write, v_new, v_cache[:, start : start + Tn]),
            v_cache[:, start + Tn :],
        ],
        1,
    )
    used = start + Tn
    key_valid = torch.arange(used)[None, :] >= leftpad[:, None]
    out, lse = attention(
        q_new,
        k_cache[:, :used],
        v_cache[:, :used],
        scale=scale,
        causal=True,
        window=window,
        key_valid=key_valid,
    )
    return out, lse, k_cache, v_cache


# ---------------------------------------------------------------------------------------------- RoPE


def _rotate_half(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    r = sin.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    return torch.cat([x_rot * cos + torch.cat([-x2, x1], -1) * sin, x_pass], -1)


def _rotate_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = 2 * cos.shape[-1]
    re, im = x[..., 0:r:2], x[..., 1:r:2]
    rotated = torch.stack([re * cos - im * sin, re * sin + im * cos], -1).flatten(-2)
    return torch.cat([rotated, x[..., r:]], -1)


def _gather(table: np.ndarray, pos: np.ndarray) -> np.ndarray:
    if pos.size and pos.max() >= table.shape[0]:
        raise ValueError(f"RoPE buffer has {table.shape[0]} rows, position {pos.max()} needs more")
    return table[pos][..., None, :]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`reference.rope.apply_rope`."""
    del full_precision
    q, k = _t(q), _t(k)
    if head_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, Tq, _, D = q.shape
    Tk = k.shape[1]
    if variant not in ("default", "fused", "complex"):
        raise ValueError(f"variant must be 'default', 'fused' or 'complex', got {variant!r}")
    if cu_doc_lens is not None and variant != "default":
        raise ValueError(f"per-document positions (cu_doc_lens) need variant 'default', got {variant!r}")
    if variant == "fused":
        if partial_rotary_factor != 1.0 or Tq != Tk:
            raise ValueError("fused RoPE needs partial_rotary_factor == 1 and Tq == Tk")
        start_pos = 0 if start_pos is None else start_pos
    q_pos, k_pos = rope_positions(Tq, Tk, batch=B, start_pos=start_pos, cu_doc_lens=cu_doc_lens)
    need = int(max(q_pos.max(initial=0), k_pos.max(initial=0))) + 1
    if variant == "complex":
        if scaling is not None or pos_sin is not None or pos_cos is not None:
            raise ValueError("complex RoPE takes neither scaling nor pos_sin/pos_cos")
        table = np.asarray(
            freqs_cis_table(need, D, theta=theta, partial_rotary_factor=partial_rotary_factor)
            if freqs_cis is None
            else freqs_cis
        )
        out_q = _rotate_complex(q, *(_t(f(_gather(table, q_pos))) for f in (np.real, np.imag)))
        out_k = _rotate_complex(k, *(_t(f(_gather(table, k_pos))) for f in (np.real, np.imag)))
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
        pos_sin, pos_cos = (
            np.asarray(a.detach() if isinstance(a, torch.Tensor) else a) for a in (pos_sin, pos_cos)
        )
        if variant == "fused":
            pos_sin, pos_cos = np.concatenate([pos_sin] * 2, -1), np.concatenate([pos_cos] * 2, -1)
        if pos_sin.shape[-1] != rotary_dim(D, partial_rotary_factor):
            raise ValueError(f"RoPE tables have {pos_sin.shape[-1]} columns")
        out_q = _rotate_half(q, _t(_gather(pos_sin, q_pos)), _t(_gather(pos_cos, q_pos)))
        out_k = _rotate_half(k, _t(_gather(pos_sin, k_pos)), _t(_gather(pos_cos, k_pos)))
    if head_first:
        out_q, out_k = out_q.transpose(1, 2), out_k.transpose(1, 2)
    return out_q, out_k


def apply_rope_packed(
    qkv, *, theta: float = 500_000, scaling=None, start_pos=None, pos_sin=None, pos_cos=None
):
    """Twin of :func:`reference.rope.apply_rope_packed` on ``qkv [B, T, 3, H, D]``."""
    qkv = _t(qkv)
    q, k = apply_rope(
        qkv[:, :, 0],
        qkv[:, :, 1],
        variant="fused",
        theta=theta,
        scaling=scaling,
        start_pos=start_pos,
        pos_sin=pos_sin,
        pos_cos=pos_cos,
    )
    return torch.stack([q, k, qkv[:, :, 2]], dim=2)


# ---------------------------------------------------------------------------------------------- norms, gate


def _affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    if weight is not None:
        y = y * _t(weight)
    if bias is not None:
        y = y + _t(bias)
    return y


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Twin of :func:`reference.norms.layer_norm`."""
    x = _t(x)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def rms_norm(x, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Twin of :func:`reference.norms.rms_norm`."""
    x = _t(x)
    return _affine(x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps), weight, bias)


def qwen_rms_norm(x, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Twin of :func:`reference.norms.qwen_rms_norm`."""
    return rms_norm(x, weight, bias, eps)


def l2_norm(x) -> torch.Tensor:
    """Twin of :func:`reference.norms.l2_norm`."""
    x = _t(x)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def norm(x, kind: str, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Twin of :func:`reference.norms.norm`."""
    if kind == "default":
        return layer_norm(x, weight, bias, eps)
    if kind in ("rms", "cute_rms", "fused_rms", "qwen_rms"):
        return rms_norm(x, weight, bias, eps)
    if kind == "l2_norm":
        if weight is not None or bias is not None:
            raise ValueError("l2_norm has no parameters")
        return l2_norm(x)
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


def qk_norm(x, kind: str, weight=None, bias=None, eps: float = 1e-5, per_head: bool = False, head_dim=None):
    """Twin of :func:`reference.norms.qk_norm`."""
    x = _t(x)
    shape = x.shape
    if per_head:
        if x.dim() == 3:
            if head_dim is None:
                raise ValueError("per-head qk_norm of a [B, T, H*D] input needs head_dim")
            x = x.reshape(*shape[:-1], -1, head_dim)
        return norm(x, kind, weight, bias, eps).reshape(shape)
    if x.dim() == 4:
        x = x.reshape(*shape[:2], -1)
    return norm(x, kind, weight, bias, eps).reshape(shape)


def apply_gate(att, gate_logits, granularity: str, full_precision: bool = True) -> torch.Tensor:
    """Twin of :func:`reference.gating.apply_gate`: ``att [B, T, H, D]`` → ``[B, T, H, D]``."""
    del full_precision
    att, gate = _t(att), torch.sigmoid(_t(gate_logits))
    B, T, H, D = att.shape
    if granularity == "headwise":
        return att * gate.reshape(B, T, H)[..., None]
    if granularity == "elementwise":
        return att * gate.reshape(B, T, H, D)
    raise ValueError(f"granularity must be 'headwise' or 'elementwise', got {granularity!r}")


# ---------------------------------------------------------------------------------------------- modules


def linear(weights: dict, name: str, x) -> torch.Tensor:
    """Twin of :func:`reference.modules.linear`."""
    y = _t(x) @ _t(weights[f"{name}.weight"]).T
    if f"{name}.bias" in weights:
        y = y + _t(weights[f"{name}.bias"])
    return y


def _qk_norm(weights, q, k, cfg, *, per_head, head_dim):
    c = _norm_config(cfg)
    q = qk_norm(
        q, c["kind"], weights.get("q_norm.weight"), weights.get("q_norm.bias"), c["eps"], per_head, head_dim
    )
    k = qk_norm(
        k, c["kind"], weights.get("k_norm.weight"), weights.get("k_norm.bias"), c["eps"], per_head, head_dim
    )
    return q, k


def _rope(q, k, rope, *, cu_doc_lens=None, pos_sin=None, pos_cos=None, freqs_cis=None):
    if rope is None:
        return q, k
    cfg = _rope_config(rope)
    if cfg["variant"] == "fused":
        raise ConfigurationError("Attention does not take fused RoPE (use FusedAttention)")
    if cu_doc_lens is not None and cfg["variant"] != "default":
        raise NotImplementedError("intra-document RoPE is only supported by the default RoPE")
    return apply_rope(
        q, k, **cfg, cu_doc_lens=cu_doc_lens, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis
    )


def attention_forward(
    weights: dict,
    x,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    clip_qkv: float | None = None,
    qk_norm=None,
    use_head_qk_norm: bool = False,
    rope=None,
    gate=None,
    window_size: int | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    keep_mask=None,
    cu_doc_lens=None,
    cu_doc_lens_q=None,
    cu_doc_lens_k=None,
    max_doc_len=None,
    max_doc_len_q=None,
    max_doc_len_k=None,
    local_k_slice: slice | None = None,
    pos_sin=None,
    pos_cos=None,
    freqs_cis=None,
) -> torch.Tensor:
    """Twin of :func:`reference.modules.attention_forward`."""
    del max_doc_len, max_doc_len_q, max_doc_len_k
    x = _t(x)
    B, T, d_model = x.shape
    D = head_dim or d_model // n_heads
    q, k, v = linear(weights, "w_q", x), linear(weights, "w_k", x), linear(weights, "w_v", x)
    if clip_qkv is not None:
        q, k, v = (a.clamp(-clip_qkv, clip_qkv) for a in (q, k, v))
    if qk_norm is not None and not use_head_qk_norm:
        q, k = _qk_norm(weights, q, k, qk_norm, per_head=False, head_dim=D)
    q, k, v = (a.reshape(B, T, -1, D) for a in (q, k, v))
    if qk_norm is not None and use_head_qk_norm:
        q, k = _qk_norm(weights, q, k, qk_norm, per_head=True, head_dim=D)
    q, k = _rope(q, k, rope, cu_doc_lens=cu_doc_lens, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis)
    att, _ = sdpa(
        q,
        k,
        v,
        scale=softmax_scale,
        window=window_tuple(window_size),
        cu_doc_lens=cu_doc_lens,
        cu_doc_lens_q=cu_doc_lens_q,
        cu_doc_lens_k=cu_doc_lens_k,
        local_k_slice=local_k_slice,
        keep_mask=keep_mask,
        dropout_p=dropout_p if keep_mask is not None else 0.0,
    )
    if gate is not None:
        cfg = {"granularity": gate} if isinstance(gate, str) else dict(gate)
        att = apply_gate(att, linear(weights, "w_g", x), cfg["granularity"])
    return linear(weights, "w_out", att.reshape(B, T, -1))


def fused_attention_forward(
    weights: dict,
    x,
    *,
    n_heads: int,
    rope=None,
    clip_qkv: float | None = None,
    dropout_p: float = 0.0,
    keep_mask=None,
    cu_doc_lens=None,
    max_doc_len=None,
    pos_sin=None,
    pos_cos=None,
    cache_leftpad=None,
) -> torch.Tensor:
    """Twin of :func:`reference.modules.fused_attention_forward`."""
    del max_doc_len
    if cache_leftpad is not None:
        raise NotImplementedError("FusedAttention does not support a KV cache (cache_leftpad)")
    x = _t(x)
    B, T, d_model = x.shape
    qkv = linear(weights, "w_qkv", x).reshape(B, T, 3, n_heads, d_model // n_heads)
    if clip_qkv is not None:
        qkv = qkv.clamp(-clip_qkv, clip_qkv)
    if rope is not None:
        cfg = _rope_config(rope)
        if cfg.pop("variant") != "fused":
            raise ConfigurationError("FusedAttention needs the fused RoPE")
        if cu_doc_lens is not None:
            raise NotImplementedError("FusedAttention does not support intra-document RoPE (cu_doc_lens)")
        cfg.pop("full_precision", None)
        if cfg.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigurationError("fused RoPE does not support partial_rotary_factor != 1.0")
        qkv = apply_rope_packed(qkv, **cfg, pos_sin=pos_sin, pos_cos=pos_cos)
    att, _ = sdpa(
        qkv[:, :, 0],
        qkv[:, :, 1],
        qkv[:, :, 2],
        cu_doc_lens=cu_doc_lens,
        keep_mask=keep_mask,
        dropout_p=dropout_p if keep_mask is not None else 0.0,
    )
    return linear(weights, "w_out", att.reshape(B, T, -1))


def normalized_attention_forward(
    weights: dict,
    x,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    rope=None,
    qk_norm=None,
    dropout_p: float = 0.0,
    keep_mask=None,
    cu_doc_lens=None,
    cu_doc_lens_q=None,
    cu_doc_lens_k=None,
    max_doc_len=None,
    max_doc_len_q=None,
    max_doc_len_k=None,
    local_k_slice: slice | None = None,
    pos_sin=None,
    pos_cos=None,
    freqs_cis=None,
    cache_leftpad=None,
) -> torch.Tensor:
    """Twin of :func:`reference.modules.normalized_attention_forward`."""
    del max_doc_len, max_doc_len_q, max_doc_len_k, n_kv_heads
    if cache_leftpad is not None:
        raise NotImplementedError("NormalizedAttention does not support a KV cache (cache_leftpad)")
    x = _t(x)
    B, T, d_model = x.shape
    D = d_model // n_heads
    q, k, v = linear(weights, "w_q", x), linear(weights, "w_k", x), linear(weights, "w_v", x)
    if qk_norm is not None:
        q, k = _qk_norm(weights, q, k, qk_norm, per_head=False, head_dim=D)
    q = q * (_t(weights["sq"]) * math.sqrt(d_model))
    k = k * (_t(weights["sk"]) * math.sqrt(d_model))
    q, k, v = (a.reshape(B, T, -1, D) for a in (q, k, v))
    q, k = _rope(q, k, rope, cu_doc_lens=cu_doc_lens, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis)
    att, _ = sdpa(
        q,
        k,
        v,
        scale=math.sqrt(D),
        cu_doc_lens=cu_doc_lens,
        cu_doc_lens_q=cu_doc_lens_q,
        cu_doc_lens_k=cu_doc_lens_k,
        local_k_slice=local_k_slice,
        keep_mask=keep_mask,
        dropout_p=dropout_p if keep_mask is not None else 0.0,
    )
    return linear(weights, "w_out", att.reshape(B, T, -1))


def normalize_matrices(weights: dict) -> dict:
    """Twin of :func:`reference.modules.normalize_matrices`."""
    out = dict(weights)
    for name in ("w_q", "w_k", "w_v"):
        w = _t(weights[f"{name}.weight"])
        out[f"{name}.weight"] = w / w.norm(dim=-1, keepdim=True)
    w = _t(weights["w_out.weight"])
    out["w_out.weight"] = w / w.norm(dim=0, keepdim=True)
    return out


# ---------------------------------------------------------------------------------------------- Gated DeltaNet


def silu(x) -> torch.Tensor:
    x = _t(x)
    return x * torch.sigmoid(x)


def softplus(x) -> torch.Tensor:
    """``ln(1 + eˣ)`` without torch's linear cut-off at 20 (matches the NumPy reference exactly)."""
    x = _t(x)
    return torch.logaddexp(x, torch.zeros_like(x))


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    cu_seqlens=None,
):
    """Twin of :func:`reference.gated_deltanet.gated_delta_rule` → ``(o, final_state or None)``."""
    q, k, v, g, beta = (_t(a) for a in (q, k, v, g, beta))
    B, T, HV, Dv = v.shape
    if q.shape[2] != HV:
        q, k = (a.repeat_interleave(HV // q.shape[2], dim=2) for a in (q, k))
    Dk = q.shape[-1]
    scale = Dk**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    seqs = _sequences(cu_seqlens, B, T)
    steps, finals = [], []  # outputs in time order: all rows at once, or document after document
    for n, (rows, start, stop) in enumerate(seqs):
        states = rows if cu_seqlens is None else slice(n, n + 1)
        n_rows = rows.stop - rows.start
        S = torch.zeros(n_rows, HV, Dk, Dv, dtype=F64) if initial_state is None else _t(initial_state)[states]
        for t in range(start, stop):
            S = torch.exp(g[rows, t])[..., None, None] * S
            u = beta[rows, t][..., None] * (v[rows, t] - torch.einsum("bhkv,bhk->bhv", S, k[rows, t]))
            S = S + k[rows, t][..., None] * u[..., None, :]
            steps.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[rows, t]))
        finals.append(S)
    o = torch.stack(steps, dim=1) if steps else torch.zeros(B, 0, HV, Dv, dtype=F64)
    return o, torch.cat(finals) if output_final_state else None


def causal_conv1d(x, weight, bias=None, cu_seqlens=None, activation: str | None = "silu") -> torch.Tensor:
    """Twin of :func:`reference.gated_deltanet.causal_conv1d`."""
    x = _t(x)
    B, T, C = x.shape
    w = _t(weight).reshape(C, -1)
    Kc = w.shape[1]
    start = torch.zeros(T, dtype=torch.long)
    for _rows, s0, s1 in _sequences(cu_seqlens, B, T):
        start[s0:s1] = s0
    t = torch.arange(T)
    y = torch.zeros_like(x)
    for i in range(Kc):
        src = t - (Kc - 1 - i)
        valid = (src >= start)[None, :, None]
        y = y + torch.where(valid, x[:, src.clamp(min=0)], torch.zeros_like(x)) * w[:, i]
    if bias is not None:
        y = y + _t(bias)
    if activation in ("silu", "swish"):
        return silu(y)
    if activation is None:
        return y
    raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")


def gated_rms_norm(o, z, weight, eps: float = 1e-5) -> torch.Tensor:
    """Twin of :func:`reference.gated_deltanet.gated_rms_norm`."""
    o = _t(o)
    return o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps) * _t(weight) * silu(z)


def gdn_layer_forward(
    weights: dict,
    x,
    *,
    n_heads: int,
    n_v_heads: int | None = None,
    head_dim: int | None = None,
    expand_v: float = 2.0,
    allow_neg_eigval: bool = True,
    conv_size: int = 4,
    norm_eps: float = 1e-5,
    cu_doc_lens=None,
) -> torch.Tensor:
    """Twin of :func:`reference.gated_deltanet.gdn_layer_forward`."""
    x = _t(x)
    B, T, d_model = x.shape
    H, HV = n_heads, n_v_heads or n_heads
    Dk = head_dim or d_model // n_heads
    Dv = int(Dk * expand_v)

    def lin(name, a):
        return a @ _t(weights[f"{name}.weight"]).T

    def conv(name, a):
        w = _t(weights[f"{name}.weight"])
        if w.shape[-1] != conv_size:
            raise ValueError(f"{name}.weight has kernel width {w.shape[-1]}, conv_size is {conv_size}")
        return causal_conv1d(a, w, weights.get(f"{name}.bias"), cu_seqlens=cu_doc_lens)

    beta = torch.sigmoid(lin("w_b", x))
    if allow_neg_eigval:
        beta = 2 * beta
    g = -torch.exp(_t(weights["A_log"])) * softplus(lin("w_a", x) + _t(weights["dt_bias"]))
    q = conv("q_conv1d", lin("w_q", x)).reshape(B, T, H, Dk).repeat_interleave(HV // H, dim=2)
    k = conv("k_conv1d", lin("w_k", x)).reshape(B, T, H, Dk).repeat_interleave(HV // H, dim=2)
    v = conv("v_conv1d", lin("w_v", x)).reshape(B, T, HV, Dv)
    o, _ = gated_delta_rule(q, k, v, g, beta, output_final_state=False, cu_seqlens=cu_doc_lens)
    y = gated_rms_norm(o, lin("w_g", x).reshape(B, T, HV, Dv), weights["o_norm.weight"], norm_eps)
    return lin("w_out", y.reshape(B, T, HV * Dv))
