"""Whole-module forwards of ``Attention``, ``FusedAttention`` and ``NormalizedAttention`` in NumPy
float64, from weights keyed by OLMo-core ``state_dict`` names.

``Attention``, with ``x [B, T, d_model]``, ``Linear(x) = x Wᵀ + b``::

    q, k, v = w_q(x), w_k(x), w_v(x)                     [B, T, H*D], [B, T, Hkv*D], [B, T, Hkv*D]
    clip:      q, k, v = clamp(·, −clip_qkv, clip_qkv)
    qk_norm:   q, k = q_norm(q), k_norm(k) over H*D (full) ...
    reshape:   q [B, T, H, D], k, v [B, T, Hkv, D]
    qk_norm:   ... or over each head's D (use_head_qk_norm)
    RoPE:      q, k = rope(q, k)  (per-document positions with cu_doc_lens; start_pos = cache length)
    att = sdpa(q, k, v)                                  [B, T, H, D]
    gate:      att = att · σ(w_g(x))                     (headwise or elementwise)
    out = w_out(att.reshape(B, T, H*D))                  [B, T, d_model]

Options are plain values: ``qk_norm`` a kind string or a dict of ``LayerNormConfig`` fields
(``{"name": "rms", "eps": 1e-6}``; its affine parameters come from ``q_norm.*`` / ``k_norm.*`` when
present); ``rope`` a dict of ``RoPEConfig`` fields (``{"name": "default", "theta": 10_000,
"scaling": {...}, "partial_rotary_factor": 0.5}``); ``gate`` a granularity string or
``{"granularity": ...}``; ``window_size`` the user window ``w`` (→ ``(w − 1, 0)``).

Deliberate fixes over OLMo-core (bugs there): the headwise gate sees ``att`` as
``[B, T, H, D]`` also with documents and ``B > 1``; dropout is applied only when a ``keep_mask`` is
given (deterministic); ``max_doc_len*`` arguments are accepted and ignored (derived from
``cu_doc_lens``).
"""

from __future__ import annotations

import math

import numpy as np

from reference.attention import sdpa
from reference.configs import ConfigurationError, window_tuple
from reference.gating import apply_gate
from reference.kv_cache import KVCache
from reference.norms import qk_norm as apply_qk_norm
from reference.rope import apply_rope, apply_rope_packed


def linear(weights: dict, name: str, x: np.ndarray) -> np.ndarray:
    """``x @ weights[name.weight]ᵀ + weights[name.bias]`` (bias only if present); x ``[..., in]``."""
    y = x @ np.asarray(weights[f"{name}.weight"], np.float64).T
    if f"{name}.bias" in weights:
        y = y + np.asarray(weights[f"{name}.bias"], np.float64)
    return y


def _norm_config(qk_norm) -> dict:
    cfg = {"name": qk_norm} if isinstance(qk_norm, str) else dict(qk_norm)
    return {"kind": cfg.get("name", "default"), "eps": cfg.get("eps", 1e-5)}


def _rope_config(rope) -> dict:
    cfg = {"name": rope} if isinstance(rope, str) else dict(rope)
    cfg.pop("no_global_rope", None)  # consumed by configs.attention_layer_options
    cfg["variant"] = cfg.pop("name", "default")
    return cfg


def _qk_norm(weights: dict, q, k, qk_norm, *, per_head: bool, head_dim: int):
    cfg = _norm_config(qk_norm)
    q = apply_qk_norm(
        q,
        cfg["kind"],
        weights.get("q_norm.weight"),
        weights.get("q_norm.bias"),
        cfg["eps"],
        per_head,
        head_dim,
    )
    k = apply_qk_norm(
        k,
        cfg["kind"],
        weights.get("k_norm.weight"),
        weights.get("k_norm.bias"),
        cfg["eps"],
        per_head,
        head_dim,
    )
    return q, k


def _rope(q, k, rope, *, start_pos=None, cu_doc_lens=None, pos_sin=None, pos_cos=None, freqs_cis=None):
    if rope is None:
        return q, k
    cfg = _rope_config(rope)
    if cfg["variant"] == "fused":
        raise ConfigurationError("Attention does not take fused RoPE (use FusedAttention)")
    if cu_doc_lens is not None and cfg["variant"] != "default":
        raise NotImplementedError("intra-document RoPE is only supported by the default RoPE")
    return apply_rope(
        q,
        k,
        **cfg,
        start_pos=start_pos,
        cu_doc_lens=cu_doc_lens,
        pos_sin=pos_sin,
        pos_cos=pos_cos,
        freqs_cis=freqs_cis,
    )


def _project(weights, x, *, n_heads, n_kv_heads, head_dim, clip_qkv, qk_norm, use_head_qk_norm):
    """``Attention.forward`` before attention: projections, clip, QK-norm, head views.

    Returns q ``[B,T,H,D]``, k, v ``[B,T,Hkv,D]``.
    """
    B, T, d_model = x.shape
    D = head_dim or d_model // n_heads
    q, k, v = linear(weights, "w_q", x), linear(weights, "w_k", x), linear(weights, "w_v", x)
    if clip_qkv is not None:
        q, k, v = (np.clip(a, -clip_qkv, clip_qkv) for a in (q, k, v))
    if qk_norm is not None and not use_head_qk_norm:
        q, k = _qk_norm(weights, q, k, qk_norm, per_head=False, head_dim=D)
    q, k, v = (a.reshape(B, T, -1, D) for a in (q, k, v))
    if qk_norm is not None and use_head_qk_norm:
        q, k = _qk_norm(weights, q, k, qk_norm, per_head=True, head_dim=D)
    if q.shape[2] != n_heads or k.shape[2] != (n_kv_heads or n_heads):
        raise ValueError(
            f"weights give {q.shape[2]} q heads and {k.shape[2]} kv heads, options say "
            f"n_heads={n_heads}, n_kv_heads={n_kv_heads}"
        )
    return q, k, v


