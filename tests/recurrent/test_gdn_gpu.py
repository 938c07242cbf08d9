"""Gated DeltaNet on CUDA: our chunked kernel (bf16 / fp32), fla where it is importable and allowed,
the module, decoding. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from gdn_testing import BUDGET_DGATE, BUDGET_DQKV, BUDGET_OUT, gdr_inputs, lengths_to_cu, rel_rms

from olmo_attn.recurrent import GatedDeltaNet, chunk_gated_delta_rule, gated_delta_rule_step
from olmo_attn.recurrent import fla as fla_mod
from olmo_attn.recurrent.recurrent import step_kernel_failures
from reference import twins

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
NAMES = ("q", "k", "v", "g", "beta", "h0")


def _reference(inp, cu, B, T, do, dfin):
    leaves = {n: inp[n].detach().double().cpu().requires_grad_() for n in NAMES}
    args = [leaves[n] for n in NAMES[:5]]
    if cu is not None:
        args = [a.reshape(1, B * T, *a.shape[2:]) for a in args]
    o, fin = twins.gated_delta_rule(
        *args, initial_state=leaves["h0"], use_qk_l2norm=True,
        cu_seqlens=None if cu is None else cu.cpu().numpy(),
    )  # fmt: skip
    o = o.reshape(B, T, *o.shape[2:])
    ((o * do.double().cpu()).sum() + (fin * dfin.double().cpu()).sum()).backward()
    return o, fin, {n: leaves[n].grad for n in NAMES}


def _run(kernel, inp, cu, do, dfin, grad=True, **kw):
    leaves = {n: inp[n].detach().clone().requires_grad_(grad) for n in NAMES}
    o, fin = kernel(
        *[leaves[n] for n in NAMES[:5]], initial_state=leaves["h0"], output_final_state=True,
        use_qk_l2norm=True, cu_seqlens=cu, **kw,
    )  # fmt: skip
    if grad:
        ((o.float() * do).sum() + (fin.float() * dfin).sum()).backward()
    return o, fin, {n: leaves[n].grad for n in NAMES}


CASES = [
    pytest.param(2, 200, 2, 4, 64, 128, None, id="gva"),
    pytest.param(1, 330, 2, 4, 128, 256, [100, 1, 0, 150, 79], id="docs-Dk128-Dv256"),
]


def _inputs(B, T, H, HV, Dk, Dv, docs, dtype):
    cu = lengths_to_cu(docs).cuda() if docs else None
    n_seq = len(docs) if docs else B
    inp = gdr_inputs(B, T, H, HV, Dk, Dv, n_seq=n_seq, dtype=dtype, device="cuda")
    inp["g"] = inp["g"].float()
    inp["h0"] = inp["h0"].float()
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(B, T, HV, Dv, generator=gen).cuda()
    dfin = torch.randn(n_seq, HV, Dk, Dv, generator=gen).cuda()
    return inp, cu, do, dfin


@pytest.mark.parametrize(
    ("solve", "scan", "C"),
    [
        ("auto", "auto", 64),
        ("auto", "auto", 128),
        ("solve", "transition", 64),
        ("blocked", "transition", 64),
        ("blocked", "delta", 64),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("B", "T", "H", "HV", "Dk", "Dv", "docs"), CASES)
def test_chunked_cuda_budgets(B, T, H, HV, Dk, Dv, docs, dtype, solve, scan, C):
    inp, cu, do, dfin = _inputs(B, T, H, HV, Dk, Dv, docs, dtype)
    o, fin, grads = _run(chunk_gated_delta_rule, inp, cu, do, dfin, solve=solve, scan=scan, chunk_size=C)
    ro, rfin, rgrads = _reference(inp, cu, B, T, do, dfin)
    f = 1.0 if dtype == torch.bfloat16 else 0.002
    assert rel_rms(o, ro) < BUDGET_OUT * f and rel_rms(fin, rfin) < BUDGET_OUT * f
    for n in ("q", "k", "v", "h0"):
        assert rel_rms(grads[n], rgrads[n]) < BUDGET_DQKV * f, n
    for n in ("g", "beta"):
        assert rel_rms(grads[n], rgrads[n]) < BUDGET_DGATE * f, n


@pytest.mark.parametrize(("B", "T", "H", "HV", "Dk", "Dv", "docs"), CASES)
def test_fla_against_reference(B, T, H, HV, Dk, Dv, docs):
    ok, why = fla_mod.fla_kernel_usable(torch.device("cuda"), torch.bfloat16, backward=False)
    if not ok:
        pytest.skip(why)
    grad_ok, _ = fla_mod.fla_kernel_usable(torch.device("cuda"), torch.bfloat16, backward=True)
    inp, cu, do, dfin = _inputs(B, T, H, HV, Dk, Dv, docs, torch.bfloat16)
    o, fin, grads = _run(fla_mod.fla_chunk_gated_delta_rule, inp, cu, do, dfin, grad=grad_ok)
    ro, rfin, rgrads = _reference(inp, cu, B, T, do, dfin)
    assert rel_rms(o, ro) < BUDGET_OUT and rel_rms(fin, rfin) < BUDGET_OUT
    if grad_ok:
        for n in ("q", "k", "v", "h0"):
            assert rel_rms(grads[n], rgrads[n]) < BUDGET_DQKV, n
        for n in ("g", "beta"):
            assert rel_rms(grads[n], rgrads[n]) < BUDGET_DGATE, n


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_module_cuda_bf16_forward_backward(backend):
    torch.manual_seed(0)
    m = GatedDeltaNet(d_model=256, n_heads=4, n_v_heads=8, backend=backend, init_device="cuda")
    m.init_weights(init_method="normal", d_model=256, block_idx=0, num_blocks=2, std=0.05)
    x = torch.randn(2, 96, 256, device="cuda", requires_grad=True)
    cu = lengths_to_cu([50, 46, 60, 36]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x, cu_doc_lens=cu)
    y.float().square().mean().backward()
    weights = {k: v.detach().double().cpu() for k, v in m.state_dict().items()}
    r = twins.gdn_layer_forward(
        weights, x.detach().double().cpu().reshape(1, 192, 256), n_heads=4, n_v_heads=8,
        cu_doc_lens=cu.cpu().numpy(),
    ).reshape(2, 96, 256)  # fmt: skip
    assert rel_rms(y, r) < 2e-2
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("solve", ["auto", "blocked"])
def test_chunked_cuda_autocast_changes_nothing(solve):
    """Under ``torch.autocast("cuda", bfloat16)`` (forward and backward inside it) the kernel's
    outputs, final states and gradients equal a run without autocast (it used to fail with "Input
    dtypes must be the same" in the state recurrence)."""
    inp, cu, do, dfin = _inputs(1, 330, 2, 4, 64, 128, [100, 1, 0, 150, 79], torch.float32)
    plain = _run(chunk_gated_delta_rule, inp, cu, do, dfin, solve=solve)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        auto = _run(chunk_gated_delta_rule, inp, cu, do, dfin, solve=solve)
    assert auto[0].dtype == torch.float32
    # float32 rounding level (bf16 matmuls under autocast would be ~1e-3); not bitwise, as GPU
    # reductions need not repeat their order
    assert rel_rms(auto[0], plain[0]) < 1e-6 and rel_rms(auto[1], plain[1]) < 1e-6
    for n in NAMES:
        assert rel_rms(auto[2][n], plain[2][n]) < 1e-6, n


@pytest.mark.parametrize(
    ("B", "H", "HV", "Dk", "Dv", "dtype"),
    [
        (64, 16, 16, 128, 256, torch.bfloat16),
        (3, 2, 6, 24, 40, torch.float32),
        (2, 1, 1, 256, 96, torch.float16),
    ],
)
def test_triton_step_cuda_matches_eager(B, H, HV, Dk, Dv, dtype):
    inp = gdr_inputs(B, 3, H, HV, Dk, Dv, dtype=torch.float32, device="cuda")
    s_e = inp["h0"].clone()
    s_t = inp["h0"].clone()
    for t in range(3):
        args = [inp[n][:, t].to(dtype) for n in ("q", "k", "v")]
        g, beta = inp["g"][:, t], inp["beta"][:, t].to(dtype)
        o_e, s_e = gated_delta_rule_step(*args, g, beta, s_e, use_qk_l2norm=True, kernel="eager")
        o_t, s_t = gated_delta_rule_step(*args, g, beta, s_t, use_qk_l2norm=True, kernel="triton")
        assert "triton" not in step_kernel_failures(), step_kernel_failures()
        assert o_t.dtype == dtype
        assert rel_rms(o_t, o_e) < (1e-6 if dtype == torch.float32 else 8e-3)
        assert rel_rms(s_t, s_e) < 1e-6


@pytest.mark.parametrize("decode_kernel", ["auto", "eager"])
def test_decode_equals_forward_cuda(decode_kernel):
    torch.manual_seed(0)
    m = GatedDeltaNet(d_model=128, n_heads=2, n_v_heads=4, init_device="cuda", backend="torch")
    m.decode_kernel = decode_kernel
    m.init_weights(init_method="normal", d_model=128, block_idx=0, num_blocks=2, std=0.1)
    x = torch.randn(4, 40, 128, device="cuda")
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(4)
        outs = [m(x[:, :25], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(25, 40)]
    assert rel_rms(torch.cat(outs, 1), full) < 1e-5


def test_compiled_step_cuda():
    inp = gdr_inputs(8, 1, 4, 4, 64, 128, dtype=torch.float32, device="cuda")
    args = [inp[n][:, 0] for n in ("q", "k", "v", "g", "beta")]
    o1, s1 = gated_delta_rule_step(*args, inp["h0"].clone(), use_qk_l2norm=True)
    o2, s2 = gated_delta_rule_step(*args, inp["h0"].clone(), use_qk_l2norm=True, compile=True)
    assert "compile" not in step_kernel_failures(), step_kernel_failures()
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
