"""reference.gated_deltanet: hand fixtures, matrix-form and PyTorch cross-checks, document resets."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures import gdn_cases as fx
from reference.gated_deltanet import causal_conv1d, gated_delta_rule, gated_rms_norm, gdn_layer_forward


def one_step(case, **kwargs):
    """[B=1, T=1, HV=1, ·] inputs from a fixture dict."""
    q = np.array(case["q"]).reshape(1, 1, 1, -1)
    k = np.array(case["k"]).reshape(1, 1, 1, -1)
    v = np.array(case["v"]).reshape(1, 1, 1, -1)
    g = np.full((1, 1, 1), case.get("g", 0.0))
    beta = np.full((1, 1, 1), case.get("beta", 1.0))
    init = np.array(case["S0"])[None, None] if "S0" in case else None
    return gated_delta_rule(q, k, v, g, beta, initial_state=init, **kwargs)


@pytest.mark.parametrize("case", [fx.DECAY_STEP, fx.NEG_EIGVAL])
def test_single_step_fixtures(case):
    o, S = one_step(case, scale=1.0, use_qk_l2norm=False)
    assert o[0, 0, 0, 0] == pytest.approx(case["o"], rel=1e-15, abs=1e-15)
    np.testing.assert_allclose(S[0, 0], case["S"], rtol=1e-15)


def test_l2_normalised_step_fixture():
    o, _ = one_step(fx.L2_STEP)
    assert o[0, 0, 0, 0] == pytest.approx(fx.L2_STEP["o"], rel=1e-14)


def test_document_reset_fixture():
    q = k = np.ones((1, 2, 1, 2))
    v = np.ones((1, 2, 1, 1))
    g, beta = np.zeros((1, 2, 1)), np.full((1, 2, 1), 0.5)
    o_docs, S_docs = gated_delta_rule(q, k, v, g, beta, cu_seqlens=[0, 1, 2])
    assert o_docs[0, 0] == o_docs[0, 1] and S_docs.shape == (2, 1, 2, 1)
    o, _ = gated_delta_rule(q, k, v, g, beta)
    assert o[0, 0] == o_docs[0, 0] and o[0, 1] != o[0, 0]


def test_conv_fixture():
    c = fx.CONV
    x = np.array(c["x"]).reshape(1, 3, 1)
    w = np.array([c["weight"]])
    np.testing.assert_array_equal(causal_conv1d(x, w, activation=None)[0, :, 0], c["out"])
    np.testing.assert_array_equal(
        causal_conv1d(x, w, cu_seqlens=c["cu"], activation=None)[0, :, 0], c["out_docs"]
    )


def matrix_form(q, k, v, g, beta, scale, S0=None):
    """S_t = exp(g)(I − β k̂ k̂ᵀ) S_{t−1} + β k̂ vᵀ, o_t = scale · S_tᵀ q̂ — one head, explicit matrices."""
    T, Dk = k.shape
    S = np.zeros((Dk, v.shape[1])) if S0 is None else S0
    outs = []
    for t in range(T):
        kh = k[t] / np.sqrt(k[t] @ k[t] + 1e-6)
        qh = q[t] / np.sqrt(q[t] @ q[t] + 1e-6)
        S = np.exp(g[t]) * (np.eye(Dk) - beta[t] * np.outer(kh, kh)) @ S + beta[t] * np.outer(kh, v[t])
        outs.append(scale * S.T @ qh)
    return np.array(outs), S


def random_inputs(rng, B=2, T=7, HV=3, Dk=4, Dv=5):
    q, k = rng.standard_normal((B, T, HV, Dk)), rng.standard_normal((B, T, HV, Dk))
    v = rng.standard_normal((B, T, HV, Dv))
    g = -np.abs(rng.standard_normal((B, T, HV)))
    beta = 2 * rng.random((B, T, HV))
    return q, k, v, g, beta


def test_matches_explicit_matrix_form():
    rng = np.random.default_rng(0)
    q, k, v, g, beta = random_inputs(rng)
    S0 = rng.standard_normal((2, 3, 4, 5))
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=S0, scale=0.3)
    for b in range(2):
        for h in range(3):
            o_ref, S_ref = matrix_form(
                q[b, :, h], k[b, :, h], v[b, :, h], g[b, :, h], beta[b, :, h], 0.3, S0[b, h]
            )
            np.testing.assert_allclose(o[b, :, h], o_ref, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(S[b, h], S_ref, rtol=1e-12, atol=1e-13)


def test_documents_equal_separate_runs_and_state_chaining():
    rng = np.random.default_rng(1)
    q, k, v, g, beta = random_inputs(rng, B=1, T=9)
    cu = [0, 4, 4, 9]
    S0 = rng.standard_normal((3, 3, 4, 5))
    o, S = gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, initial_state=S0)
    for n, (a, b) in enumerate([(0, 4), (4, 4), (4, 9)]):
        o_n, S_n = gated_delta_rule(*(x[:, a:b] for x in (q, k, v, g, beta)), initial_state=S0[n : n + 1])
        np.testing.assert_array_equal(o[:, a:b], o_n)
        np.testing.assert_array_equal(S[n], S_n[0])
    _, S_half = gated_delta_rule(*(x[:, :4] for x in (q, k, v, g, beta)))
    o_rest, S_end = gated_delta_rule(*(x[:, 4:] for x in (q, k, v, g, beta)), initial_state=S_half)
    o_full, S_full = gated_delta_rule(q, k, v, g, beta)
    np.testing.assert_allclose(o_rest, o_full[:, 4:], rtol=1e-14)
    np.testing.assert_allclose(S_end, S_full, rtol=1e-14)


def test_gva_expansion_and_optional_state():
    rng = np.random.default_rng(2)
    q, k, v, g, beta = random_inputs(rng, HV=4)
    o_rep, _ = gated_delta_rule(np.repeat(q[:, :, :2], 2, 2), np.repeat(k[:, :, :2], 2, 2), v, g, beta)
    o_gva, none = gated_delta_rule(q[:, :, :2], k[:, :, :2], v, g, beta, output_final_state=False)
    np.testing.assert_array_equal(o_gva, o_rep)
    assert none is None


@pytest.mark.parametrize("Kc", [1, 2, 4])
def test_conv_matches_torch_conv1d(Kc):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 9, 6)), rng.standard_normal((6, 1, Kc)), rng.standard_normal(6)
    want = F.silu(
        F.conv1d(
            torch.from_numpy(x).transpose(1, 2),
            torch.from_numpy(w),
            torch.from_numpy(b),
            padding=Kc - 1,
            groups=6,
        )
    )
    np.testing.assert_allclose(
        causal_conv1d(x, w, b), want[..., :9].transpose(1, 2).numpy(), rtol=1e-12, atol=1e-13
    )


def test_gated_rms_norm_formula():
    rng = np.random.default_rng(4)
    o, z, w = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5)), rng.standard_normal(5)
    want = F.rms_norm(torch.from_numpy(o), (5,), torch.from_numpy(w), 1e-5) * F.silu(torch.from_numpy(z))
    np.testing.assert_allclose(gated_rms_norm(o, z, w, 1e-5), want.numpy(), rtol=1e-12, atol=1e-13)


def gdn_weights(rng, d_model=8, H=2, HV=4, Dk=4, expand_v=2.0, Kc=4, conv_bias=False):
    K, V = H * Dk, HV * int(Dk * expand_v)
    w = {
        "w_q.weight": (K, d_model),
        "w_k.weight": (K, d_model),
        "w_v.weight": (V, d_model),
        "w_a.weight": (HV, d_model),
        "w_b.weight": (HV, d_model),
        "w_g.weight": (V, d_model),
        "w_out.weight": (d_model, V),
        "q_conv1d.weight": (K, 1, Kc),
        "k_conv1d.weight": (K, 1, Kc),
        "v_conv1d.weight": (V, 1, Kc),
        "o_norm.weight": (int(Dk * expand_v),),
    }
    w = {name: 0.5 * rng.standard_normal(shape) for name, shape in w.items()}
    w["A_log"] = np.log(rng.uniform(1, 16, HV))
    w["dt_bias"] = rng.standard_normal(HV)
    if conv_bias:
        w.update({f"{c}_conv1d.bias": rng.standard_normal(n) for c, n in (("q", K), ("k", K), ("v", V))})
    return w


def test_layer_documents_and_rows_are_independent():
    rng = np.random.default_rng(5)
    w = gdn_weights(rng, conv_bias=True)
    opts = dict(n_heads=2, n_v_heads=4, head_dim=4)
    x = rng.standard_normal((1, 10, 8))
    out = gdn_layer_forward(w, x, cu_doc_lens=[0, 3, 10], **opts)
    assert out.shape == x.shape
    np.testing.assert_allclose(out[:, :3], gdn_layer_forward(w, x[:, :3], **opts), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(out[:, 3:], gdn_layer_forward(w, x[:, 3:], **opts), rtol=1e-13, atol=1e-14)
    rows = rng.standard_normal((2, 5, 8))
    both = gdn_layer_forward(w, rows, **opts)
    np.testing.assert_allclose(both[1:], gdn_layer_forward(w, rows[1:], **opts), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="B == 1"):
        gdn_layer_forward(w, rows, cu_doc_lens=[0, 5], **opts)


def test_layer_beta_range_follows_allow_neg_eigval():
    """β = σ(·) ∈ (0, 1), doubled to (0, 2) with allow_neg_eigval: the outputs must differ."""
    rng = np.random.default_rng(6)
    w = gdn_weights(rng)
    x = rng.standard_normal((1, 6, 8))
    opts = dict(n_heads=2, n_v_heads=4, head_dim=4)
    assert not np.allclose(
        gdn_layer_forward(w, x, **opts), gdn_layer_forward(w, x, allow_neg_eigval=False, **opts)
    )


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="flash-linear-attention not installed")
def test_matches_fla_naive_recurrence():
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    rng = np.random.default_rng(7)
    q, k, v, g, beta = random_inputs(rng)
    o, S = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False)
    o_fla, S_fla = naive_recurrent_gated_delta_rule(
        *(torch.from_numpy(a) for a in (q, k, v, beta, g)), scale=4**-0.5, output_final_state=True
    )
    # fla's naive recurrence may accumulate in float32
    np.testing.assert_allclose(o, o_fla.double().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S, S_fla.double().numpy(), rtol=1e-5, atol=1e-5)
