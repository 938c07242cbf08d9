"""reference.attention: hand fixtures, naive-mask and PyTorch cross-checks, properties, speed."""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import attention_cases as fx
from reference.attention import allowed_mask, attention, sdpa

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rand(rng, *shape):
    return rng.standard_normal(shape)


def naive_allowed(i, j, Tq, Tk, causal, window, segments=None):
    """Scalar restatement of docs/CONVENTIONS.md, one (i, j) pair at a time.

    ``segments``: list of ((q0, q1), (k0, k1)) per segment."""
    if segments is None:
        segments = [((0, Tq), (0, Tk))]
    for (q0, q1), (k0, k1) in segments:
        if q0 <= i < q1 and k0 <= j < k1:
            d = (i - q0) + (k1 - k0) - (q1 - q0)
            jj = j - k0
            left, right = window
            return (not causal or jj <= d) and (left < 0 or jj >= d - left) and (right < 0 or jj <= d + right)
    return False


def naive_mask(Tq, Tk, causal, window, segments=None):
    return np.array(
        [[naive_allowed(i, j, Tq, Tk, causal, window, segments) for j in range(Tk)] for i in range(Tq)]
    )


def torch_sdpa(q, k, v, mask, scale=None):
    """PyTorch's math SDPA in float64 with an explicit bool mask [Tq, Tk]; GQA by repeating kv heads."""
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
    m = None if mask is None else torch.from_numpy(mask)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=scale).transpose(1, 2).numpy()


def torch_lse(q, k, mask, scale):
    G = q.shape[2] // k.shape[2]
    s = scale * torch.einsum(
        "bqhd,bkhd->bhqk", torch.from_numpy(q), torch.from_numpy(k).repeat_interleave(G, 2)
    )
    return torch.logsumexp(s.masked_fill(~torch.from_numpy(mask), -math.inf), -1).numpy()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("name", sorted(fx.MASKS))
def test_mask_fixtures(name):
    Tq, Tk, options, rows = fx.MASKS[name]
    expected = np.array([[c == "1" for c in row] for row in rows])
    np.testing.assert_array_equal(allowed_mask(Tq, Tk, **options), expected)


@pytest.mark.parametrize("name", sorted(fx.UNIFORM))
def test_uniform_softmax_fixtures(name):
    Tq, Tk, options, _ = fx.MASKS[name]
    q = np.zeros((1, Tq, 1, 1))
    k = np.zeros((1, Tk, 1, 1))
    v = np.array(fx.V4[:Tk]).reshape(1, Tk, 1, 1)
    out, lse = attention(q, k, v, **options)
    want_out, want_lse = fx.UNIFORM[name]
    np.testing.assert_allclose(out[0, :, 0, 0], want_out, rtol=1e-14)
    np.testing.assert_allclose(lse[0, 0], want_lse, rtol=1e-14, atol=1e-15)


def test_key_valid_fixture():
    q, k = np.zeros((1, 4, 1, 1)), np.zeros((1, 4, 1, 1))
    v = np.array(fx.V4).reshape(1, 4, 1, 1)
    out, lse = attention(q, k, v, key_valid=fx.KEY_VALID["key_valid"])
    np.testing.assert_allclose(out[0, :, 0, 0], fx.KEY_VALID["out"], rtol=1e-14)
    np.testing.assert_allclose(lse[0, 0], fx.KEY_VALID["lse"], rtol=1e-14, atol=1e-15)


def test_two_key_closed_form_and_dropout():
    c = fx.TWO_KEYS
    q = np.full((1, 1, 1, 1), c["q"])
    k, v = np.array(c["k"]).reshape(1, 2, 1, 1), np.array(c["v"]).reshape(1, 2, 1, 1)
    out, lse = attention(q, k, v, scale=1.0)
    assert out[0, 0, 0, 0] == pytest.approx(c["out"], rel=1e-15)
    assert lse[0, 0, 0] == pytest.approx(c["lse"], rel=1e-15)
    d = fx.TWO_KEYS_DROPOUT
    keep = np.array(d["keep"]).reshape(1, 1, 1, 2)
    out, lse = attention(q, k, v, scale=1.0, keep_mask=keep, dropout_p=d["p"])
    assert out[0, 0, 0, 0] == pytest.approx(d["out"], rel=1e-15)
    assert lse[0, 0, 0] == pytest.approx(d["lse"], rel=1e-15)


