"""reference.twins: every torch-float64 twin agrees with its NumPy original to ~1e-12, and its
gradients are finite (zero for rows with no visible key) and pass torch.autograd.gradcheck."""

import math

import numpy as np
import pytest
import torch

from reference import attention as np_attention
from reference import gated_deltanet as np_gdn
from reference import gating as np_gating
from reference import kv_cache as np_kv
from reference import modules as np_modules
from reference import norms as np_norms
from reference import rope as np_rope
from reference import twins

TOL = dict(rtol=1e-12, atol=1e-12)


def t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def close(np_out, twin_out):
    if isinstance(np_out, tuple | list):
        for a, b in zip(np_out, twin_out, strict=True):
            close(a, b)
    elif isinstance(np_out, dict):
        for key in np_out:
            close(np_out[key], twin_out[key])
    else:
        np.testing.assert_allclose(np.asarray(np_out), twin_out.detach().numpy(), **TOL)


def qkv(rng, B=2, Tq=6, Tk=6, Hq=4, Hkv=2, D=3):
    return (
        rng.standard_normal((B, Tq, Hq, D)),
        rng.standard_normal((B, Tk, Hkv, D)),
        rng.standard_normal((B, Tk, Hkv, D)),
    )


ATTENTION_CASES = {
    "causal": dict(),
    "noncausal_window": dict(causal=False, window=(1, 2), scale=0.4),
    "segments": dict(cu_seqlens_q=[0, 2, 6], cu_seqlens_k=[0, 3, 6], batch=1),
    "key_valid": dict(key_valid=[[False, True, True, True, False, True], [True] * 6]),
    "dropout": dict(keep=True, dropout_p=0.25),
    "more_queries": dict(Tq=7, Tk=3),
}


@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_attention(name):
    rng = np.random.default_rng(0)
    case = dict(ATTENTION_CASES[name])
    B = case.pop("batch", 2)
    q, k, v = qkv(rng, B=B, Tq=case.pop("Tq", 6), Tk=case.pop("Tk", 6))
    if case.pop("keep", False):
        case["keep_mask"] = rng.random((B, 4, q.shape[1], k.shape[1])) > 0.3
    close(np_attention.attention(q, k, v, **case), twins.attention(t(q), t(k), t(v), **case))


def test_sdpa_and_kv_cache():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, Tq=8, Tk=8)
    for opts in (dict(cu_doc_lens=[0, 5, 16], window=(2, 0)), dict(window=(3, 0))):
        close(np_attention.sdpa(q, k, v, **opts), twins.sdpa(t(q), t(k), t(v), **opts))
    llama = dict(cu_doc_lens_q=[0, 2, 8], cu_doc_lens_k=[0, 7, 13], local_k_slice=slice(3, 16))
    close(np_attention.sdpa(q[:1], k, v, **llama), twins.sdpa(t(q[:1]), t(k), t(v), **llama))
    k_cache, v_cache = rng.standard_normal((2, 9, 2, 3)), rng.standard_normal((2, 9, 2, 3))
    opts = dict(cache_seqlens=3, cache_leftpad=[0, 2], window=(2, 0))
    close(
        np_kv.kv_cache_attention(q[:, :2], k[:, :2], v[:, :2], k_cache, v_cache, **opts),
        twins.kv_cache_attention(t(q[:, :2]), t(k[:, :2]), t(v[:, :2]), t(k_cache), t(v_cache), **opts),
    )


ROPE_CASES = {
    "default": dict(),
    "complex": dict(variant="complex", theta=10_000),
    "fused": dict(variant="fused"),
    "partial_scaled": dict(partial_rotary_factor=0.5, scaling={"type": "llama3", "factor": 4.0}),
    "yarn_docs": dict(scaling={"type": "yarn"}, cu_doc_lens=[0, 3, 9, 12]),
    "start_pos": dict(start_pos=5, variant="complex"),
    "head_first": dict(head_first=True),
}


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_rope(name):
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 6, 4, 8)), rng.standard_normal((2, 6, 2, 8))
    opts = ROPE_CASES[name]
    close(np_rope.apply_rope(q, k, **opts), twins.apply_rope(t(q), t(k), **opts))
    qkv_ = rng.standard_normal((2, 6, 3, 2, 8))
    close(np_rope.apply_rope_packed(qkv_, start_pos=2), twins.apply_rope_packed(t(qkv_), start_pos=2))


