"""The budget arithmetic of docs/judging.md (conformance.tolerances) and the checks built on it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conformance import tolerances as tol
from conformance.checks import (
    Segment,
    bit_identical,
    check_edges,
    check_isolation,
    edge_probes,
    judge_softmax,
    nan_poison,
)


def test_measured_atol_is_the_shift_trick_in_the_case_dtype():
    ref = torch.tensor([0.1, -1.7, 3.3, 0.0], dtype=torch.float64)
    for dtype, np_dtype in ((torch.float32, np.float32), (torch.float16, np.float16)):
        r = ref.numpy().astype(np_dtype)
        shift = np_dtype(0.3)
        want = 2.0 * float(np.max(np.abs((r + shift) - shift - r)))
        assert tol.measured_atol(ref, dtype) == pytest.approx(want, rel=0, abs=0)
    # bf16 has no NumPy type: its unit round-off at 3.6 is 2^-6; the shift loses at most half of it
    atol = tol.measured_atol(ref, torch.bfloat16)
    assert 0 < atol <= 2 * 2**-6
    # infinities (lse of empty rows) are ignored; an all-zero tensor has no rounding at all
    assert tol.measured_atol(torch.tensor([-math.inf, 0.0]), torch.float32) == 0.0


def test_max_budget_boundary_and_fields():
    ref = torch.zeros(4, dtype=torch.float64)
    low = torch.tensor([0.0, 0.1, 0.0, 0.0])
    atol = max(tol.measured_atol(ref, torch.float32), tol.atol_floor(torch.float32, 0.0))
    assert atol == 0.0
    at_bound = torch.tensor([0.0, 0.0, 0.2, 0.0])  # err = 2 * 0.1 exactly
    v = tol.max_error_budget("out", at_bound, ref, low, torch.float32)
    assert v.passed and v.err == pytest.approx(0.2) and v.baseline_err == pytest.approx(0.1)
    assert (
        v.threshold == pytest.approx(0.2)
        and v.ratio == pytest.approx(2.0)
        and v.margin == pytest.approx(0.0, abs=1e-7)
    )
    over = torch.tensor([0.0, 0.0, 0.2001, 0.0])
    v = tol.max_error_budget("out", over, ref, low, torch.float32)
    assert not v.passed and v.budget_ratio > 1.0 and v.margin < 0
    assert "max|out-ref|" in v.message and "2 x low-precision error" in v.message


def test_nan_or_inf_fails_whatever_the_numbers():
    ref = torch.ones(3, dtype=torch.float64)
    low = torch.ones(3)
    for bad in (math.nan, math.inf):
        out = torch.tensor([1.0, bad, 1.0])
        for v in (
            tol.max_error_budget("out", out, ref, low, torch.float32),
            tol.mean_error_budget("out", out, ref, low, torch.float32),
            tol.rel_rms_budget("o", out, ref, 1e9),
        ):
            assert not v.passed and ("NaN" in v.message or "Inf" in v.message)


def test_empty_rows_need_minus_inf_lse():
    ref = torch.tensor([0.5, -math.inf], dtype=torch.float64)
    ok = tol.max_error_budget(
        "lse", torch.tensor([0.5, -math.inf]), ref, torch.tensor([0.5, -math.inf]), torch.float32
    )
    assert ok.passed
    bad = tol.max_error_budget(
        "lse", torch.tensor([0.5, 0.0]), ref, torch.tensor([0.5, -math.inf]), torch.float32
    )
    assert not bad.passed and "lse = -inf" in bad.message


def test_degenerate_zero_gradient_uses_the_floor():
    # dq of a one-key window: mathematically 0, exactly 0 in the baseline, ~1e-6 in a flash-style backward
    ref = torch.zeros(8, dtype=torch.float64)
    low = torch.zeros(8)
    out = torch.full((8,), 1e-6)
    assert not tol.max_error_budget("dq", out, ref, low, torch.bfloat16, scale=0.0).passed
    v = tol.max_error_budget("dq", out, ref, low, torch.bfloat16, scale=3.0)  # the case's gradient scale
    assert v.passed and v.threshold == pytest.approx(tol.atol_floor(torch.bfloat16, 3.0))
    # the floor is far below a bf16 ulp: it does not loosen bf16 verdicts
    assert tol.atol_floor(torch.bfloat16, 1.0) < torch.finfo(torch.bfloat16).eps / 1000


def test_mean_budget_fudge_factors():
    ref = torch.zeros(1000, dtype=torch.float64)
    low = torch.full((1000,), 1e-2)
    assert tol.mean_error_budget("out", torch.full((1000,), 1.09e-2), ref, low, torch.bfloat16).passed
    assert not tol.mean_error_budget("out", torch.full((1000,), 1.2e-2), ref, low, torch.bfloat16).passed
    assert tol.mean_error_budget(
        "out", torch.full((1000,), 9e-2), ref, low, torch.float32
    ).passed  # FlexAttention: 10x


def test_rel_rms_and_gdn_budgets():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)  # rms 3.5355
    out = ref + torch.tensor([0.03, 0.04], dtype=torch.float64)  # rel rms 0.01
    assert tol.rel_rms(out, ref) == pytest.approx(0.01)
    assert tol.gdn_budget("o", torch.bfloat16) == 5e-3
    assert tol.gdn_budget("dq", torch.bfloat16) == 8e-3 and tol.gdn_budget("dbeta", torch.float16) == 2e-2
    assert tol.gdn_budget("cp", torch.bfloat16) == 3e-3
    assert tol.gdn_budget("o", torch.float32) < 1e-4
    v = tol.rel_rms_budget("o", out, ref, 5e-3, low=ref + 0.1, k_low=2.0)  # layer rule: max(budget, 2 x low)
    assert v.passed and v.threshold == pytest.approx(2 * tol.rel_rms(ref + 0.1, ref))
    assert not tol.rel_rms_budget("o", out, ref, 5e-3).passed


def test_pairwise_budget():
    ref = torch.zeros(4, dtype=torch.float64)
    low = torch.full((4,), 0.01)
    a, b = torch.full((4,), 0.01), torch.full((4,), -0.01)
    assert tol.pairwise_budget("pw", a, b, ref, low, torch.float32).passed  # |a - b| = 2 x low
    assert not tol.pairwise_budget("pw", a, b + -0.001, ref, low, torch.float32).passed


def test_judge_softmax_reports_missing_tensors_and_skips_mean_on_parameters():
    ref = {"out": torch.zeros(300, dtype=torch.float64), "d[w]": torch.zeros(300, dtype=torch.float64)}
    low = {k: torch.zeros(300) for k in ref}
    res = judge_softmax({"d[w]": torch.zeros(300)}, ref, low, torch.float32)
    names = {r.name: r.passed for r in res}
    assert names["out"] is False and "d[w]" in names and "d[w].mean" not in names


def test_nan_poison_fills_and_restores():
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    with nan_poison():
        assert torch.isnan(torch.empty(16)).all()
        assert torch.isnan(torch.empty_like(torch.ones(4))).all()
        assert torch.isnan(torch.ones(3).new_empty(5)).all()
    assert (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) == prev


def test_bit_identical_locates_the_difference():
    a = torch.tensor([[1.0, math.nan], [2.0, 3.0]])
    same, _ = bit_identical("x", a, a.clone())
    assert same
    b = a.clone()
    b[1, 0] = 2.0000002
    same, msg = bit_identical("x", a, b)
    assert not same and "(1, 0)" in msg


def _toy_attention(inputs: dict[str, torch.Tensor], cu: list[int], leak: bool) -> dict[str, torch.Tensor]:
    """Causal attention over documents of one flattened sequence ``[T, 1, 1]`` (float64)."""
    q, k, v = inputs["q"][:, 0, 0], inputs["k"][:, 0, 0], inputs["v"][:, 0, 0]
    T = q.shape[0]
    doc = torch.bucketize(torch.arange(T), torch.tensor(cu[1:]), right=True)
    if leak:  # the first token of every document also sees the previous token
        doc = doc.clone()
        doc[torch.tensor(cu[1:-1])] -= 1
    mask = (doc[:, None] == doc[None, :]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    s = (q[:, None] * k[None, :]).masked_fill(~mask, -math.inf)
    out = torch.softmax(s, -1) @ v
    return {"out": out[:, None, None]}


def test_isolation_check_catches_a_leak():
    gen = torch.Generator().manual_seed(0)
    cu = [0, 3, 7, 10]
    inputs = {n: torch.randn(10, 1, 1, generator=gen, dtype=torch.float64) for n in ("q", "k", "v")}
    segs = [Segment(torch.arange(a, b), torch.arange(a, b)) for a, b in itertools.pairwise(cu)]
    for leak, should_pass in ((False, True), (True, False)):
        first = _toy_attention(inputs, cu, leak)
        res = check_isolation(
            lambda x, leak=leak: _toy_attention(x, cu, leak),
            inputs,
            segs,
            1,
            first,
            gen,
            q_names=("q",),
            k_names=("k", "v"),
            q_outputs=("out",),
            k_outputs=(),
        )
        assert res.passed is should_pass, res.message


def test_isolation_grad_ulps_allows_atomic_jitter_not_a_leak():
    """A non-deterministic backward moves other documents' gradients by an ulp between runs: allowed
    with ``grad_ulps``; a real leak (another document's values reaching them) still fails."""
    gen = torch.Generator().manual_seed(0)
    cu = [0, 3, 7, 10]
    inputs = {n: torch.randn(10, 1, 1, generator=gen, dtype=torch.float32) for n in ("q", "k", "v")}
    segs = [Segment(torch.arange(a, b), torch.arange(a, b)) for a, b in itertools.pairwise(cu)]
    calls = iter(range(100))

    def run(x: dict[str, torch.Tensor], leak: float = 0.0) -> dict[str, torch.Tensor]:
        dk = x["k"] * 2.0
        if next(calls):  # every run after the first: one ulp off, as reordered atomic adds are
            dk = torch.nextafter(dk, torch.full_like(dk, math.inf))
        return {"out": x["q"].clone(), "dk": dk + leak * x["v"][4:7].sum()}

    first = run(inputs)
    kw = dict(q_names=("q",), k_names=("k", "v"), q_outputs=("out",), k_outputs=("dk",))
    strict = check_isolation(run, inputs, segs, 1, first, gen, **kw)
    assert not strict.passed and "dk" in strict.message
    assert check_isolation(run, inputs, segs, 1, first, gen, grad_ulps=4, **kw).passed
    leaky = check_isolation(lambda x: run(x, leak=1.0), inputs, segs, 1, first, gen, grad_ulps=4, **kw)
    assert not leaky.passed and "ulps" in leaky.message


def test_edge_probes_and_check():
    T, window = 12, 4  # keys i-3 .. i
    allowed = torch.tensor([[j <= i and j >= i - window + 1 for j in range(T)] for i in range(T)])[None]
    same = torch.ones(1, T, T, dtype=torch.bool)
    flat = torch.arange(T)[None]
    probes = edge_probes(allowed, same, flat, flat, [(0, 9)])
    left = next(p for p in probes if p.side == "left")
    assert left.inside == (6, 7) and left.outside == (5, 4)
    right = next(p for p in probes if p.side == "right")
    assert right.inside == (9, 8) and right.outside == (10, 11)

    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(T, 1, 1, generator=gen, dtype=torch.float64) for n in ("q", "k", "v")}

    def fwd(x: dict[str, torch.Tensor], w: int) -> torch.Tensor:
        q, k, v = x["q"][:, 0, 0], x["k"][:, 0, 0], x["v"][:, 0, 0]
        m = torch.tensor([[j <= i and j >= i - w + 1 for j in range(T)] for i in range(T)])
        return (torch.softmax((q[:, None] * k[None]).masked_fill(~m, -math.inf), -1) @ v)[:, None, None]

    good = check_edges("window_edge", lambda x: fwd(x, window), inputs, probes, fwd(inputs, window), gen)
    assert good.passed, good.message
    bad = check_edges(
        "window_edge", lambda x: fwd(x, window + 1), inputs, probes, fwd(inputs, window + 1), gen
    )
    assert not bad.passed and "just outside the left edge changed" in bad.message