def test_gqa_fixture():
    c = fx.GQA
    q = np.array(c["q"]).reshape(1, 1, 4, 1)
    k, v = np.array(c["k"]).reshape(1, 1, 2, 1), np.array(c["v"]).reshape(1, 1, 2, 1)
    out, lse = attention(q, k, v, scale=1.0)
    np.testing.assert_array_equal(out[0, 0, :, 0], c["out"])
    np.testing.assert_array_equal(lse[0, :, 0], c["lse"])


def test_sdpa_flattened_documents_fixture():
    c = fx.SDPA_FLAT_DOCS
    q = k = np.zeros((2, 2, 1, 1))
    v = np.array(fx.V4).reshape(2, 2, 1, 1)
    out, lse = sdpa(q, k, v, cu_doc_lens=c["cu_doc_lens"])
    np.testing.assert_allclose(out[:, :, 0, 0], c["out"], rtol=1e-14)
    np.testing.assert_allclose(lse[:, 0, :], c["lse"], rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------- masks


@settings(max_examples=40, deadline=None)
@given(
    Tq=st.integers(1, 7),
    Tk=st.integers(1, 7),
    causal=st.booleans(),
    left=st.integers(-1, 4),
    right=st.integers(-1, 4),
)
def test_allowed_mask_matches_scalar_rule(Tq, Tk, causal, left, right):
    window = (left, right)
    np.testing.assert_array_equal(
        allowed_mask(Tq, Tk, causal=causal, window=window), naive_mask(Tq, Tk, causal, window)
    )


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=4),
    causal=st.booleans(),
    left=st.integers(-1, 3),
)
def test_allowed_mask_segments_match_scalar_rule(lens, causal, left):
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])])
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])])
    Tq, Tk = int(cu_q[-1]) + 1, int(cu_k[-1])  # one query past the last segment
    segments = [((cu_q[s], cu_q[s + 1]), (cu_k[s], cu_k[s + 1])) for s in range(len(lens))]
    np.testing.assert_array_equal(
        allowed_mask(Tq, Tk, causal=causal, window=(left, 0), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
        naive_mask(Tq, Tk, causal, (left, 0), segments),
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="starting with 0"):
        allowed_mask(4, 4, cu_seqlens_q=[1, 4])
    with pytest.raises(ValueError, match="exceeds"):
        allowed_mask(4, 4, cu_seqlens_q=[0, 5])
    with pytest.raises(ValueError, match="entries"):
        allowed_mask(4, 4, cu_seqlens_q=[0, 4], cu_seqlens_k=[0, 2, 4])
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="multiple"):
        attention(rand(rng, 1, 2, 3, 4), rand(rng, 1, 2, 2, 4), rand(rng, 1, 2, 2, 4))
    with pytest.raises(ValueError, match="B == 1"):
        attention(rand(rng, 2, 2, 1, 4), rand(rng, 2, 2, 1, 4), rand(rng, 2, 2, 1, 4), cu_seqlens_q=[0, 2])


# ---------------------------------------------------------------------------------------------- PyTorch cross-checks


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_plain_matches_torch_math_sdpa(causal, heads):
    rng = np.random.default_rng(1)
    Hq, Hkv = heads
    q, k, v = rand(rng, 2, 9, Hq, 8), rand(rng, 2, 9, Hkv, 8), rand(rng, 2, 9, Hkv, 8)
    out, lse = attention(q, k, v, causal=causal)
    qt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    G = Hq // Hkv
    want = F.scaled_dot_product_attention(
        qt, kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1), is_causal=causal
    ).transpose(1, 2)
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-12, atol=1e-13)
    mask = naive_mask(9, 9, causal, (-1, -1))
    np.testing.assert_allclose(lse, torch_lse(q, k, mask, 8**-0.5), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "Tq,Tk,causal,window",
    [
        (8, 8, True, (2, 0)),
        (8, 8, False, (1, 3)),
        (3, 8, True, (-1, -1)),
        (3, 8, True, (2, 0)),
        (8, 8, True, (8, 8)),
    ],
)
def test_windows_match_torch_sdpa_with_explicit_mask(Tq, Tk, causal, window):
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 2, Tq, 4, 4), rand(rng, 2, Tk, 2, 4), rand(rng, 2, Tk, 2, 4)
    out, lse = attention(q, k, v, causal=causal, window=window, scale=0.7)
    mask = naive_mask(Tq, Tk, causal, window)
    assert mask.any(axis=1).all()
    np.testing.assert_allclose(out, torch_sdpa(q, k, v, mask, scale=0.7), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, torch_lse(q, k, mask, 0.7), rtol=1e-12, atol=1e-13)


