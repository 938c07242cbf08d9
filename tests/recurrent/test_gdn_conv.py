"""Short causal convolution: reference, document resets, cache chaining, decode step."""

from __future__ import annotations

import pytest
import torch
from gdn_testing import lengths_to_cu

from olmo_attn.recurrent import CausalConv1d, causal_conv1d, causal_conv1d_step
from reference import twins


@pytest.mark.parametrize("Kc", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "docs", [None, [3, 0, 1, 20], [15, 30, 3]], ids=["nodocs", "docs", "docs-cross-rows"]
)
def test_matches_reference(Kc, bias, docs):
    torch.manual_seed(Kc)
    B, T = (2, 24) if docs != [3, 0, 1, 20] else (1, 24)
    x = torch.randn(B, T, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, Kc, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    cu = lengths_to_cu(docs) if docs is not None else None
    y, fin = causal_conv1d(x, w, b, cu_seqlens=cu)
    assert fin is None
    xr = (
        x.detach().reshape(1, B * T, 6).requires_grad_()
        if cu is not None
        else x.detach().clone().requires_grad_()
    )
    r = twins.causal_conv1d(xr, w, b, cu_seqlens=None if cu is None else cu.numpy()).reshape(B, T, 6)
    torch.testing.assert_close(y, r, rtol=1e-13, atol=1e-13)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * dy).sum(), [x, w])
    gxr, gwr = torch.autograd.grad((r * dy).sum(), [xr, w])
    torch.testing.assert_close(gx, gxr.reshape(B, T, 6), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gw, gwr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [0, 1, 2, 5])
def test_cache_chaining_equals_one_call(split):
    torch.manual_seed(split)
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    full, _ = causal_conv1d(x, w, activation=None)
    zero = torch.zeros(2, 5, 3, dtype=torch.float64)
    a, st = causal_conv1d(x[:, :split], w, activation=None, initial_state=zero, output_final_state=True)
    b, st2 = causal_conv1d(x[:, split:], w, activation=None, initial_state=st, output_final_state=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(st2, x[:, -3:].transpose(1, 2), rtol=0, atol=0)
    # token by token
    state = torch.zeros(2, 5, 3, dtype=torch.float64)
    outs = []
    for t in range(9):
        y, state = causal_conv1d_step(x[:, t], w, None, state, activation=None)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-14, atol=1e-14)


def test_bf16_input_is_computed_in_float32():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8).to(torch.bfloat16)
    w = torch.randn(8, 1, 4)
    y, _ = causal_conv1d(x, w)
    r = twins.causal_conv1d(x.double(), w.double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), r, rtol=8e-3, atol=8e-3)  # one bf16 rounding of the output


def test_module_layout_and_cp_slice():
    torch.manual_seed(0)
    conv = CausalConv1d(8, 4, bias=True)
    assert conv.weight.shape == (8, 1, 4) and conv.bias.shape == (8,)
    assert conv.groups == 8 and conv.padding == (3,)
    x = torch.randn(2, 10, 8)
    y, _ = conv(x)
    r = twins.causal_conv1d(x.double(), conv.weight.detach(), conv.bias.detach())
    torch.testing.assert_close(y.double(), r, rtol=1e-5, atol=1e-5)
    conv.cp_channels = slice(4, 8)
    y2, _ = conv(x[..., 4:])
    # same numbers up to float32 rounding (vectorised vs scalar SiLU differ by an ulp on CPU)
    torch.testing.assert_close(y2, y[..., 4:], rtol=1e-6, atol=1e-6)


def test_errors():
    x = torch.randn(1, 6, 4)
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="cannot be combined with cu_seqlens"):
        causal_conv1d(x, w, cu_seqlens=lengths_to_cu([6]), initial_state=torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d(x, w, initial_state=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
