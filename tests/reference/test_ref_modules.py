"""reference.modules: whole-module forwards against torch.nn.MultiheadAttention and
module-level invariances (batch invariance, documents, fused == unfused, nGPT, KV cache)."""

import itertools
import math

import numpy as np
import pytest
import torch

from reference.attention import attention
from reference.configs import ConfigurationError
from reference.kv_cache import KVCache
from reference.modules import (
    attention_forward,
    attention_forward_cached,
    fused_attention_forward,
    normalize_matrices,
    normalized_attention_forward,
)
from reference.norms import l2_norm


def attn_weights(rng, d_model=16, H=4, Hkv=None, D=None, bias=True, gate=None, qk_norm=False, per_head=False):
    Hkv, D = Hkv or H, D or d_model // H
    shapes = {
        "w_q": (H * D, d_model),
        "w_k": (Hkv * D, d_model),
        "w_v": (Hkv * D, d_model),
        "w_out": (d_model, H * D),
    }
    if gate:
        shapes["w_g"] = (H if gate == "headwise" else H * D, d_model)
    w = {}
    for name, shape in shapes.items():
        w[f"{name}.weight"] = rng.standard_normal(shape) / math.sqrt(shape[1])
        if bias:
            w[f"{name}.bias"] = 0.1 * rng.standard_normal(shape[0])
    if qk_norm:
        for name, size in (("q_norm", D if per_head else H * D), ("k_norm", D if per_head else Hkv * D)):
            w[f"{name}.weight"] = 1 + 0.1 * rng.standard_normal(size)
            w[f"{name}.bias"] = 0.1 * rng.standard_normal(size)
    return w


CONFIGS = {
    "mha": dict(),
    "mqa_clip": dict(n_kv_heads=1, clip_qkv=0.5),
    "gqa_rope": dict(n_kv_heads=2, rope={"name": "default", "theta": 10_000}),
    "complex_rope": dict(rope={"name": "complex"}),
    "qk_norm": dict(qk_norm={"name": "default"}),
    "head_qk_norm": dict(qk_norm={"name": "rms", "eps": 1e-6}, use_head_qk_norm=True),
    "gate_headwise": dict(gate="headwise"),
    "gate_elementwise": dict(gate={"granularity": "elementwise"}, window_size=3),
    "partial_yarn": dict(rope={"name": "default", "partial_rotary_factor": 0.5, "scaling": {"type": "yarn"}}),
}


def build(rng, name):
    opts = dict(n_heads=4, **CONFIGS[name])
    gate = opts.get("gate")
    gate = gate if isinstance(gate, str | None) else gate["granularity"]
    w = attn_weights(
        rng,
        Hkv=opts.get("n_kv_heads"),
        gate=gate,
        qk_norm="qk_norm" in opts,
        per_head=opts.get("use_head_qk_norm", False),
    )
    return w, opts