def test_documents_match_torch_sdpa_block_diagonal():
    """Doc lengths [[0,4,16,12],[8,8,8,8]] over B=2, T=32, with and without a window."""
    rng = np.random.default_rng(3)
    B, T, H, D = 2, 32, 8, 16
    cu = np.cumsum([0, 0, 4, 16, 12, 8, 8, 8, 8])
    q, k, v = rand(rng, B, T, H, D), rand(rng, B, T, H, D), rand(rng, B, T, H, D)
    segments = [((a, b), (a, b)) for a, b in itertools.pairwise(cu)]
    flat = [a.reshape(1, B * T, H, D) for a in (q, k, v)]
    for w in (None, 16):
        window = (-1, -1) if w is None else (w - 1, 0)
        out, lse = sdpa(q, k, v, cu_doc_lens=cu, window=window)
        mask = naive_mask(B * T, B * T, True, window, segments)
        want = torch_sdpa(*flat, mask).reshape(B, T, H, D)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
        want_lse = torch_lse(flat[0], flat[1], mask, D**-0.5).reshape(H, B, T).transpose(1, 0, 2)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-13)


def test_one_document_per_row_equals_no_documents():
    """cu_doc_lens = [0, T, 2T] is the same as plain causal attention."""
    rng = np.random.default_rng(4)
    q, k, v = rand(rng, 2, 16, 4, 8), rand(rng, 2, 16, 2, 8), rand(rng, 2, 16, 2, 8)
    out_docs, lse_docs = sdpa(q, k, v, cu_doc_lens=[0, 16, 32])
    out, lse = sdpa(q, k, v)
    np.testing.assert_allclose(out_docs, out, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(lse_docs, lse, rtol=1e-14, atol=1e-15)


def test_varlen_layout_matches_batched_layout():
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, 1, 10, 2, 4), rand(rng, 1, 10, 2, 4), rand(rng, 1, 10, 2, 4)
    cu = [0, 3, 10]
    out, lse = attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    out3, lse3 = attention(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu)
    np.testing.assert_array_equal(out3, out[0])
    np.testing.assert_array_equal(lse3, lse[0])


def test_keep_mask_dropout_matches_explicit_formula():
    rng = np.random.default_rng(6)
    q, k, v = rand(rng, 2, 6, 2, 4), rand(rng, 2, 6, 1, 4), rand(rng, 2, 6, 1, 4)
    keep = rng.random((2, 2, 6, 6)) > 0.3
    out, lse = attention(q, k, v, keep_mask=keep, dropout_p=0.3)
    _, lse_plain = attention(q, k, v)
    np.testing.assert_array_equal(lse, lse_plain)
    mask = naive_mask(6, 6, True, (-1, -1))
    s = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, 2, axis=2)) / 2.0
    p = np.where(mask, np.exp(s - lse[..., None]), 0.0) * keep / 0.7
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", p, np.repeat(v, 2, axis=2)), rtol=1e-12)


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(2, 4), T=st.integers(1, 9), causal=st.booleans())
def test_batch_permutation_equivariance(seed, B, T, causal):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, B, T, 4, 3), rand(rng, B, T, 2, 3), rand(rng, B, T, 2, 3)
    perm = rng.permutation(B)
    out, lse = attention(q, k, v, causal=causal, window=(2, 0))
    out_p, lse_p = attention(q[perm], k[perm], v[perm], causal=causal, window=(2, 0))
    np.testing.assert_array_equal(out_p, out[perm])
    np.testing.assert_array_equal(lse_p, lse[perm])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    lens=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    data=st.data(),
)
def test_perturbing_one_document_leaves_others_bit_identical(seed, lens, data):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lens)])
    N = int(cu[-1])
    q, k, v = rand(rng, 1, N, 2, 4), rand(rng, 1, N, 1, 4), rand(rng, 1, N, 1, 4)
    d = data.draw(st.integers(0, len(lens) - 1))
    a, b = cu[d], cu[d + 1]
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for arr in (q2, k2, v2):
        arr[:, a:b] += 10 * rand(rng, 1, b - a, *arr.shape[2:])
    out, lse = sdpa(q, k, v, cu_doc_lens=cu, window=(3, 0))
    out2, lse2 = sdpa(q2, k2, v2, cu_doc_lens=cu, window=(3, 0))
    others = np.r_[0:a, b:N]
    np.testing.assert_array_equal(out2[:, others], out[:, others])
    np.testing.assert_array_equal(lse2[:, :, others], lse[:, :, others])
    assert not np.array_equal(out2[:, a:b], out[:, a:b])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 10), extra=st.integers(1, 6), left=st.integers(-1, 4))
