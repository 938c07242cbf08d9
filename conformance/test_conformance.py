"""The conformance cases as pytest tests: ``pytest conformance`` (parallel with ``-n auto``).

The cases are the same objects ``olmo-attn conformance`` runs (:func:`conformance.cases.build_cases`),
parametrised by their stable ids, plus one pairwise case per two backends that run the same problem.
A skipped case is a pytest skip with the exact reason; a failed case fails with the names and numbers
of its failing checks. Tiers default to the cheap ones (config, cpu, multiproc) plus the GPU tiers
where CUDA is available.
"""

from __future__ import annotations

import os

import pytest
import torch

from conformance.cases import build_cases
from conformance.families import run_case
from conformance.families.pairwise import pairwise_cases
from conformance.results import FAILED, SKIPPED, RunContext
from conformance.runner import parse_tiers


def _option(config, name: str, env: str):
    value = config.getoption(name, default=None) if config is not None else None
    return value if value is not None else os.environ.get(env)


def _cases(config) -> list:
    tier = _option(config, "--conformance-tier", "OLMO_ATTN_CONFORMANCE_TIER")
    if tier is None:
        tiers = ["config", "cpu", "multiproc"]
        if torch.cuda.is_available():
            tiers += ["gpu", "multigpu"]
    else:
        tiers = parse_tiers(tier)
    full = _option(config, "--conformance-full", "OLMO_ATTN_CONFORMANCE_FULL")
    backends = _option(config, "--conformance-backends", "OLMO_ATTN_CONFORMANCE_BACKENDS")
    seed = _option(config, "--conformance-seed", "OLMO_ATTN_CONFORMANCE_SEED")
    cases = build_cases(
        tiers=tiers,
        backends=[b for b in str(backends).split(",") if b] if backends else None,
        quick=full not in (True, "1", "true", "yes"),
        seed=int(seed) if seed is not None else 0,
    )
    return cases + pairwise_cases(cases)


_CTX = RunContext()  # this process's tensors, so a pairwise case reuses the two runs it compares


def _marks(case) -> list:
    # with ``--dist loadgroup`` a problem's cases and its pairwise cases share a worker (and its _CTX)
    marks = [pytest.mark.xdist_group(case.problem_key if case.family != "pairwise" else _member_key(case))]
    if case.tier in ("gpu", "multigpu"):
        marks.append(pytest.mark.gpu)
    if case.tier == "multigpu":
        marks.append(pytest.mark.multigpu)
    if case.tier in ("multiproc", "multigpu"):
        marks.append(pytest.mark.slow)
    return marks


def pytest_generate_tests(metafunc):
    if "conformance_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        _CTX.keep_for_pairwise = any(c.family == "pairwise" for c in cases)  # else keep no tensors
        metafunc.parametrize(
            "conformance_case",
            [pytest.param(c, id=c.id, marks=_marks(c)) for c in cases],
        )


def _member_key(case) -> str:
    from conformance.families.pairwise import member_cases

    return member_cases(case)[0].problem_key


def test_case(conformance_case) -> None:
    result = run_case(conformance_case, _CTX)
    if result.status == SKIPPED:
        pytest.skip(result.message)
    if result.status == FAILED:
        details = "\n".join(f"{c.name}: {c.message}" for c in result.failed_checks)
        pytest.fail(
            f"{conformance_case.id}: {result.message}\n{details}\nshape: {result.info}", pytrace=False
        )
