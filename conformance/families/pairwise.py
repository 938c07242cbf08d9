"""``pairwise``: every two backends that ran the same problem must agree with each other.

Transformer Engine's practice: a complement to, never a replacement for, the
reference. Bound: ``max|a − b| ≤ k · max|low − ref| + atol`` — two backends may differ from each
other by at most what one of them may differ from the reference. A pairwise case's id is
``<tier>/pairwise/<a>~<b>/<family>/<variant>/...``; both backends see the same inputs because a
case's seed depends on its problem, not on its backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..checks import CheckResult, ok
from ..results import FAILED, SKIPPED, CaseResult, RunContext, SkipCase, Stored, summarize_checks
from ..tolerances import pairwise_budget, ref_scale

if TYPE_CHECKING:
    from ..cases import Case

# not dropout: each kernel draws its own keep mask (torch: counter-based, flash_2: Philox), so two
# backends never compute the same function there; each is judged against the reference with its own
PAIRWISE_FAMILIES = ("attn", "kernel", "packed", "module")


def pairwise_case(a: Case, b: Case) -> Case:
    """The pairwise case of two cases with the same ``problem_key``."""
    return replace(
        a,
        family="pairwise",
        backend=f"{a.backend}~{b.backend}",
        variant=f"{a.family}/{a.variant}",
        features=("pairwise",),
        skip_reason=None,
    )


def member_cases(case: Case) -> tuple[Case, Case]:
    """The two cases a pairwise case compares."""
    family, variant = case.variant.split("/", 1)
    a_name, b_name = case.backend.split("~")
    base = replace(case, family=family, variant=variant, features=())
    return replace(base, backend=a_name), replace(base, backend=b_name)


def pairwise_cases(cases: Sequence[Case]) -> list[Case]:
    """One pairwise case per two runnable cases (different backends) of the same problem."""
    groups: dict[str, list[Case]] = {}
    for c in cases:
        if c.family in PAIRWISE_FAMILIES and c.skip_reason is None:
            groups.setdefault(c.problem_key, []).append(c)
    out = []
    for members in groups.values():
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                out.append(pairwise_case(members[i], members[j]))
    return out


def judge_pair(case: Case, sa: Stored, sb: Stored) -> CaseResult:
    a_name, b_name = case.backend.split("~")
    checks: list[CheckResult] = []
    # gradients share one atol scale, as in each backend's own judgement (checks.judge_softmax)
    grad_scale = max((ref_scale(r) for n, r in sa.refs.items() if n.startswith("d")), default=0.0)
    for name, ref in sa.refs.items():
        if name not in sa.outs or name not in sb.outs:
            continue
        scale = grad_scale if name.startswith("d") else None
        v = pairwise_budget(
            f"pairwise.{name}", sa.outs[name], sb.outs[name], ref, sa.lows[name], sa.dtype, scale=scale
        )
        checks.append(
            CheckResult(
                v.name, v.passed, f"{a_name} vs {b_name}: {v.message}", v.err, v.baseline_err, v.threshold
            )
        )
    if not checks:
        checks.append(ok("pairwise", "no tensors in common"))
    status, message = summarize_checks(checks)
    return CaseResult(case, status, checks, message, 0.0)


def run_pairwise(case: Case, subject: Any, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    """Run (or reuse from ``ctx``) both members, then compare them."""
    from . import run_case

    stored = []
    for member in member_cases(case):
        hit = ctx.store.get(member.problem_key, {}).get(member.backend)
        if hit is None:
            res = run_case(member, ctx)
            if res.status == SKIPPED:
                raise SkipCase(f"{member.backend}: {res.message}")
            hit = ctx.store.get(member.problem_key, {}).get(member.backend)
            if hit is None:
                status = "failed" if res.status == FAILED else res.status
                raise RuntimeError(f"{member.id} {status} without producing tensors: {res.message}")
        stored.append(hit)
    result = judge_pair(case, stored[0], stored[1])
    return result.checks, {}


def pairwise_results(ctx: RunContext, cases_by_key: dict[str, dict[str, Case]]) -> list[CaseResult]:
    """Pairwise results for every problem two or more backends ran in this run (runner post-pass)."""
    results = []
    for key, stored in ctx.store.items():
        cases = cases_by_key.get(key, {})
        names = [n for n in stored if n in cases and cases[n].family in PAIRWISE_FAMILIES]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                a, b = cases_by_key[key][names[i]], cases_by_key[key][names[j]]
                results.append(judge_pair(pairwise_case(a, b), stored[names[i]], stored[names[j]]))
    return results