def test_norms_and_gate():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 8)), rng.standard_normal(8), rng.standard_normal(8)
    for fn in ("layer_norm", "rms_norm", "qwen_rms_norm"):
        close(getattr(np_norms, fn)(x, w, b, 1e-5), getattr(twins, fn)(t(x), t(w), t(b), 1e-5))
    close(np_norms.l2_norm(x), twins.l2_norm(t(x)))
    for kind in np_norms.NORM_KINDS:
        params = (None, None) if kind == "l2_norm" else (w[:4], b[:4])
        close(
            np_norms.qk_norm(x, kind, *params, 1e-6, per_head=True, head_dim=4),
            twins.qk_norm(
                t(x), kind, *(None if p is None else t(p) for p in params), 1e-6, per_head=True, head_dim=4
            ),
        )
    att = rng.standard_normal((2, 3, 2, 4))
    close(
        np_gating.apply_gate(att, 30 * x[..., :2], "headwise"),
        twins.apply_gate(t(att), t(30 * x[..., :2]), "headwise"),
    )
    close(np_gating.apply_gate(att, x, "elementwise"), twins.apply_gate(t(att), t(x), "elementwise"))


def weights(rng, shapes):
    return {name: rng.standard_normal(shape) / math.sqrt(shape[-1]) for name, shape in shapes.items()}


ATTN_SHAPES = {
    "w_q.weight": (16, 16),
    "w_q.bias": (16,),
    "w_k.weight": (8, 16),
    "w_k.bias": (8,),
    "w_v.weight": (8, 16),
    "w_v.bias": (8,),
    "w_out.weight": (16, 16),
    "w_out.bias": (16,),
    "w_g.weight": (4, 16),
    "w_g.bias": (4,),
    "q_norm.weight": (4,),
    "k_norm.weight": (4,),
}


def test_module_forwards():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 16))
    w = weights(rng, ATTN_SHAPES)
    opts = dict(
        n_heads=4,
        n_kv_heads=2,
        clip_qkv=1.0,
        qk_norm={"name": "rms"},
        use_head_qk_norm=True,
        rope={"name": "default", "theta": 1000},
        gate="headwise",
        window_size=3,
        cu_doc_lens=[0, 4, 10],
    )
    tw = {key: t(a) for key, a in w.items()}
    close(np_modules.attention_forward(w, x, **opts), twins.attention_forward(tw, t(x), **opts))
    opts = dict(
        n_heads=4, n_kv_heads=2, rope={"name": "complex"}, gate={"granularity": "headwise"}, softmax_scale=0.3
    )
    close(np_modules.attention_forward(w, x, **opts), twins.attention_forward(tw, t(x), **opts))

    fused = weights(rng, {"w_qkv.weight": (48, 16), "w_qkv.bias": (48,), "w_out.weight": (16, 16)})
    opts = dict(n_heads=4, rope={"name": "fused", "scaling": {"type": "pi"}}, clip_qkv=0.8)
    close(
        np_modules.fused_attention_forward(fused, x, **opts),
        twins.fused_attention_forward({key: t(a) for key, a in fused.items()}, t(x), **opts),
    )

    ngpt = weights(
        rng, {"w_q.weight": (16, 16), "w_k.weight": (8, 16), "w_v.weight": (8, 16), "w_out.weight": (16, 16)}
    )
    ngpt = np_modules.normalize_matrices(ngpt)
    ngpt.update(sq=rng.uniform(0.1, 0.4, 16), sk=rng.uniform(0.1, 0.4, 8))
    opts = dict(n_heads=4, n_kv_heads=2, qk_norm="l2_norm", rope={"name": "default"}, cu_doc_lens=[0, 7, 10])
    tw = {key: t(a) for key, a in ngpt.items()}
    close(
        np_modules.normalized_attention_forward(ngpt, x, **opts),
        twins.normalized_attention_forward(tw, t(x), **opts),
    )
    close(np_modules.normalize_matrices(ngpt), twins.normalize_matrices(tw))


