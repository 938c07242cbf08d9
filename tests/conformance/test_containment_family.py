"""The containment family: a NaN / Inf planted in one document (batch row) must not reach the
others. A backend that attends document by document passes; one that lets the bad value spread
(``0 * NaN``), or that shifts the other documents' values, fails with a message naming the source and
exactly the rows it reached."""

from __future__ import annotations

import io
import itertools
import re

import pytest
import torch
from conformance_fakes import ExactBackend, subject_for

import reference.twins as twins
from conformance.cases import build_cases
from conformance.families.containment import _ranges, variants
from conformance.runner import run_cases
from conformance.subjects import registered
from olmo_attn.backends.capabilities import Feature
from olmo_attn.masks import DocSegments

F64 = torch.float64


class PerDocument(ExactBackend):
    """Correct and contained: every document attends on its own (the float64 twin per slice)."""

    def _attend(self, q, k, v, docs: DocSegments | None, dropout_p: float):
        if docs is None:
            return super()._attend(q, k, v, docs, dropout_p)
        B, T = q.shape[:2]
        qf, kf, vf = (t.reshape(1, B * T, *t.shape[2:]).to(F64) for t in (q, k, v))
        parts = []
        cu = docs.cu_q_host
        for a, b in itertools.pairwise(cu):
            if b > a:
                out, _ = twins.sdpa(qf[:, a:b], kf[:, a:b], vf[:, a:b], scale=self.softmax_scale, causal=True)
                parts.append(out)
        return torch.cat(parts, dim=1).reshape(q.shape).to(q.dtype)


class Spreads(PerDocument):
    """Every output row picks up ``0 * (sum(k) + sum(v))``: one NaN / Inf anywhere in K or V reaches
    every output row (the gradients of that term are exact zeros: they stay contained)."""

    def _attend(self, q, k, v, docs, dropout_p):
        out = super()._attend(q, k, v, docs, dropout_p)
        return out + 0.0 * (k.sum() + v.sum())


class Shifts(PerDocument):
    """Finite but wrong: the outputs move a little whenever the batch holds a non-finite value."""

    def _attend(self, q, k, v, docs, dropout_p):
        out = super()._attend(q, k, v, docs, dropout_p)
        bad = (~torch.isfinite(v)).any() | (~torch.isfinite(k)).any()
        return out + 1e-3 * bad.to(out.dtype)


def _run(cls: type, name: str, pattern: str = "containment"):
    subject = subject_for(name, cls, features=frozenset(Feature) - {Feature.deterministic})
    with registered(subject):
        cases = build_cases(tiers=["cpu"], backends=[name], pattern=pattern)
        report = run_cases(cases, progress=False, stream=io.StringIO())
    return {r.case.variant: r for r in report.results}


def _docs(info: dict) -> list[tuple[int, int]]:
    cu = info["cu_doc_lens"]
    return list(itertools.pairwise(cu))


def test_every_variant_is_generated_for_a_backend_with_documents():
    got = {c.variant for c in build_cases(tiers=["cpu"], backends=["torch"], pattern="containment")}
    assert got == {v for v, _ in variants()} and len(got) == 8
    assert all(c.family == "containment" for c in build_cases(tiers=["cpu"], pattern="containment"))


def test_a_contained_backend_passes_bit_identical():
    results = _run(PerDocument, "per_document")
    assert len(results) == 8
    for variant, r in results.items():
        assert r.status == "passed", (variant, r.message)
        assert {c.name for c in r.checks} == {f"containment.{n}" for n in ("out", "dq", "dk", "dv")}
        assert all("bit-identical" in c.message for c in r.checks), r.checks
        # the bad value did reach its own document / row (the plant is real)
        assert r.info["reached_own_group"]["out"] is True


def test_a_spreading_backend_fails_with_the_source_and_the_rows_reached():
    results = _run(Spreads, "spreads")
    for variant in ("documents_v_nan", "documents_k_inf", "batch_rows_v_inf"):
        r = results[variant]
        assert r.status == "failed", r.message
        failed = {c.name for c in r.failed_checks}
        assert failed == {"containment.out"}, (variant, failed)
        bad, value = r.info["poisoned_group"], r.info["value"]
        msg = next(c.message for c in r.failed_checks if c.name == "containment.out")
        unit = "document" if variant.startswith("documents") else "batch row"
        assert msg.startswith(f"containment.out: {value} in {unit} {bad} (token "), msg
        if unit == "document":
            # every other non-empty document is named, with exactly its packed rows
            others = [(g, a, b) for g, (a, b) in enumerate(_docs(r.info)) if g != bad and b > a]
            for g, a, b in others:
                assert f"document {g} outputs (rows {_ranges(list(range(a, b)))})" in msg, msg
            assert len(re.findall(r"document \d+ outputs", msg)) == len(others)
        else:
            T = r.info["T"]
            for g in range(r.info["B"]):
                named = f"batch row {g} outputs (positions 0-{T - 1})"
                assert (named in msg) == (g != bad), msg


def test_a_finite_shift_fails_as_changed_not_as_leaked():
    r = _run(Shifts, "shifts", pattern="containment and documents_v_nan")["documents_v_nan"]
    assert r.status == "failed"
    msg = next(c.message for c in r.failed_checks if c.name == "containment.out")
    assert " changed document " in msg and "max |diff| 1.0" in msg and "reached" not in msg, msg


def test_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert _ranges(list(range(0, 40, 2)), limit=3) == "0, 2, 4, ... (20 rows)"


@pytest.mark.parametrize("tensor", ["k", "v"])
def test_torch_backend_batch_rows_are_contained(tensor):
    """Independent rows of a dense batch never mix in the torch backend (documents are judged by
    the harness run; see conformance/README.md)."""
    results = _run_torch(f"containment and batch_rows_{tensor}")
    assert results and all(r.status == "passed" for r in results.values()), {
        v: r.message for v, r in results.items()
    }


def _run_torch(pattern: str):
    cases = build_cases(tiers=["cpu"], backends=["torch"], pattern=pattern)
    report = run_cases(cases, progress=False, stream=io.StringIO())
    return {r.case.variant: r for r in report.results}
