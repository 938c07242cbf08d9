"""The harness catches bugs of three more kinds, and names the check that caught each:

* a precision-only regression in half precision (the float32 upcast dropped): only the
  rounded-float32 check (``out.rounded_fp32``) can see it — the 2x-baseline budgets pass it;
* a fast path wrong for one dtype and one head layout only (float16 with grouped kv heads): the
  ``--quick`` matrix must contain that pair in every family, and the failing cases are exactly those;
* Ulysses CP with replicated kv heads (``n_kv_heads`` not a multiple of the world size) whose
  backward merges the replicas wrongly: the multiproc tier fails it on ``dk`` / ``dv``.

A correct backend (``ExactBackend``, the float64 reference rounded once) passes the same slices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conformance_fakes import ExactBackend, subject_for
from selftest_fakes import Float16GQAShortcut, HalfSoftmax, UlyssesAveragedReplicas

from conformance import tolerances as tol
from conformance.cases import build_cases
from conformance.families import run_case, run_cp_cases
from conformance.results import FAILED, PASSED, RunContext
from conformance.subjects import Subject, registered
from olmo_attn.backends.capabilities import Feature

FEATURES = frozenset(Feature) - {
    Feature.kv_cache,
    Feature.kv_cache_leftpad,
    Feature.ring_cp,
    Feature.ulysses_cp,
    Feature.deterministic,
    Feature.dropout,
}


def _run(subject: Subject, pattern: str, *, quick: bool = True) -> list[Any]:
    with registered(subject):
        cases = build_cases(tiers=["cpu"], backends=[subject.name], quick=quick, pattern=pattern)
        assert cases, f"no cases match {pattern!r}"
        return [run_case(c, RunContext(keep_for_pairwise=False)) for c in cases]


def _failed(results: list[Any]) -> set[str]:
    return {c.name for r in results for c in r.failed_checks}


# ----------------------------------------------------------------------------- (a) precision


# wide rows (every causal prefix, whole documents, non-causal, varlen documents): the dropped upcast
# costs 2-3 roundings there; a window of a few keys leaves little to accumulate (1.5 or less measured)
HALF = (
    "(bfloat16 or float16) and (cpu/attn/{n}/causal/ or cpu/attn/{n}/documents/ "
    "or cpu/kernel/{n}/non_causal/ or cpu/kernel/{n}/varlen/)"
)


def test_dropped_float32_upcast_fails_only_the_rounded_float32_check():
    results = _run(subject_for("half_softmax", HalfSoftmax, features=FEATURES), HALF.format(n="half_softmax"))
    assert {r.case.dtype for r in results} == {"bfloat16", "float16"}
    assert {r.case.family for r in results} == {"attn", "kernel"}
    assert all(r.status == FAILED for r in results), [(r.case.id, r.message) for r in results]
    # the 2x-baseline budgets cannot see it: the new check is the only one that fails
    assert _failed(results) == {"out.rounded_fp32"}, _failed(results)
    assert all("out.rounded_fp32" in r.message for r in results)
    for r in results:
        (check,) = [c for c in r.checks if c.name == "out.rounded_fp32"]
        assert check.err > tol.ROUNDED_K * check.baseline_err  # mean|out - r| in roundings, measured


def test_exact_backend_passes_the_rounded_float32_check_and_full_precision_is_not_judged_by_it():
    results = _run(subject_for("exact_half", ExactBackend, features=FEATURES), HALF.format(n="exact_half"))
    assert results and all(r.status == PASSED for r in results), [r.message for r in results]
    assert all(any(c.name == "out.rounded_fp32" for c in r.checks) for r in results)
    full = _run(
        subject_for("half_softmax", HalfSoftmax, features=FEATURES),
        "(float32 or float64) and cpu/attn/half_softmax/causal",
    )
    assert full and all(r.status == PASSED for r in full)  # in float32 there is no upcast to drop
    assert not any(c.name.endswith("rounded_fp32") for r in full for c in r.checks)


def test_rounded_float32_budget_arithmetic():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4096, generator=gen, dtype=torch.float64)
    r = ref.float().bfloat16()
    v = tol.rounded_fp32_budget("out", r, ref, torch.bfloat16)
    assert v.passed and v.err == 0.0 and v.name == "out.rounded_fp32"
    assert v.baseline_err == pytest.approx(float((r.double() - ref).abs().mean()))
    # one unit in the last place on every entry: about 4 roundings' worth of mean error
    off = (r.double() + torch.finfo(torch.bfloat16).eps * r.double().abs()).bfloat16()
    bad = tol.rounded_fp32_budget("out", off, ref, torch.bfloat16)
    assert not bad.passed and bad.err > tol.ROUNDED_K * bad.baseline_err
    nan = r.clone()
    nan[3] = float("nan")
    assert not tol.rounded_fp32_budget("out", nan, ref, torch.bfloat16).passed


# ----------------------------------------------------------------------------- (b) dtype x layout


def test_quick_matrix_pairs_every_dtype_with_every_head_layout():
    for family in ("attn", "kernel", "dropout", "kvcache"):
        full = build_cases(tiers=["cpu"], backends=["torch"], quick=False, pattern=f"cpu/{family}/")
        quick = build_cases(tiers=["cpu"], backends=["torch"], quick=True, pattern=f"cpu/{family}/")
        want = {(c.dtype, c.param["gqa"]) for c in full}
        got = {(c.dtype, c.param["gqa"]) for c in quick}
        assert len(want) > 4 and got == want, (family, sorted(want - got))


def test_float16_only_gqa_shortcut_fails_exactly_the_float16_grouped_cases():
    subject = subject_for("f16_gqa", Float16GQAShortcut, features=FEATURES)
    with registered(subject):
        cases = build_cases(tiers=["cpu"], backends=["f16_gqa"], pattern="cpu/attn/ or cpu/kernel/")
    # the first quick case of every (family, dtype) with grouped heads, and float16's other layouts
    seen: set[tuple] = set()
    picked = []
    for c in cases:
        key = (c.family, c.dtype, c.param["gqa"])
        if (c.param["gqa"] == "gqa4" or c.dtype == "float16") and key not in seen:
            seen.add(key)
            picked.append(c)
    with registered(subject):
        results = [run_case(c, RunContext(keep_for_pairwise=False)) for c in picked]
    assert {r.case.dtype for r in results} == {"float32", "bfloat16", "float16", "float64"}
    bad = {r.case.id for r in results if r.status != PASSED}
    expected = {r.case.id for r in results if r.case.dtype == "float16" and r.case.param["gqa"] == "gqa4"}
    assert expected, "the quick matrix has no float16 x gqa4 case"
    assert all(1 < r.info["Hkv"] < r.info["Hq"] for r in results if r.case.id in expected)
    assert {r.case.family for r in results if r.case.id in expected} == {"attn", "kernel"}
    assert bad == expected, (sorted(bad - expected), sorted(expected - bad))
    failing = [r for r in results if r.case.id in expected]
    assert all({"out", "dq"} <= {c.name for c in r.failed_checks} for r in failing), [
        r.message for r in failing
    ]


# ----------------------------------------------------------------------------- (c) Ulysses


@pytest.mark.slow
def test_ulysses_replicated_kv_heads_with_a_wrong_merge_fail_the_multiproc_tier():
    features = FEATURES | {Feature.ulysses_cp}
    # a module-level class is picklable: the ranks rebuild the backend from it
    subjects = [
        dataclasses.replace(subject_for(n, cls, features=features), backend_factory=cls)
        for n, cls in (("uly_avg", UlyssesAveragedReplicas), ("uly_exact", ExactBackend))
    ]
    with registered(*subjects):
        cases = build_cases(
            tiers=["multiproc"],
            backends=["uly_avg", "uly_exact"],
            pattern="ulysses_ulysses_ and not module_",
        )
        results = [r for w in (2, 4) for r in run_cp_cases([c for c in cases if c.param["world"] == w])]
    assert {r.case.param["world"] for r in results} == {2, 4}
    replicated = [r for r in results if r.info.get("kv_replicas", 1) > 1]
    divisible = [r for r in results if r.info.get("kv_replicas") == 1]
    assert {r.case.backend for r in replicated} == {"uly_avg", "uly_exact"}, [r.info for r in results]
    assert {r.case.backend for r in divisible} == {"uly_avg", "uly_exact"}, [r.info for r in results]
    for r in results:
        if r.case.backend == "uly_exact" or r in divisible:
            assert r.status == PASSED, (r.case.id, r.message)
        else:
            names = {c.name for c in r.failed_checks}
            assert r.status == FAILED and {"dk", "dv", "cp_vs_single.dk"} <= names, (r.case.id, names)
            assert "out" not in names and "dq" not in names  # the forward and dq are right


def rope_without_upcast(module: torch.nn.Module) -> torch.nn.Module:
    """Module hook: RoPE rotates in the input dtype (``full_precision`` dropped)."""
    rope = getattr(module, "rope", None)
    if rope is not None:
        rope.full_precision = False
    return module


ROPE = "(bfloat16 or float16) and (cpu/module/{n}/rope_ or cpu/module/{n}/fused_rope or normalized_rope)"


def test_rope_without_the_float32_upcast_fails_only_the_rope_rounded_check():
    bad = subject_for("rope16", ExactBackend, features=FEATURES, module_hook=rope_without_upcast)
    results = _run(bad, ROPE.format(n="rope16"))
    assert {r.case.dtype for r in results} == {"bfloat16", "float16"} and len(results) >= 4
    assert all(r.status == FAILED for r in results), [(r.case.id, r.message) for r in results]
    names = _failed(results)
    assert names and names <= {"rope.q.rounded_fp32", "rope.k.rounded_fp32", "rope.rounded_fp32"}, names
    assert any("fused_rope" in r.case.id for r in results)  # the in-place fused rotation too
    good = _run(subject_for("rope32", ExactBackend, features=FEATURES), ROPE.format(n="rope32"))
    assert all(r.status == PASSED for r in good), [r.message for r in good]
    for r in good:  # float32 then one rounding: the correctly rounded rotation but for rare near-ties
        assert all(c.err <= 0.05 * c.baseline_err for c in r.checks if c.name.startswith("rope")), r.case.id
