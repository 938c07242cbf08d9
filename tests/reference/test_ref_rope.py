"""reference.rope: hand fixtures, scalings, position rules and invariances."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import rope_cases as fx
from reference.rope import (
    PIScaling,
    StepwiseScaling,
    YaRNScaling,
    apply_rope,
    apply_rope_packed,
    as_scaling,
    document_positions,
    freqs_cis_table,
    inv_freq,
    layer_uses_rope,
    rope_tables,
    scaling_as_dict,
)


def two_tokens(x):
    """[1, 2, 1, D]: token 0 zeros, token 1 = x (so token 1 is at position 1)."""
    x = np.asarray(x, dtype=np.float64)
    return np.stack([np.zeros_like(x), x])[None, :, None, :]


@pytest.mark.parametrize("variant", ["default", "complex", "fused"])
def test_d2_rotation_by_one_radian(variant):
    for x, want in zip(fx.D2_ROTATION["x_pos1"], fx.D2_ROTATION["out"]):
        q, k = apply_rope(two_tokens(x), two_tokens(x), variant=variant, theta=7)
        np.testing.assert_allclose(q[0, 1, 0], want, rtol=1e-15)
        np.testing.assert_allclose(k[0, 1, 0], want, rtol=1e-15)


def test_d4_rotate_half_vs_interleaved():
    x = two_tokens(fx.D4_X)
    q, _ = apply_rope(x, x, theta=100)
    np.testing.assert_allclose(q[0, 1, 0], fx.D4_DEFAULT, rtol=1e-15)
    q, _ = apply_rope(x, x, variant="complex", theta=100)
    np.testing.assert_allclose(q[0, 1, 0], fx.D4_COMPLEX, rtol=1e-15)
    for variant in ("default", "complex"):
        q, _ = apply_rope(x, x, variant=variant, theta=100, partial_rotary_factor=0.5)
        np.testing.assert_allclose(q[0, 1, 0], fx.D4_PARTIAL_HALF, rtol=1e-15)
        np.testing.assert_array_equal(q[0, 0, 0], 0.0)


def test_document_positions_fixture():
    c = fx.DOC_POSITIONS
    np.testing.assert_array_equal(document_positions(c["cu"], c["total"]), c["positions"])


@pytest.mark.parametrize("case", [fx.PI, fx.ABF, fx.STEPWISE_MID, fx.STEPWISE_LOW, fx.YARN])
def test_scaling_fixtures(case):
    f, rescale = inv_freq(case["theta"], 4, case["scaling"])
    np.testing.assert_allclose(f, case["inv_freq"], rtol=1e-14)
    assert rescale == pytest.approx(case.get("rescale", 1.0), rel=1e-15)


def test_scaling_configs_round_trip_and_hf():
    for cfg in (fx.PI["scaling"], fx.ABF["scaling"], {"type": "stepwise", "factor": 8.0}, {"type": "yarn"}):
        s = as_scaling(cfg)
        assert as_scaling(scaling_as_dict(s)) == s
    assert PIScaling(factor=4.0).to_hf_config() == {"rope_type": "linear", "factor": 4.0}
    hf = StepwiseScaling().to_hf_config()
    assert hf["low_freq_factor"] == 1.0 and hf["high_freq_factor"] == 4.0
    assert YaRNScaling(factor=np.e).to_hf_config()["attention_factor"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="unknown RoPE scaling"):
        as_scaling({"type": "ntk"})


def test_scalings_relative_to_vanilla():
    """Mirrors rope_test.py: ABF(new_theta == theta) and PI(factor 1) equal vanilla; stepwise keeps
    the first frequency and changes the last (head 128); YaRN differs."""
    base, _ = inv_freq(500_000, 128)
    np.testing.assert_array_equal(inv_freq(500_000, 128, {"type": "abf", "new_theta": 500_000})[0], base)
    np.testing.assert_array_equal(inv_freq(500_000, 128, {"type": "pi", "factor": 1.0})[0], base)
    step, _ = inv_freq(500_000, 128, {"type": "stepwise"})
    assert step[0] == base[0] and step[-1] != base[-1]
    assert not np.allclose(inv_freq(500_000, 128, {"type": "yarn"})[0], base)


def test_rescale_multiplies_rotated_channels():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 5, 2, 8))
    a, _ = apply_rope(q, q, scaling={"type": "pi", "factor": 1.0, "attention_rescale_factor": 1.5})
    b, _ = apply_rope(q, q, scaling={"type": "pi", "factor": 1.0})
    np.testing.assert_allclose(a, 1.5 * b, rtol=1e-15)
    a, _ = apply_rope(
        q,
        q,
        partial_rotary_factor=0.5,
        scaling={"type": "pi", "factor": 1.0, "attention_rescale_factor": 1.5},
    )
    np.testing.assert_array_equal(a[..., 4:], q[..., 4:])  # pass-through channels are not rescaled


def test_tables_layouts():
    sin, cos = rope_tables(6, 8, theta=10)
    hs, hc = rope_tables(6, 8, theta=10, variant="fused")
    np.testing.assert_array_equal(sin, np.concatenate([hs, hs], -1))
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, rtol=1e-15)
    np.testing.assert_allclose(freqs_cis_table(6, 8, theta=10), hc + 1j * hs, rtol=1e-15)


@pytest.mark.parametrize("variant", ["default", "complex"])
def test_head_first_and_past_key_values(variant):
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 6, 4, 8)), rng.standard_normal((2, 6, 2, 8))
    qr, kr = apply_rope(q, k, variant=variant)
    qh, kh = apply_rope(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), variant=variant, head_first=True)
    np.testing.assert_array_equal(qh.transpose(0, 2, 1, 3), qr)
    np.testing.assert_array_equal(kh.transpose(0, 2, 1, 3), kr)
    q_last, k_all = apply_rope(q[:, -1:], k, variant=variant)  # query aligned to the end of the keys
    np.testing.assert_allclose(q_last, qr[:, -1:], rtol=1e-15)
    np.testing.assert_array_equal(k_all, kr)


@pytest.mark.parametrize("variant", ["default", "complex", "fused"])
def test_start_pos(variant):
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((1, 4, 2, 8)), rng.standard_normal((1, 4, 2, 8))
    np.testing.assert_array_equal(
        apply_rope(q, k, variant=variant, start_pos=0)[0], apply_rope(q, k, variant=variant)[0]
    )
    pad = np.zeros((1, 2, 2, 8))
    long_q, _ = apply_rope(np.concatenate([pad, q], 1), np.concatenate([pad, k], 1), variant=variant)
    np.testing.assert_allclose(apply_rope(q, k, variant=variant, start_pos=2)[0], long_q[:, 2:], rtol=1e-14)


def test_fused_equals_default_and_packed():
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 5, 3, 2, 8))
    q, k = apply_rope(qkv[:, :, 0], qkv[:, :, 1])
    out = apply_rope_packed(qkv)
    np.testing.assert_array_equal(out[:, :, 0], q)
    np.testing.assert_array_equal(out[:, :, 1], k)
    np.testing.assert_array_equal(out[:, :, 2], qkv[:, :, 2])


def test_per_document_rope_equals_rope_per_document():
    """rope_test.py: doc_lens [[3, 5, 4], [6, 2, 4]] over B = 2 packed rows of 12."""
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 12, 2, 8)), rng.standard_normal((2, 12, 1, 8))
    cu = np.cumsum([0, 3, 5, 4, 6, 2, 4])
    qd, kd = apply_rope(q, k, cu_doc_lens=cu)
    qf, kf = q.reshape(1, 24, 2, 8), k.reshape(1, 24, 1, 8)
    for a, b in itertools.pairwise(cu):
        qs, ks = apply_rope(qf[:, a:b], kf[:, a:b])
        np.testing.assert_array_equal(qd.reshape(1, 24, 2, 8)[:, a:b], qs)
        np.testing.assert_array_equal(kd.reshape(1, 24, 1, 8)[:, a:b], ks)


def test_supplied_tables_index_rows_by_position():
    """CP passes pre-sharded tables: row j rotates local token j."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 8, 1, 4))
    sin, cos = rope_tables(8, 4)
    rows = np.array([0, 7, 1, 6])  # zig-zag rank 0 of W = 2
    ql, _ = apply_rope(q[:, rows], q[:, rows], pos_sin=sin[rows], pos_cos=cos[rows])
    qg, _ = apply_rope(q, q)
    np.testing.assert_array_equal(ql, qg[:, rows])
    with pytest.raises(ValueError, match="rows"):
        apply_rope(q, q, pos_sin=sin[:4], pos_cos=cos[:4])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), i=st.integers(0, 20), j=st.integers(0, 20), shift=st.integers(1, 50))