def _gate_and_out(weights, x, att, gate) -> np.ndarray:
    """``Attention.forward`` after attention: output gate, then ``w_out``, on ``att [B, T, H, D]``."""
    B, T = x.shape[:2]
    if gate is not None:
        cfg = {"granularity": gate} if isinstance(gate, str) else dict(gate)
        att = apply_gate(att, linear(weights, "w_g", x), cfg["granularity"], cfg.get("full_precision", True))
    return linear(weights, "w_out", att.reshape(B, T, -1))


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
) -> np.ndarray:
    """``Attention.forward``: ``x [B, T, d_model]`` → ``[B, T, d_model]`` (module docstring).

    ``keep_mask`` as in :func:`reference.attention.sdpa`; without it no dropout is applied.
    """
    del max_doc_len, max_doc_len_q, max_doc_len_k
    x = np.asarray(x, np.float64)
    q, k, v = _project(
        weights,
        x,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        clip_qkv=clip_qkv,
        qk_norm=qk_norm,
        use_head_qk_norm=use_head_qk_norm,
    )
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
    return _gate_and_out(weights, x, att, gate)


def attention_forward_cached(
    weights: dict,
    x,
    cache: KVCache,
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
    cache_leftpad=None,
) -> tuple[np.ndarray, KVCache]:
    """``Attention.forward`` with a KV cache: RoPE ``start_pos = cache.cache_seqlens`` (same for
    every row), attention via :meth:`KVCache.step`; ``cache_leftpad [B]`` is recorded when given.

    Returns ``out [B, T, d_model]`` and the advanced cache.
    """
    x = np.asarray(x, np.float64)
    q, k, v = _project(
        weights,
        x,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        clip_qkv=clip_qkv,
        qk_norm=qk_norm,
        use_head_qk_norm=use_head_qk_norm,
    )
    q, k = _rope(q, k, rope, start_pos=cache.cache_seqlens)
    att, _, cache = cache.step(
        q, k, v, cache_leftpad=cache_leftpad, scale=softmax_scale, window=window_tuple(window_size)
    )
    return _gate_and_out(weights, x, att, gate), cache


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
) -> np.ndarray:
    """``FusedAttention.forward``: ``qkv = w_qkv(x).view(B, T, 3, H, D)`` (``D = d_model // H``),
    clip, fused RoPE at positions ``[0, T)``, attention, ``w_out``. ``x [B, T, d_model]`` →
    ``[B, T, d_model]``. ``w_qkv.weight = cat(w_q, w_k, w_v)`` of an ``Attention`` checkpoint."""
    del max_doc_len
    if cache_leftpad is not None:
        raise NotImplementedError("FusedAttention does not support a KV cache (cache_leftpad)")
    x = np.asarray(x, np.float64)
    B, T, d_model = x.shape
    D = d_model // n_heads
    qkv = linear(weights, "w_qkv", x).reshape(B, T, 3, n_heads, D)
    if clip_qkv is not None:
        qkv = np.clip(qkv, -clip_qkv, clip_qkv)
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
) -> np.ndarray:
    """``NormalizedAttention.forward`` (nGPT), ``D = d_model // H``::

        q, k, v = w_q(x), w_k(x), w_v(x)           (no biases in OLMo-core; used if present)
        q, k = q_norm(q), k_norm(k)                over all heads jointly (nGPT uses l2_norm)
        q = q · sq · sqrt(d_model),  k = k · sk · sqrt(d_model)
        RoPE, then attention with scale sqrt(D) (not 1/sqrt(D)), then w_out

    ``x [B, T, d_model]`` → ``[B, T, d_model]``; ``sq [H*D]``, ``sk [Hkv*D]``.
    """
    del max_doc_len, max_doc_len_q, max_doc_len_k
    if cache_leftpad is not None:
        raise NotImplementedError("NormalizedAttention does not support a KV cache (cache_leftpad)")
    x = np.asarray(x, np.float64)
    B, T, d_model = x.shape
    D = d_model // n_heads
    q, k, v = linear(weights, "w_q", x), linear(weights, "w_k", x), linear(weights, "w_v", x)
    if qk_norm is not None:
        q, k = _qk_norm(weights, q, k, qk_norm, per_head=False, head_dim=D)
    q = q * (np.asarray(weights["sq"], np.float64) * math.sqrt(d_model))
    k = k * (np.asarray(weights["sk"], np.float64) * math.sqrt(d_model))
    q, k, v = (a.reshape(B, T, -1, D) for a in (q, k, v))
    if q.shape[2] != n_heads or k.shape[2] != (n_kv_heads or n_heads):
        raise ValueError(
            f"weights give {q.shape[2]} q / {k.shape[2]} kv heads, options say {n_heads}/{n_kv_heads}"
        )
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
    """nGPT ``normalize_matrices``: unit-norm rows of ``w_q/w_k/w_v.weight`` (over ``d_model``, the
    input dim) and unit-norm columns of ``w_out.weight`` (over ``d_model``, its output dim); no eps.
    Returns a new dict; other entries are passed through unchanged."""
    out = dict(weights)
    for name in ("w_q", "w_k", "w_v"):
        w = np.asarray(weights[f"{name}.weight"], np.float64)
        out[f"{name}.weight"] = w / np.linalg.norm(w, axis=-1, keepdims=True)
    w = np.asarray(weights["w_out.weight"], np.float64)
    out["w_out.weight"] = w / np.linalg.norm(w, axis=0, keepdims=True)
    return out