def test_pairwise_gradients_share_the_floor_scale():
    """A window of one key gives dq = dk = 0 exactly: two backends' rounding noise there is judged with
    the gradients' shared atol scale (as each backend's own check does), not a zero budget."""
    from conformance.cases import Case
    from conformance.families.pairwise import judge_pair, pairwise_case
    from conformance.results import Stored

    zero, dv = torch.zeros(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    refs = {"out": dv.clone(), "dq": zero, "dv": dv}
    noisy = {"out": dv.half(), "dq": zero.half() + 3e-7, "dv": dv.half()}
    exact = {"out": dv.half(), "dq": zero.half(), "dv": dv.half()}
    lows = {"out": dv.half(), "dq": zero.half(), "dv": dv.half()}
    a = Case("gpu", "kernel", "a", "window", dtype="float16")
    b = Case("gpu", "kernel", "b", "window", dtype="float16")
    sa, sb = Stored(noisy, refs, lows, torch.float16), Stored(exact, refs, lows, torch.float16)
    res = judge_pair(pairwise_case(a, b), sa, sb)
    assert res.status == "passed", res.message
    assert (
        tol.pairwise_budget("dq", zero + 3e-7, zero, zero, zero, torch.float16).passed is False
    )  # no scale: 0
    sb_far = Stored({**exact, "dq": zero.half() + 1e-2}, refs, lows, torch.float16)
    assert judge_pair(pairwise_case(a, b), sa, sb_far).status == "failed"


def test_runner_pairwise_pass_skips_dropout_problems():
    """Each kernel draws its own dropout mask: the runner's pairwise post-pass compares two backends'
    stored tensors for the pairwise families only (a torch~flash_2 dropout pair always differed)."""
    from conformance.cases import Case
    from conformance.families.pairwise import pairwise_results
    from conformance.results import RunContext, Stored

    t = torch.zeros(3, dtype=torch.float64)
    stored = Stored({"out": t.float()}, {"out": t}, {"out": t.float()}, torch.float32)
    ctx, by_key = RunContext(), {}
    for family, variant in (("attn", "causal"), ("dropout", "keep_mask")):
        for backend in ("torch", "flash_2"):
            case = Case("gpu", family, backend, variant, "float32")
            ctx.remember(case, stored)
            by_key.setdefault(case.problem_key, {})[backend] = case
    got = pairwise_results(ctx, by_key)
    assert [r.case.variant for r in got] == ["attn/causal"]
    assert got[0].case.backend == "torch~flash_2"