def test_causal_prefix_stability(seed, T, extra, left):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, 2, T + extra, 4, 3), rand(rng, 2, T + extra, 2, 3), rand(rng, 2, T + extra, 2, 3)
    out_long, lse_long = attention(q, k, v, window=(left, 0))
    out, lse = attention(q[:, :T], k[:, :T], v[:, :T], window=(left, 0))
    np.testing.assert_allclose(out_long[:, :T], out, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse_long[:, :, :T], lse, rtol=1e-13, atol=1e-14)


def test_empty_rows_are_zero_and_minus_inf_never_nan():
    rng = np.random.default_rng(7)
    q, k, v = rand(rng, 1, 5, 2, 3), rand(rng, 1, 2, 2, 3), rand(rng, 1, 2, 2, 3)
    out, lse = attention(q, k, v)  # bottom-right: queries 0..2 see no key
    np.testing.assert_array_equal(out[:, :3], 0.0)
    assert np.isneginf(lse[:, :, :3]).all() and np.isfinite(lse[:, :, 3:]).all()
    assert not np.isnan(out).any()


def test_llama3_layout_reproduces_global_attention():
    """sdpa with the llama3 per-rank metadata (ring-flash-attn's preparation) equals the global rows [a, e)."""
    rng = np.random.default_rng(8)
    cu = [0, 3, 10, 16]
    q, k, v = rand(rng, 1, 16, 4, 4), rand(rng, 1, 16, 2, 4), rand(rng, 1, 16, 2, 4)
    out, lse = sdpa(q, k, v, cu_doc_lens=cu, window=(4, 0))
    ranks = {0: ([0, 3, 8], [0, 3, 8], slice(0, 8)), 1: ([0, 2, 8], [0, 7, 13], slice(3, 16))}
    for r, (cu_q, cu_k, ks) in ranks.items():
        o, l_ = sdpa(
            q[:, 8 * r : 8 * (r + 1)],
            k,
            v,
            cu_doc_lens_q=cu_q,
            cu_doc_lens_k=cu_k,
            local_k_slice=ks,
            window=(4, 0),
        )
        np.testing.assert_allclose(o, out[:, 8 * r : 8 * (r + 1)], rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(l_, lse[:, :, 8 * r : 8 * (r + 1)], rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------- speed


def test_speed_document_mask_one_core():
    """B=2, T=2048, Hq=8, D=64 with a document mask: < 2 s on one core (best of 2 runs)."""
    code = textwrap.dedent(
        """
        import time, numpy as np
        from reference.attention import sdpa
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((2, 2048, 8, 64)) for _ in range(3))
        cu = np.array([0, 300, 1500, 2048, 3000, 4096])
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            sdpa(q, k, v, cu_doc_lens=cu)
            best = min(best, time.perf_counter() - t0)
        print(best)
        """
    )
    env = dict(
        os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds = float(result.stdout.strip())
    assert seconds < 2.0, f"reference attention took {seconds:.2f} s on one core"