def test_gated_deltanet():
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((1, 7, 4, 3)), rng.standard_normal((1, 7, 4, 3))
    v = rng.standard_normal((1, 7, 4, 2))
    g, beta = -rng.random((1, 7, 4)), 2 * rng.random((1, 7, 4))
    init = rng.standard_normal((2, 4, 3, 2))
    opts = dict(cu_seqlens=[0, 3, 7], initial_state=init)
    close(
        np_gdn.gated_delta_rule(q, k, v, g, beta, **opts),
        twins.gated_delta_rule(*map(t, (q, k, v, g, beta)), **opts),
    )
    close(
        np_gdn.gated_delta_rule(q[:, :, :2], k[:, :, :2], v, g, beta),
        twins.gated_delta_rule(*map(t, (q[:, :, :2], k[:, :, :2], v, g, beta))),
    )
    x, cw, cb = rng.standard_normal((1, 7, 5)), rng.standard_normal((5, 1, 3)), rng.standard_normal(5)
    close(
        np_gdn.causal_conv1d(x, cw, cb, cu_seqlens=[0, 2, 7]),
        twins.causal_conv1d(t(x), t(cw), t(cb), cu_seqlens=[0, 2, 7]),
    )
    close(
        np_gdn.gated_rms_norm(v, 3 * v[..., ::-1], [1.0, 2.0]),
        twins.gated_rms_norm(t(v), t(3 * v[..., ::-1]), t([1.0, 2.0])),
    )

    d, H, HV, Dk, Dv = 8, 2, 4, 2, 4
    w = weights(
        rng,
        {
            "w_q.weight": (H * Dk, d),
            "w_k.weight": (H * Dk, d),
            "w_v.weight": (HV * Dv, d),
            "w_a.weight": (HV, d),
            "w_b.weight": (HV, d),
            "w_g.weight": (HV * Dv, d),
            "w_out.weight": (d, HV * Dv),
            "q_conv1d.weight": (H * Dk, 1, 4),
            "k_conv1d.weight": (H * Dk, 1, 4),
            "v_conv1d.weight": (HV * Dv, 1, 4),
            "v_conv1d.bias": (HV * Dv,),
            "o_norm.weight": (Dv,),
            "A_log": (HV,),
            "dt_bias": (HV,),
        },
    )
    w["dt_bias"] = w["dt_bias"] * 40  # reach softplus's large-argument regime
    x = rng.standard_normal((1, 9, d))
    opts = dict(n_heads=H, n_v_heads=HV, head_dim=Dk, cu_doc_lens=[0, 4, 9])
    close(
        np_gdn.gdn_layer_forward(w, x, **opts),
        twins.gdn_layer_forward({n: t(a) for n, a in w.items()}, t(x), **opts),
    )


def test_empty_rows_have_zero_gradients_not_nan():
    rng = np.random.default_rng(6)
    q, k, v = (t(a, grad=True) for a in qkv(rng, Tq=5, Tk=2))  # bottom-right: queries 0..2 see nothing
    out, lse = twins.attention(q, k, v)
    assert torch.isneginf(lse[:, :, :3]).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    assert (q.grad[:, :3] == 0).all() and (q.grad[:, 3:] != 0).any()

    k_cache = t(np.zeros((2, 4, 2, 3)), grad=True)
    q2, k2, v2 = (t(a, grad=True) for a in qkv(rng, Tq=3, Tk=3))
    out, lse, *_ = twins.kv_cache_attention(
        q2, k2, v2, k_cache, k_cache, cache_seqlens=0, cache_leftpad=[1, 0]
    )
    out.sum().backward()  # row 0, token 0 is left padding: it sees no key
    assert torch.isfinite(q2.grad).all() and (q2.grad[0, 0] == 0).all() and (q2.grad[1] != 0).any()


def test_gradcheck():
    rng = np.random.default_rng(7)
    q, k, v = (t(a, grad=True) for a in qkv(rng, B=1, Tq=3, Tk=4, Hq=2, Hkv=1, D=2))
    assert torch.autograd.gradcheck(lambda a, b, c: twins.attention(a, b, c, window=(1, 0)), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b: twins.apply_rope(a, b, scaling={"type": "yarn"}), (q, k))
    g, beta = t(-rng.random((1, 4, 1)), grad=True), t(rng.random((1, 4, 1)), grad=True)
    kk, vv = (t(rng.standard_normal((1, 4, 1, 2)), grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: twins.gated_delta_rule(*a)[0], (kk, kk, vv, g, beta))
