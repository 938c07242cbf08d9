"""Our chunked gated-delta-rule kernel and the recurrent step against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from gdn_testing import (
    BUDGET_DGATE,
    BUDGET_DQKV,
    BUDGET_OUT,
    gdr_inputs,
    lengths_to_cu,
    rel_rms,
)

from olmo_attn.recurrent import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    recurrent_gated_delta_rule,
)
from olmo_attn.recurrent.chunked import _lane_assignment, _unit_lower_inverse_doubling, _varlen_plan
from reference import twins

NAMES = ("q", "k", "v", "g", "beta", "h0")


def _reference(inp: dict, cu: torch.Tensor | None, B: int, T: int):
    """Float64 token-by-token reference (documents: on the flattened batch, as one packed row)."""
    args = [inp[n].detach().double() for n in NAMES[:5]]
    h0 = inp["h0"].detach().double() if inp["h0"] is not None else None
    args = [a.clone().requires_grad_() for a in args]
    h0 = h0.clone().requires_grad_() if h0 is not None else None
    if cu is not None:
        flat = [a.reshape(1, B * T, *a.shape[2:]) for a in args]
        o, fin = twins.gated_delta_rule(
            *flat, initial_state=h0, output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu.numpy()
        )
        o = o.reshape(B, T, *o.shape[2:])
    else:
        o, fin = twins.gated_delta_rule(*args, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    return o, fin, [*args, h0]


def _run_both(inp, cu, B, T, *, chunk_size=64, solve="solve", scan="auto"):
    """Our kernel and the reference, forward + backward with the same random upstream gradients."""
    ours = [None if inp[n] is None else inp[n].clone().requires_grad_() for n in NAMES]
    o, fin = chunk_gated_delta_rule(
        *ours[:5],
        initial_state=ours[5],
        output_final_state=True,
        use_qk_l2norm=True,
        cu_seqlens=cu,
        chunk_size=chunk_size,
        solve=solve,
        scan=scan,
    )
    ro, rfin, rins = _reference(inp, cu, B, T)
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64)
    dfin = torch.randn(rfin.shape, generator=gen, dtype=torch.float64)
    ((o.double() * do).sum() + (fin.double() * dfin).sum()).backward()
    ((ro * do).sum() + (rfin * dfin).sum()).backward()
    grads = {n: (a.grad if a is not None else None) for n, a in zip(NAMES, ours)}
    rgrads = {n: (a.grad if a is not None else None) for n, a in zip(NAMES, rins)}
    return o, fin, grads, ro, rfin, rgrads


# (B, T, H, HV, Dk, Dv, doc lengths or None, chunk)
F64_CASES = [
    pytest.param(2, 100, 2, 4, 16, 24, None, 16, id="gva-T100-C16"),
    pytest.param(1, 130, 1, 1, 8, 8, None, 64, id="mha-T130-C64"),
    pytest.param(2, 64, 2, 2, 16, 32, None, 64, id="T64-exact-chunk"),
    pytest.param(1, 300, 2, 4, 16, 24, [5, 65, 0, 130, 1, 99], 16, id="docs-with-empty"),
    pytest.param(2, 60, 1, 2, 8, 16, [45, 45, 30], 16, id="docs-cross-rows"),
    pytest.param(3, 7, 1, 1, 4, 4, None, 64, id="T<chunk"),
]


SOLVE_SCAN = [
    ("solve", "transition"),
    ("blocked", "transition"),
    ("doubling", "transition"),
    ("solve", "delta"),
    ("doubling", "delta"),
]


@pytest.mark.parametrize(("solve", "scan"), SOLVE_SCAN)
@pytest.mark.parametrize(("B", "T", "H", "HV", "Dk", "Dv", "docs", "C"), F64_CASES)
def test_chunked_float64_matches_reference(B, T, H, HV, Dk, Dv, docs, C, solve, scan):
    cu = lengths_to_cu(docs) if docs is not None else None
    n_seq = len(docs) if docs is not None else B
    inp = gdr_inputs(B, T, H, HV, Dk, Dv, n_seq=n_seq)
    o, fin, grads, ro, rfin, rgrads = _run_both(inp, cu, B, T, chunk_size=C, solve=solve, scan=scan)
    assert o.shape == (B, T, HV, Dv) and fin.shape == (n_seq, HV, Dk, Dv)
    assert rel_rms(o, ro) < 1e-12
    assert rel_rms(fin, rfin) < 1e-12
    for n in NAMES:
        assert rel_rms(grads[n], rgrads[n]) < 1e-11, n


LOW_CASES = [
    pytest.param(2, 130, 2, 4, 32, 48, None, True, id="gva-negeig"),
    pytest.param(2, 100, 2, 2, 32, 64, None, False, id="expandv-posbeta"),
    pytest.param(1, 200, 2, 4, 32, 48, [60, 3, 0, 90, 47], True, id="docs-negeig"),
    pytest.param(1, 128, 1, 1, 64, 64, None, False, id="T128-multiple"),
]


def _ours(inp: dict, cu: torch.Tensor | None, do: torch.Tensor, dfin: torch.Tensor, **kw):
    ts = [None if inp[n] is None else inp[n].clone().requires_grad_() for n in NAMES]
    o, fin = chunk_gated_delta_rule(
        *ts[:5], initial_state=ts[5], output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu, **kw
    )
    ((o.double() * do).sum() + (fin.double() * dfin).sum()).backward()
    return o, fin, {n: (t.grad if t is not None else None) for n, t in zip(NAMES, ts)}


@pytest.mark.parametrize(("B", "T", "H", "HV", "Dk", "Dv", "docs", "neg"), LOW_CASES)
def test_chunked_low_precision_budgets(B, T, H, HV, Dk, Dv, docs, neg):
    """fla's relative-RMS budgets in bf16; 500x tighter in float32 (our float32 accumulation).

    Inputs are bf16-representable, so one float64 reference judges both dtypes."""
    cu = lengths_to_cu(docs) if docs is not None else None
    n_seq = len(docs) if docs is not None else B
    inp = gdr_inputs(B, T, H, HV, Dk, Dv, n_seq=n_seq, neg_eig=neg, dtype=torch.bfloat16)
    inp = {k: v.double() for k, v in inp.items()}
    ro, rfin, rins = _reference(inp, cu, B, T)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64)
    dfin = torch.randn(rfin.shape, generator=gen, dtype=torch.float64)
    ((ro * do).sum() + (rfin * dfin).sum()).backward()
    rgrads = dict(zip(NAMES, (a.grad for a in rins)))
    for dtype, f in ((torch.bfloat16, 1.0), (torch.float32, 0.002)):
        low = {k: v.to(dtype) for k, v in inp.items()}
        low["g"] = inp["g"].float()  # the module's log-decay is float32
        o, fin, grads = _ours(low, cu, do, dfin)
        assert o.dtype == dtype and fin.dtype == torch.float32
        assert rel_rms(o, ro) < BUDGET_OUT * f, dtype
        assert rel_rms(fin, rfin) < BUDGET_OUT * f, dtype
        for n in ("q", "k", "v", "h0"):
            assert rel_rms(grads[n], rgrads[n]) < BUDGET_DQKV * f, (dtype, n)
        for n in ("g", "beta"):
            assert rel_rms(grads[n], rgrads[n]) < BUDGET_DGATE * f, (dtype, n)
        for t in [o, fin, *grads.values()]:
            assert torch.isfinite(t).all()


def test_poisoned_scratch_memory_is_never_read():
    """Uninitialised allocations filled with NaN (fla's trick) change nothing."""
    inp = gdr_inputs(1, 100, 2, 4, 8, 8, n_seq=4)
    cu = lengths_to_cu([30, 0, 40, 30])
    do = torch.randn(1, 100, 4, 8, dtype=torch.float64)
    dfin = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    o_ref, fin_ref, g_ref = _ours(inp, cu, do, dfin, chunk_size=16)
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        o, fin, g = _ours(inp, cu, do, dfin, chunk_size=16)
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
    assert torch.equal(o, o_ref) and torch.equal(fin, fin_ref)
    for n in NAMES:
        assert torch.equal(g[n], g_ref[n]), n


def test_document_isolation_bit_exact():
    """Perturb one document: every other document's outputs, final states and gradients are bitwise equal."""
    lens = [37, 40, 5, 50, 30]
    cu = lengths_to_cu(lens)
    T = sum(lens)
    base = gdr_inputs(1, T, 2, 2, 16, 16, n_seq=len(lens), dtype=torch.float32)
    pert = {k: (v.clone() if v is not None else None) for k, v in base.items()}
    a, b = 37 + 40 + 5, 37 + 40 + 5 + 50  # document 3
    for n in ("q", "k", "v", "g", "beta"):
        pert[n][:, a:b] += 0.5 * torch.randn_like(pert[n][:, a:b])
    pert["h0"][3] += 1.0

    def run(inp):
        ts = [None if inp[n] is None else inp[n].clone().requires_grad_() for n in NAMES]
        o, fin = chunk_gated_delta_rule(
            *ts[:5], initial_state=ts[5], output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu
        )
        (o.square().sum() + fin.square().sum()).backward()
        return o.detach(), fin.detach(), [t.grad for t in ts]

    o1, f1, g1 = run(base)
    o2, f2, g2 = run(pert)
    keep = torch.ones(T, dtype=torch.bool)
    keep[a:b] = False
    assert not torch.equal(o1[:, a:b], o2[:, a:b])
    assert torch.equal(o1[:, keep], o2[:, keep])
    assert torch.equal(f1[[0, 1, 2, 4]], f2[[0, 1, 2, 4]])
    for x, y in zip(g1[:5], g2[:5]):
        assert torch.equal(x[:, keep], y[:, keep])
    assert torch.equal(g1[5][[0, 1, 2, 4]], g2[5][[0, 1, 2, 4]])


def test_many_documents_lane_packing():
    """31 documents of mixed lengths: loop length stays near the longest document; exact results."""
    gen = torch.Generator().manual_seed(5)
    lens = [int(x) for x in torch.randint(0, 20, (30,), generator=gen)] + [60]
    plan = _varlen_plan(tuple(lengths_to_cu(lens).tolist()), 8, 2, torch.device("cpu"))
    longest = -(-max(lens) // 8)
    assert plan.n_steps <= longest + 1  # far below the sum of all chunks
    assert plan.n_steps < sum(-(-n // 8) for n in lens) // 4
    T = sum(lens)
    inp = gdr_inputs(1, T, 1, 2, 4, 4, n_seq=len(lens))
    o, fin, grads, ro, rfin, rgrads = _run_both(inp, lengths_to_cu(lens), 1, T, chunk_size=8)
    assert rel_rms(o, ro) < 1e-12 and rel_rms(fin, rfin) < 1e-12
    for n in NAMES:
        assert rel_rms(grads[n], rgrads[n]) < 1e-11, n


def test_lane_assignment_is_balanced():
    n_lanes, placement = _lane_assignment([4, 4, 2, 2, 0, 4])
    assert n_lanes == 4
    assert placement[4] == (-1, -1)
    loads: dict[int, int] = {}
    for (lane, first), n in zip(placement, [4, 4, 2, 2, 0, 4]):
        if n:
            assert first == loads.get(lane, 0)
            loads[lane] = first + n
    assert max(loads.values()) == 4


def test_no_initial_state_and_no_final_state():
    inp = gdr_inputs(2, 50, 1, 1, 8, 8, with_h0=False)
    o, fin = chunk_gated_delta_rule(
        inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], use_qk_l2norm=True, chunk_size=16
    )
    ro, _ = twins.gated_delta_rule(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], use_qk_l2norm=True)
    assert fin is None and rel_rms(o, ro) < 1e-12


def test_without_l2norm_and_custom_scale():
    inp = gdr_inputs(1, 40, 1, 1, 8, 8)
    k = torch.nn.functional.normalize(inp["k"], dim=-1)
    o, fin = chunk_gated_delta_rule(
        inp["q"], k, inp["v"], inp["g"], inp["beta"], scale=0.7, initial_state=inp["h0"],
        output_final_state=True, chunk_size=16,
    )  # fmt: skip
    ro, rfin = twins.gated_delta_rule(
        inp["q"], k, inp["v"], inp["g"], inp["beta"], scale=0.7, initial_state=inp["h0"], use_qk_l2norm=False
    )
    assert rel_rms(o, ro) < 1e-12 and rel_rms(fin, rfin) < 1e-12


def test_empty_sequence_returns_initial_state():
    inp = gdr_inputs(1, 0, 1, 1, 4, 4)
    o, fin = chunk_gated_delta_rule(
        inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], initial_state=inp["h0"], output_final_state=True
    )
    assert o.shape == (1, 0, 1, 4) and torch.equal(fin, inp["h0"])


@pytest.mark.parametrize(("solve", "scan"), SOLVE_SCAN)
def test_cpu_autocast_changes_nothing(solve, scan):
    """Under ``torch.autocast("cpu", bfloat16)`` the kernel gives bit-identical outputs, final
    states and gradients (it converts its inputs itself; autocast used to run its matmuls in bf16
    and mix bf16/float32 in the state recurrence: "Input dtypes must be the same")."""
    lens = [30, 0, 45, 25]
    cu = lengths_to_cu(lens)
    inp = gdr_inputs(1, 100, 2, 4, 16, 24, n_seq=len(lens), dtype=torch.float32)
    do = torch.randn(1, 100, 4, 24, dtype=torch.float64)
    dfin = torch.randn(4, 4, 16, 24, dtype=torch.float64)
    for docs in (None, cu):
        if docs is None:
            inp_u = {**inp, "h0": inp["h0"][:1]}
            do_u, dfin_u = do, dfin[:1]
        else:
            inp_u, do_u, dfin_u = inp, do, dfin
        plain = _ours(inp_u, docs, do_u, dfin_u, chunk_size=16, solve=solve, scan=scan)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = _ours(inp_u, docs, do_u, dfin_u, chunk_size=16, solve=solve, scan=scan)
        assert auto[0].dtype == torch.float32 and auto[1].dtype == torch.float32
        assert torch.equal(auto[0], plain[0]) and torch.equal(auto[1], plain[1])
        for n in NAMES:
            assert torch.equal(auto[2][n], plain[2][n]), n


def test_cpu_autocast_recompute_and_step():
    """Recomputation in the backward and the decoding step ignore autocast too."""
    inp = gdr_inputs(2, 40, 1, 2, 8, 8, dtype=torch.float32)
    do = torch.randn(2, 40, 2, 8, dtype=torch.float64)
    dfin = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    plain = _ours(inp, None, do, dfin, chunk_size=16, recompute=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _ours(inp, None, do, dfin, chunk_size=16, recompute=True)
    assert torch.equal(auto[0], plain[0])
    for n in NAMES:
        assert torch.equal(auto[2][n], plain[2][n]), n
    args = [inp[n][:, 0] for n in ("q", "k", "v", "g", "beta")]
    o1, s1 = gated_delta_rule_step(*args, inp["h0"].clone(), use_qk_l2norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o2, s2 = gated_delta_rule_step(*args, inp["h0"].clone(), use_qk_l2norm=True)
    assert o2.dtype == torch.float32 and torch.equal(o1, o2) and torch.equal(s1, s2)


@pytest.mark.parametrize("C", [1, 2, 5, 16, 24])
def test_doubling_inverse_is_the_inverse(C):
    gen = torch.Generator().manual_seed(C)
    a = torch.randn(3, 2, C, C, generator=gen, dtype=torch.float64).tril(-1) * 0.5
    inv = _unit_lower_inverse_doubling(a)
    eye = torch.eye(C, dtype=torch.float64)
    assert inv.shape == a.shape
    torch.testing.assert_close(torch.matmul(eye + a, inv), eye.expand_as(a), rtol=0, atol=1e-12)


@pytest.mark.parametrize("recompute", [False, True])
def test_gradients_of_a_subset_of_inputs(recompute):
    """Only some inputs require grad (with and without recomputation, with documents): those get
    exactly the gradients of the all-inputs run, the others none."""
    inp = gdr_inputs(1, 70, 1, 2, 8, 8, n_seq=3)
    cu = lengths_to_cu([20, 30, 20])

    def run(req: set[str], rc: bool) -> dict:
        ts = {n: inp[n].clone().requires_grad_(n in req) for n in NAMES}
        o, f = chunk_gated_delta_rule(
            *[ts[n] for n in NAMES[:5]], initial_state=ts["h0"], output_final_state=True,
            use_qk_l2norm=True, cu_seqlens=cu, chunk_size=16, recompute=rc,
        )  # fmt: skip
        (o.square().sum() + f.sum()).backward()
        return {n: ts[n].grad for n in NAMES}

    full = run(set(NAMES), False)
    for req in ({"v"}, {"h0"}, {"g", "beta"}, {"q", "h0"}):
        got = run(req, recompute)
        for n in NAMES:
            if n in req:
                torch.testing.assert_close(got[n], full[n], rtol=1e-12, atol=1e-12)
            else:
                assert got[n] is None, n


# ----------------------------------------------------------------------------------- recurrent


@pytest.mark.parametrize("docs", [None, [10, 0, 33]])
def test_recurrent_matches_reference(docs):
    B, T = (2, 43) if docs is None else (1, 43)
    cu = lengths_to_cu(docs) if docs is not None else None
    inp = gdr_inputs(B, T, 2, 4, 8, 12, n_seq=len(docs) if docs else B)
    o, fin = recurrent_gated_delta_rule(
        inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], initial_state=inp["h0"],
        output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu,
    )  # fmt: skip
    ro, rfin, _ = _reference(inp, cu, B, T)
    assert rel_rms(o, ro) < 1e-12 and rel_rms(fin, rfin) < 1e-12


def test_step_inplace_equals_out_of_place():
    inp = gdr_inputs(3, 1, 2, 4, 8, 16)
    args = [inp[n][:, 0] for n in ("q", "k", "v", "g", "beta")]
    s1 = inp["h0"].clone()
    s2 = inp["h0"].clone()
    o1, n1 = gated_delta_rule_step(*args, s1, use_qk_l2norm=True, inplace=False)
    o2, n2 = gated_delta_rule_step(*args, s2, use_qk_l2norm=True, inplace=True)
    assert n2 is s2 and torch.equal(s1, inp["h0"])  # out of place leaves the old state alone
    assert torch.allclose(o1, o2, rtol=1e-14, atol=1e-14) and torch.allclose(n1, n2, rtol=1e-14, atol=1e-14)
    ro, rfin = twins.gated_delta_rule(
        *[inp[n] for n in ("q", "k", "v", "g", "beta")], initial_state=inp["h0"], use_qk_l2norm=True
    )
    assert rel_rms(o1, ro[:, 0]) < 1e-13 and rel_rms(n1, rfin) < 1e-13


def test_step_gradients_flow():
    inp = gdr_inputs(2, 1, 1, 2, 4, 4)
    ts = [inp[n][:, 0].clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")]
    h0 = inp["h0"].clone().requires_grad_()
    o, new = gated_delta_rule_step(*ts, h0, use_qk_l2norm=True)
    assert new is not h0
    (o.sum() + new.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in [*ts, h0])


@pytest.mark.slow
def test_compiled_step_matches_eager():
    pytest.importorskip("torch._inductor")
    inp = gdr_inputs(2, 1, 2, 2, 8, 16, dtype=torch.float32)
    args = [inp[n][:, 0] for n in ("q", "k", "v", "g", "beta")]
    o1, s1 = gated_delta_rule_step(*args, inp["h0"].clone(), use_qk_l2norm=True)
    o2, s2 = gated_delta_rule_step(*args, inp["h0"].clone(), use_qk_l2norm=True, compile=True)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- validation


def test_input_errors_name_the_argument():
    inp = gdr_inputs(1, 8, 2, 4, 4, 4)
    q, k, v, g, b = (inp[n] for n in ("q", "k", "v", "g", "beta"))
    with pytest.raises(ValueError, match="multiple of the q/k heads"):
        chunk_gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], b[:, :, :3])
    with pytest.raises(ValueError, match="k must have the shape of q"):
        chunk_gated_delta_rule(q, k[:, :4], v, g, b)
    with pytest.raises(ValueError, match="beta must have shape"):
        chunk_gated_delta_rule(q, k, v, g, b[:, :4])
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64"):
        chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="must equal the number of flattened tokens"):
        chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        chunk_gated_delta_rule(q, k, v, g, b, initial_state=torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_gated_delta_rule(q, k, v, g, b, chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], b[:, 0], torch.zeros(1, 4, 4, 5))


@pytest.mark.parametrize("solve", ["solve", "blocked", "doubling"])
def test_strong_decay_and_extreme_beta_stay_finite_and_exact(solve):
    """Log-decays down to -40 per token (exp underflows to 0 within a chunk) and beta near 0 and 2."""
    inp = gdr_inputs(1, 80, 1, 2, 8, 8)
    gen = torch.Generator().manual_seed(11)
    inp["g"] = -40 * torch.rand(1, 80, 2, generator=gen, dtype=torch.float64) ** 3
    inp["beta"] = torch.where(torch.rand(1, 80, 2, generator=gen) < 0.5, 1e-4, 2 - 1e-4).double()
    o, fin, grads, ro, rfin, rgrads = _run_both(inp, None, 1, 80, chunk_size=32, solve=solve)
    assert rel_rms(o, ro) < 1e-10 and rel_rms(fin, rfin) < 1e-10
    for n in NAMES:
        assert torch.isfinite(grads[n]).all() and rel_rms(grads[n], rgrads[n]) < 1e-9, n
