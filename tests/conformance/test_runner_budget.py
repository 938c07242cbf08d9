"""Runs that must fit a time limit: the time budget and the JSON checkpoints."""

from __future__ import annotations

import io

from conformance.cases import build_cases
from conformance.results import PASSED, SKIPPED
from conformance.runner import run_cases


def _cases():
    return build_cases(tiers=["config", "cpu"], backends=["torch"], quick=True, seed=0, pattern="kernel")[:6]


def test_time_budget_skips_the_cases_it_cannot_start():
    cases = _cases()
    report = run_cases(cases, stream=io.StringIO(), progress=False, time_budget_s=0.0)
    assert len(report.results) >= len(cases)
    skipped = [r for r in report.results if r.status == SKIPPED]
    assert len(skipped) == len(cases)
    assert all("time budget of 0 s" in r.message for r in skipped)
    assert report.exit_code == 3  # nothing ran: not verified


def test_checkpoints_hold_the_finished_cases():
    cases = _cases()
    seen: list[int] = []
    report = run_cases(
        cases,
        stream=io.StringIO(),
        progress=False,
        checkpoint=lambda partial: seen.append(len(partial.results)),
        checkpoint_every_s=0.0,
    )
    assert seen == list(range(1, len(cases) + 1))
    assert [r.status for r in report.results[: len(cases)]] == [PASSED] * len(cases)