def test_scores_depend_only_on_relative_position(seed, i, j, shift):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(8), rng.standard_normal(8)
    T = max(i, j) + shift + 1
    x = np.zeros((1, T, 1, 8))
    x[0, i, 0], x[0, j, 0] = a, b
    y = x.copy()
    y[0, i, 0] = y[0, j, 0] = 0
    y[0, i + shift, 0], y[0, j + shift, 0] = a, b
    for variant in ("default", "complex"):
        qx, kx = apply_rope(x, x, variant=variant, theta=100)
        qy, ky = apply_rope(y, y, variant=variant, theta=100)
        s_x = qx[0, i, 0] @ kx[0, j, 0] if i != j else qx[0, i, 0] @ qx[0, i, 0]
        s_y = (
            qy[0, i + shift, 0] @ ky[0, j + shift, 0] if i != j else qy[0, i + shift, 0] @ qy[0, i + shift, 0]
        )
        assert s_x == pytest.approx(s_y, rel=1e-9, abs=1e-9)


def test_errors():
    x = np.zeros((1, 4, 1, 4))
    with pytest.raises(ValueError, match="mutually exclusive"):
        apply_rope(x, x, cu_doc_lens=[0, 4], start_pos=0)
    with pytest.raises(ValueError, match="scaling"):
        apply_rope(x, x, variant="complex", scaling={"type": "pi"})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        apply_rope(x, x, variant="fused", partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="Tq == Tk"):
        apply_rope(x[:, :2], x, cu_doc_lens=[0, 4])
    with pytest.raises(ValueError, match="even"):
        apply_rope(x, x, partial_rotary_factor=0.25)


def test_no_global_rope_rule():
    assert layer_uses_rope(no_global_rope=False, uses_swa=False)
    assert not layer_uses_rope(no_global_rope=True, uses_swa=False)
    assert layer_uses_rope(no_global_rope=True, uses_swa=True)
