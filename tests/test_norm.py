"""QK-norm layers against ``reference.norms`` (forward) and ``reference.twins``
(gradients): float64 within 1e-10, float32/bfloat16 within the error budget (docs/judging.md)."""

from __future__ import annotations

import pytest
import torch

from conformance import baseline
from conformance.tolerances import max_error_budget
from olmo_attn import (
    ConfigurationError,
    CuTeRMSNorm,
    FusedRMSNorm,
    L2Norm,
    LayerNorm,
    LayerNormConfig,
    LayerNormType,
    QwenRMSNorm,
    RMSNorm,
    l2_normalize,
)
from reference import norms as ref_norms
from reference import twins

CLASSES = {
    "default": LayerNorm,
    "rms": RMSNorm,
    "qwen_rms": QwenRMSNorm,
    "cute_rms": CuTeRMSNorm,
    "fused_rms": FusedRMSNorm,
    "l2_norm": L2Norm,
}


def _within_budget(name: str, out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype: torch.dtype):
    verdict = max_error_budget(name, out, ref, low, dtype)
    assert verdict.passed, verdict.message


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 1.0)


def _cases():
    for kind in ("default", "rms", "qwen_rms", "cute_rms", "fused_rms"):
        for affine, bias in ((True, True), (True, False), (False, False)):
            if kind == "fused_rms" and not affine:
                continue
            yield kind, affine, bias
    yield "l2_norm", None, None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,affine,bias", list(_cases()))
def test_norm_matches_reference_forward_and_gradients(kind, affine, bias, dtype):
    gen = torch.Generator().manual_seed(hash((kind, affine, bias)) % 2**31)
    cfg = (
        LayerNormConfig(name=kind)
        if kind == "l2_norm"
        else LayerNormConfig(name=kind, elementwise_affine=affine, bias=bias, eps=1e-6, dtype=dtype)
    )
    norm = cfg.build(24)
    assert isinstance(norm, CLASSES[kind])
    _randomize(norm, gen)
    x64 = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64) * 3 + 0.5
    x = x64.to(dtype).requires_grad_()
    y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape

    w = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else None
    b = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else None
    eps = 1e-6
    ref = torch.as_tensor(
        ref_norms.norm(
            x.detach().double().numpy(),
            kind,
            None if w is None else w.numpy(),
            None if b is None else b.numpy(),
            eps,
        )
    )
    # gradients through the float64 twin
    xt = x.detach().double().requires_grad_()
    wt = w.clone().requires_grad_() if w is not None else None
    bt = b.clone().requires_grad_() if b is not None else None
    ref_t = twins.norm(xt, kind, wt, bt, eps)
    assert torch.allclose(ref_t.detach(), ref, rtol=0, atol=1e-12)  # twin == NumPy reference
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref_t.backward(dy)
    pairs = [("out", y.detach(), ref), ("dx", x.grad, xt.grad)]
    if wt is not None:
        pairs.append(("dweight", norm.weight.grad, wt.grad))
    if bt is not None:
        pairs.append(("dbias", norm.bias.grad, bt.grad))

    if dtype == torch.float64:
        for name, got, want in pairs:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
        return
    # float32: the low-precision baseline is plain PyTorch math in float32
    xl = x.detach().clone().requires_grad_()
    wl = norm.weight.detach().clone().requires_grad_() if w is not None else None
    bl = norm.bias.detach().clone().requires_grad_() if b is not None else None
    low = baseline.norm(xl, kind, wl, bl, eps)
    low.backward(dy.to(dtype))
    lows = {"out": low.detach(), "dx": xl.grad, "dweight": wl.grad if wl is not None else None}
    lows["dbias"] = bl.grad if bl is not None else None
    for name, got, want in pairs:
        _within_budget(name, got, want, lows[name], dtype)


def test_qwen_rms_rounds_before_the_affine_step():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, generator=gen) * 4).to(torch.bfloat16)
    qwen, rms = QwenRMSNorm(size=64, bias=False), RMSNorm(size=64, bias=False)
    with torch.no_grad():
        w = torch.randn(64, generator=gen) + 1
        qwen.weight.copy_(w)
        rms.weight.copy_(w)
    xf = x.float()
    hf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * w.to(torch.bfloat16)
    assert torch.equal(qwen(x), hf)  # HF Qwen3 order, bit for bit
    olmo = (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))).to(torch.bfloat16)
    assert torch.equal(rms(x), olmo)
    assert not torch.equal(qwen(x), rms(x))  # the two orders really differ in bf16