def test_plain_attention_matches_torch_multihead_attention():
    rng = np.random.default_rng(0)
    w = attn_weights(rng)
    x = rng.standard_normal((2, 7, 16))
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.from_numpy(np.concatenate([w["w_q.weight"], w["w_k.weight"], w["w_v.weight"]]))
        )
        mha.in_proj_bias.copy_(
            torch.from_numpy(np.concatenate([w["w_q.bias"], w["w_k.bias"], w["w_v.bias"]]))
        )
        mha.out_proj.weight.copy_(torch.from_numpy(w["w_out.weight"]))
        mha.out_proj.bias.copy_(torch.from_numpy(w["w_out.bias"]))
        xt = torch.from_numpy(x)
        causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True = masked out
        want, _ = mha(xt, xt, xt, attn_mask=causal, need_weights=False)
    np.testing.assert_allclose(attention_forward(w, x, n_heads=4), want.numpy(), rtol=1e-12, atol=1e-13)
    w_fused = {
        "w_qkv.weight": mha.in_proj_weight.detach().numpy(),
        "w_qkv.bias": mha.in_proj_bias.detach().numpy(),
    }
    w_fused.update({"w_out.weight": w["w_out.weight"], "w_out.bias": w["w_out.bias"]})
    np.testing.assert_allclose(
        fused_attention_forward(w_fused, x, n_heads=4), want.numpy(), rtol=1e-12, atol=1e-13
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_invariance(name):
    """Batch invariance: attention(cat(x1, x2))[i] == attention(x_i)."""
    rng = np.random.default_rng(1)
    w, opts = build(rng, name)
    x = rng.standard_normal((2, 9, 16))
    both = attention_forward(w, x, **opts)
    for i in range(2):
        np.testing.assert_allclose(
            both[i : i + 1], attention_forward(w, x[i : i + 1], **opts), rtol=1e-13, atol=1e-14
        )


@pytest.mark.parametrize("name", ["mha", "gqa_rope", "gate_headwise", "gate_elementwise", "head_qk_norm"])
def test_documents_equal_separate_forwards(name):
    """Packed documents (spanning rows, B = 2) equal each document run alone: masking and the
    per-document RoPE positions isolate them; the headwise gate works with documents and B > 1."""
    rng = np.random.default_rng(2)
    w, opts = build(rng, name)
    x = rng.standard_normal((2, 8, 16))
    cu = [0, 3, 11, 16]
    packed = attention_forward(w, x, cu_doc_lens=cu, **opts).reshape(1, 16, 16)
    flat = x.reshape(1, 16, 16)
    for a, b in itertools.pairwise(cu):
        np.testing.assert_allclose(
            packed[:, a:b], attention_forward(w, flat[:, a:b], **opts), rtol=1e-12, atol=1e-13
        )
    one_per_row = attention_forward(w, x, cu_doc_lens=[0, 8, 16], **opts)
    np.testing.assert_allclose(one_per_row, attention_forward(w, x, **opts), rtol=1e-13, atol=1e-14)


def test_fused_equals_unfused_with_rope():
    """Fused == unfused with RoPE: w_qkv = cat(w_q, w_k, w_v); fused RoPE == default RoPE."""
    rng = np.random.default_rng(3)
    w = attn_weights(rng)
    x = rng.standard_normal((2, 6, 16))
    fused = {
        "w_qkv.weight": np.concatenate([w[f"w_{n}.weight"] for n in "qkv"]),
        "w_qkv.bias": np.concatenate([w[f"w_{n}.bias"] for n in "qkv"]),
        "w_out.weight": w["w_out.weight"],
        "w_out.bias": w["w_out.bias"],
    }
    for extra in (dict(), dict(clip_qkv=0.3)):
        want = attention_forward(w, x, n_heads=4, rope={"name": "default"}, **extra)
        got = fused_attention_forward(fused, x, n_heads=4, rope={"name": "fused"}, **extra)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    no_rope_docs = fused_attention_forward(fused, x, n_heads=4, cu_doc_lens=[0, 5, 12])
    np.testing.assert_allclose(
        no_rope_docs, attention_forward(w, x, n_heads=4, cu_doc_lens=[0, 5, 12]), rtol=1e-13
    )


def test_clip_applies_to_q_k_and_v():
    rng = np.random.default_rng(4)
    w = attn_weights(rng)
    x = 5 * rng.standard_normal((1, 4, 16))
    w_v_only = {name: (0 * a if name.startswith(("w_q", "w_k")) else a) for name, a in w.items()}
    # q = k = 0: uniform attention whatever the clip, so only clipping v can change the output
    clipped = attention_forward(w_v_only, x, n_heads=4, clip_qkv=0.05)
    assert not np.allclose(clipped, attention_forward(w_v_only, x, n_heads=4))
    v = np.clip(x @ w["w_v.weight"].T + w["w_v.bias"], -0.05, 0.05)
    uniform = np.cumsum(v, axis=1) / np.arange(1, 5)[None, :, None]
    np.testing.assert_allclose(clipped, uniform @ w["w_out.weight"].T + w["w_out.bias"], rtol=1e-12)


def test_dropout_only_with_keep_mask():
    rng = np.random.default_rng(5)
    w, opts = build(rng, "mha")
    x = rng.standard_normal((1, 5, 16))
    plain = attention_forward(w, x, **opts)
    np.testing.assert_array_equal(attention_forward(w, x, dropout_p=0.5, **opts), plain)
    keep = np.ones((1, 4, 5, 5), dtype=bool)
    # keep everything with p = 0.5: att doubles, so out = 2 (plain − b_out) + b_out
    doubled = attention_forward(w, x, dropout_p=0.5, keep_mask=keep, **opts)
    np.testing.assert_allclose(doubled, 2 * plain - w["w_out.bias"], rtol=1e-12, atol=1e-13)


def test_normalized_attention_matches_formula():
    rng = np.random.default_rng(6)
    d_model, H, Hkv = 16, 4, 2
    w = normalize_matrices(attn_weights(rng, d_model, H, Hkv, bias=False))
    np.testing.assert_allclose(np.linalg.norm(w["w_q.weight"], axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(w["w_out.weight"], axis=0), 1.0, rtol=1e-15)
    w["sq"] = np.full(H * 4, 1 / math.sqrt(d_model))  # init values: effective scale 1
    w["sk"] = np.full(Hkv * 4, 1 / math.sqrt(d_model))
    x = rng.standard_normal((2, 6, d_model))
    got = normalized_attention_forward(w, x, n_heads=H, n_kv_heads=Hkv, qk_norm={"name": "l2_norm"})
    q = l2_norm(x @ w["w_q.weight"].T).reshape(2, 6, H, 4)
    k = l2_norm(x @ w["w_k.weight"].T).reshape(2, 6, Hkv, 4)
    v = (x @ w["w_v.weight"].T).reshape(2, 6, Hkv, 4)
    att, _ = attention(q, k, v, scale=2.0)  # sqrt(D) = 2
    np.testing.assert_allclose(got, att.reshape(2, 6, -1) @ w["w_out.weight"].T, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", ["gqa_rope", "complex_rope", "gate_headwise", "gate_elementwise"])
def test_kv_cache_forward_equals_cache_free_forward(name):
    """Left-padded prefill + decode, RoPE positions start_pos + t for every row."""
    rng = np.random.default_rng(7)
    w, opts = build(rng, name)
    leftpad = np.array([0, 3])
    B, T, prompt = 2, 10, 6
    x = rng.standard_normal((B, T, 16))
    cache = KVCache.empty(B, 12, opts.get("n_kv_heads") or 4, 4)
    out, cache = attention_forward_cached(w, x[:, :prompt], cache, cache_leftpad=leftpad, **opts)
    outs = [out]
    for t in range(prompt, T):
        out, cache = attention_forward_cached(w, x[:, t : t + 1], cache, **opts)
        outs.append(out)
    got = np.concatenate(outs, axis=1)
    for b, lp in enumerate(leftpad):
        want = attention_forward(w, x[b : b + 1, lp:], **opts)
        np.testing.assert_allclose(got[b : b + 1, lp:], want, rtol=1e-11, atol=1e-12)


def test_errors():
    rng = np.random.default_rng(8)
    w, opts = build(rng, "mha")
    x = rng.standard_normal((1, 4, 16))
    with pytest.raises(ConfigurationError):
        attention_forward(w, x, rope={"name": "fused"}, **opts)
    with pytest.raises(NotImplementedError):
        attention_forward(w, x, rope={"name": "complex"}, cu_doc_lens=[0, 4], **opts)
    with pytest.raises(NotImplementedError):
        fused_attention_forward({}, x, n_heads=4, cache_leftpad=np.zeros(1))
    with pytest.raises(ValueError, match="heads"):
        attention_forward(w, x, n_heads=4, n_kv_heads=2)
