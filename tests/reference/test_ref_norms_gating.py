"""reference.norms and reference.gating: closed-form fixtures and PyTorch cross-checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures import norm_gate_cases as fx
from reference.gating import apply_gate, sigmoid
from reference.norms import NORM_KINDS, l2_norm, layer_norm, norm, qk_norm, qwen_rms_norm, rms_norm


def test_fixtures():
    np.testing.assert_allclose(rms_norm(fx.RMS["x"]), fx.RMS["out"], rtol=1e-15)
    np.testing.assert_allclose(
        rms_norm(fx.RMS["x"], fx.RMS["weight"], fx.RMS["bias"]), fx.RMS["out_affine"], rtol=1e-15
    )
    np.testing.assert_allclose(layer_norm(fx.LAYER["x"]), fx.LAYER["out"], rtol=1e-15)
    np.testing.assert_allclose(l2_norm(fx.L2["x"]), fx.L2["out"], rtol=1e-15)
    x = np.array(fx.QK_L2["x"]).reshape(1, 1, 4)
    np.testing.assert_allclose(
        qk_norm(x, "l2_norm", per_head=True, head_dim=2)[0, 0], fx.QK_L2["per_head"], rtol=1e-15
    )
    np.testing.assert_allclose(qk_norm(x, "l2_norm")[0, 0], fx.QK_L2["full"], rtol=1e-15)
    att = np.ones((1, 1, 2, 1))
    np.testing.assert_allclose(
        apply_gate(att, [[fx.GATE["logits"]]], "headwise")[0, 0, :, 0], fx.GATE["out"], rtol=1e-15
    )
    np.testing.assert_allclose(
        apply_gate(att, [[fx.GATE["logits"]]], "elementwise")[0, 0, :, 0], fx.GATE["out"], rtol=1e-15
    )


def test_against_torch_functional():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((3, 5, 12)), rng.standard_normal(12), rng.standard_normal(12)
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
    np.testing.assert_allclose(
        layer_norm(x, w, b, 1e-5), F.layer_norm(xt, (12,), wt, bt, 1e-5).numpy(), rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(
        rms_norm(x, w, None, 1e-6), F.rms_norm(xt, (12,), wt, 1e-6).numpy(), rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(l2_norm(x), F.normalize(xt, dim=-1, eps=0.0).numpy(), rtol=1e-13)
    np.testing.assert_allclose(sigmoid(x * 50), torch.sigmoid(xt * 50).numpy(), rtol=1e-13, atol=1e-300)


def test_kinds_share_math():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 6)), rng.standard_normal(6), rng.standard_normal(6)
    for kind in ("rms", "fused_rms", "cute_rms", "qwen_rms"):
        np.testing.assert_array_equal(norm(x, kind, w, b), rms_norm(x, w, b))
    np.testing.assert_array_equal(qwen_rms_norm(x, w, b), rms_norm(x, w, b))
    assert set(NORM_KINDS) == {"default", "rms", "qwen_rms", "cute_rms", "fused_rms", "l2_norm"}
    with pytest.raises(ValueError, match="no parameters"):
        norm(x, "l2_norm", w)
    with pytest.raises(ValueError, match="unknown"):
        norm(x, "batch", w)


def test_qk_norm_per_head_vs_full():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4 * 5))
    w = rng.standard_normal(5)
    per_head = qk_norm(x, "rms", w, None, 1e-5, per_head=True, head_dim=5)
    np.testing.assert_array_equal(per_head.reshape(2, 3, 4, 5), rms_norm(x.reshape(2, 3, 4, 5), w))
    np.testing.assert_array_equal(
        qk_norm(x.reshape(2, 3, 4, 5), "rms", w, None, 1e-5, per_head=True), per_head.reshape(2, 3, 4, 5)
    )
    wf = rng.standard_normal(20)
    np.testing.assert_array_equal(qk_norm(x, "default", wf), layer_norm(x, wf))
    assert not np.allclose(qk_norm(x, "rms", np.tile(w, 4)), per_head)


def test_gate_shapes_and_errors():
    rng = np.random.default_rng(3)
    att = rng.standard_normal((2, 3, 4, 5))
    g = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(apply_gate(att, g, "headwise"), att / (1 + np.exp(-g))[..., None], rtol=1e-15)
    ge = rng.standard_normal((2, 3, 20))
    np.testing.assert_allclose(
        apply_gate(att, ge, "elementwise"), att / (1 + np.exp(-ge)).reshape(att.shape), rtol=1e-15
    )
    with pytest.raises(ValueError, match="headwise"):
        apply_gate(att, ge, "headwise")
    with pytest.raises(ValueError, match="granularity"):
        apply_gate(att, g, "channelwise")