@pytest.mark.parametrize("kind", ["default", "rms", "l2_norm"])
def test_half_precision_input_full_precision_compute(kind):
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(8, 48, generator=gen, dtype=torch.float64) * 2
    norm = LayerNormConfig(name=kind).build(48)
    x = x64.to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = torch.as_tensor(ref_norms.norm(x.double().numpy(), kind))
    low = baseline.norm(x, kind, None, None, 1e-5)  # bf16 math throughout
    _within_budget("out", y, ref, low, torch.bfloat16)
    # full precision beats the bf16 baseline
    assert (y.double() - ref).abs().max() <= (low.double() - ref).abs().max()


def test_full_precision_false_computes_in_input_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    low_prec = RMSNorm(size=32, full_precision=False, dtype=torch.bfloat16)
    y = low_prec(x)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = low_prec.weight * expected + low_prec.bias
    assert torch.equal(y, expected)


def test_autocast_is_disabled_inside():
    norm = LayerNormConfig(name="rms").build(16)
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(x))


def test_float64_is_not_rounded_through_float32():
    x = torch.randn(3, 16, dtype=torch.float64)
    for kind in ("default", "rms", "qwen_rms", "l2_norm"):
        norm = LayerNormConfig(name=kind).build(16)
        if kind != "l2_norm":
            norm = norm.double()
        ref = torch.as_tensor(ref_norms.norm(x.numpy(), kind))
        assert (norm(x) - ref).abs().max() < 1e-14, kind


def test_l2_normalize_rows_unit_norm_and_zero_row_nan():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = l2_normalize(x)
    assert torch.equal(y[0], torch.tensor([0.6, 0.8]))
    assert torch.isnan(y[1]).all()  # no eps, as OLMo-core


# ----- config ----------------------------------------------------------------------------------
def _all_configs():
    for name in LayerNormType:
        if name == LayerNormType.l2_norm:
            yield LayerNormConfig(name=name)
            continue
        for affine in (None, True, False):
            for bias in (None, True, False):
                if name == LayerNormType.fused_rms and affine is False:
                    continue
                yield LayerNormConfig(name=name, elementwise_affine=affine, bias=bias)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_num_params_equals_built_parameter_count(device):
    for cfg in _all_configs():
        for size in (1, 7, 64):
            built = cfg.build(size, init_device=device)
            assert sum(p.numel() for p in built.parameters()) == cfg.num_params(size), cfg
            for p in built.parameters():
                assert p.device.type == device


def test_state_dict_keys_and_init_values():
    norm = LayerNormConfig(name="rms").build(8)
    assert set(norm.state_dict()) == {"weight", "bias"}  # RMSNorm has a bias by default (OLMo-core)
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    with torch.no_grad():
        norm.weight.mul_(3)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))
    assert set(LayerNormConfig(name="rms", bias=False).build(8).state_dict()) == {"weight"}
    assert LayerNormConfig(name="default", elementwise_affine=False).build(8).state_dict() == {}
    assert LayerNormConfig(name="l2_norm").build(8).state_dict() == {}


def test_param_dtype_from_config():
    norm = LayerNormConfig(name="default", dtype="bfloat16").build(8)
    assert norm.weight.dtype == torch.bfloat16


def test_l2_norm_with_any_option_is_a_configuration_error():
    for field, value in (
        ("elementwise_affine", True),
        ("eps", 1e-6),
        ("bias", False),
        ("full_precision", True),
    ):
        with pytest.raises(ConfigurationError, match="l2_norm"):
            LayerNormConfig(name="l2_norm", **{field: value}).build(8)


def test_kernel_named_norms_keep_olmo_core_constructor_checks():
    with pytest.raises(NotImplementedError, match="elementwise_affine"):
        LayerNormConfig(name="fused_rms", elementwise_affine=False).build(8)
    with pytest.raises(NotImplementedError, match="full_precision"):
        LayerNormConfig(name="fused_rms", full_precision=False).build(8)
    with pytest.raises(NotImplementedError, match="full_precision"):
        LayerNormConfig(name="cute_rms", full_precision=False).build(8)


def test_bad_size_and_unknown_name():
    with pytest.raises(ConfigurationError, match="size"):
        LayerNormConfig(name="rms").build(0)
    with pytest.raises(ValueError):
        LayerNormConfig(name="batch_norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LayerNormConfig.from_dict({"name": "batch_norm"})


@pytest.mark.parametrize(
    "cfg", [*list(_all_configs())[:6], LayerNormConfig(name="qwen_rms", eps=1e-6, dtype="bfloat16")]
)
def test_config_round_trips(cfg):
    assert LayerNormConfig.from_dict(cfg.as_dict()) == cfg
    assert LayerNormConfig.from_dict(cfg.as_config_dict()) == cfg
    assert LayerNormConfig.from_json(cfg.to_json()) == cfg
    assert LayerNormConfig.from_yaml(cfg.to_yaml()) == cfg
