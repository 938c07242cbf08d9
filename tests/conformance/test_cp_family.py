"""The context-parallel family: cases batched into one launch keep their own verdicts; a wrong
backend fails under CP too (multi-process, gloo)."""

from __future__ import annotations

import dataclasses

import pytest
from conformance_fakes import ExactBackend, WrongScale, subject_for

from conformance.cases import build_cases
from conformance.families import run_cp_cases
from conformance.subjects import registered
from olmo_attn.backends.capabilities import Feature

FEATURES = frozenset(Feature) - {Feature.kv_cache, Feature.kv_cache_leftpad, Feature.deterministic}


class RefusesCP(ExactBackend):
    """Raises when context parallelism is applied (every rank alike)."""

    def apply_cp(self, cp_mesh, ring=None, uly=None):
        raise RuntimeError("this backend refuses context parallelism")


def _subject(name: str, cls: type) -> object:
    # a module-level class is picklable: the ranks rebuild the backend from it
    return dataclasses.replace(subject_for(name, cls, features=FEATURES), backend_factory=cls)


@pytest.mark.slow
def test_batched_cases_keep_their_own_verdicts():
    subjects = [
        _subject("exact", ExactBackend),
        _subject("wrong_scale", WrongScale),
        _subject("refuses", RefusesCP),
    ]
    with registered(*subjects):
        cases = build_cases(
            tiers=["multiproc"],
            backends=["exact", "wrong_scale", "refuses"],
            pattern="ring_zig_zag_causal/float32/w2 or ulysses_ulysses_documents/float32/w2",
        )
        assert len(cases) == 6
        results = {r.case.id: r for r in run_cp_cases(cases)}
    for rid, r in results.items():
        if "/exact/" in rid:
            assert r.status == "passed", r.message
        elif "/wrong_scale/" in rid:
            assert r.status == "failed" and "out" in {c.name for c in r.failed_checks}, r.message
            assert "cp_vs_single.out" not in {c.name for c in r.failed_checks}  # wrong alike on one process
        else:
            assert r.status == "failed" and "refuses context parallelism" in r.message


def test_unpicklable_registered_backend_is_skipped_with_the_reason():
    with registered(subject_for("closure", ExactBackend, features=FEATURES)):
        cases = build_cases(
            tiers=["multiproc"], backends=["closure"], pattern="ring_zig_zag_causal/float32/w2"
        )
        (r,) = run_cp_cases(cases)
    assert r.status == "skipped" and "cannot be pickled" in r.message
