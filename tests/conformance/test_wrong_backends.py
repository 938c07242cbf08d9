"""Proof that a "pass" means something: deliberately wrong backends must fail, with the failing check named.

Each wrong backend is registered through the harness's registry hook
(:func:`conformance.subjects.registered`) and run on a small slice of its case matrix. A correct
backend wrapping the float64 reference passes the same slices, so the failures come from the bugs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conformance_fakes import (
    ExactBackend,
    WrongDocuments,
    WrongGQA,
    WrongLSE,
    WrongScale,
    WrongWindow,
    gate_wrong_axis,
    subject_for,
    swap_rope_halves,
)

from conformance.cases import build_cases
from conformance.families import run_case
from conformance.results import FAILED, PASSED, RunContext
from conformance.subjects import Subject, registered
from olmo_attn.backends.capabilities import Feature

# the fakes implement the kernel, the module path and dropout, not the KV cache or CP
FEATURES = frozenset(Feature) - {
    Feature.kv_cache,
    Feature.kv_cache_leftpad,
    Feature.ring_cp,
    Feature.ulysses_cp,
    Feature.deterministic,
}


def _run(subject: Subject, pattern: str, *, one_per_variant: bool = True) -> list[Any]:
    with registered(subject):
        cases = build_cases(tiers=["cpu"], backends=[subject.name], quick=True, pattern=pattern)
        assert cases, f"no cases match {pattern!r}"
        if one_per_variant:  # keep the test fast: the first point of every (family, variant)
            seen: set[tuple[str, str]] = set()
            cases = [
                c for c in cases if (c.family, c.variant) not in seen and not seen.add((c.family, c.variant))
            ]
        return [run_case(c, RunContext(keep_for_pairwise=False)) for c in cases]


def _failed_checks(results: list[Any]) -> set[str]:
    return {c.name for r in results for c in r.failed_checks}


@pytest.mark.slow
def test_exact_backend_passes_its_matrix_slice():
    subject = subject_for("exact", ExactBackend, features=FEATURES)
    results = _run(subject, "cpu/attn or cpu/kernel or cpu/packed or cpu/dropout", one_per_variant=True)
    assert len({(r.case.family, r.case.variant) for r in results}) >= 15
    bad = [f"{r.case.id}: {r.message}" for r in results if r.status != PASSED]
    assert not bad, bad
    module_results = _run(subject, "gate_headwise or rope_default or qk_norm_rms or fused/ or normalized/")
    bad = [f"{r.case.id}: {r.message}" for r in module_results if r.status != PASSED]
    assert not bad, bad


def test_window_off_by_one_fails_the_window_edge_check():
    results = _run(
        subject_for("wrong_window", WrongWindow, features=FEATURES), "cpu/attn/wrong_window/window/"
    )
    assert any(r.status == FAILED for r in results)
    names = _failed_checks(results)
    assert "window_edge" in names, names
    msgs = " ".join(c.message for r in results for c in r.failed_checks if c.name == "window_edge")
    assert "just outside the left edge changed its output" in msgs, msgs


def test_missing_softmax_scale_fails_the_output_budget():
    results = _run(
        subject_for("wrong_scale", WrongScale, features=FEATURES), "cpu/attn/wrong_scale/causal and mha"
    )
    assert all(r.status == FAILED for r in results)
    names = _failed_checks(results)
    assert {"out", "dq"} <= names, names
    assert "max|out-ref|" in results[0].message


def test_leaked_document_boundary_fails_isolation():
    results = _run(
        subject_for("wrong_documents", WrongDocuments, features=FEATURES),
        "cpu/attn/wrong_documents/documents/",
    )
    assert all(r.status == FAILED for r in results)
    names = _failed_checks(results)
    assert "document_isolation" in names and "out" in names, names
    assert any("changed other documents'" in c.message for r in results for c in r.failed_checks)


def test_wrong_gqa_grouping_fails_only_grouped_cases():
    results = _run(
        subject_for("wrong_gqa", WrongGQA, features=FEATURES),
        "cpu/attn/wrong_gqa/causal",
        one_per_variant=False,
    )
    grouped = [r for r in results if r.case.param["gqa"] == "gqa4"]
    ungrouped = [r for r in results if r.case.param["gqa"] in ("mha", "mqa")]  # MQA: one kv head, same result
    assert grouped and all(r.status == FAILED for r in grouped)
    assert "out" in _failed_checks(grouped)
    assert ungrouped and all(r.status == PASSED for r in ungrouped), [r.message for r in ungrouped]


@pytest.mark.slow
def test_lse_off_by_a_constant_fails_the_lse_check():
    results = _run(subject_for("wrong_lse", WrongLSE, features=FEATURES), "cpu/kernel/wrong_lse/")
    assert results and all(r.status == FAILED for r in results)
    assert _failed_checks(results) == {"lse", "lse.mean"} or "lse" in _failed_checks(results)
    assert "out" not in _failed_checks(results)  # the outputs are right: only the LSE check catches it
    attn = _run(subject_for("wrong_lse", WrongLSE, features=FEATURES), "cpu/attn/wrong_lse/causal")
    assert all(r.status == PASSED for r in attn)


def test_gate_on_the_wrong_axis_fails_module_cases():
    subject = subject_for("wrong_gate", ExactBackend, features=FEATURES, module_hook=gate_wrong_axis)
    results = _run(subject, "cpu/module/wrong_gate/gate_")
    assert results and all(r.status == FAILED for r in results)
    names = _failed_checks(results)
    assert "out" in names and "dx" in names, names
    plain = _run(subject, "cpu/module/wrong_gate/plain/")
    assert all(r.status == PASSED for r in plain)


def test_rope_halves_swapped_fails_rope_cases():
    subject = subject_for("wrong_rope", ExactBackend, features=FEATURES, module_hook=swap_rope_halves)
    results = _run(subject, "cpu/module/wrong_rope/rope_default or cpu/module/wrong_rope/rope_complex")
    assert results and all(r.status == FAILED for r in results)
    assert "out" in _failed_checks(results)


class NoisyBackward(ExactBackend):
    """Claims determinism, but its backward adds a last-bit random perturbation."""

    def kernel(self):
        kern = super().kernel()
        backward = kern.backward

        def noisy(*args: Any) -> tuple[torch.Tensor, ...]:
            grads = backward(*args)
            return tuple(g + g.abs().max() * 1e-3 * torch.rand_like(g) for g in grads)

        kern.backward = noisy  # type: ignore[method-assign]
        return kern


def test_nondeterministic_backward_fails_the_determinism_check():
    subject = subject_for("noisy", NoisyBackward, features=FEATURES | {Feature.deterministic})
    results = _run(subject, "cpu/kernel/noisy/causal")
    assert results and "determinism" in _failed_checks(results)
    assert any("two runs of the same case differ" in c.message for r in results for c in r.failed_checks)


class UnwrittenRows(ExactBackend):
    """Allocates its output with ``torch.empty`` and never writes the rows without visible keys."""

    def kernel(self):
        kern = super().kernel()
        forward = kern.forward

        def leaky(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            out, lse = forward(q, k, v, call)
            buf = torch.empty_like(out)
            rows = torch.isfinite(lse.transpose(-1, -2) if lse.dim() == 2 else lse.transpose(1, 2))
            buf[rows] = out[rows]
            return buf, lse

        kern.forward = leaky  # type: ignore[method-assign]
        return kern


def test_unwritten_output_rows_fail_under_poison():
    results = _run(
        subject_for("unwritten", UnwrittenRows, features=FEATURES), "cpu/kernel/unwritten/varlen_qk"
    )
    assert results and all(r.status == FAILED for r in results)
    assert "poison" in _failed_checks(results)


class InPlaceScale(ExactBackend):
    """Scales q in place (a classic fused-kernel shortcut that corrupts the caller's tensor)."""

    def _attend(self, q, k, v, docs, dropout_p):
        with torch.no_grad():
            q.data.mul_(1.0)
            k.data.add_(0.0)
            v.data[..., :1].mul_(0.5)
        return super()._attend(q, k, v, docs, dropout_p)


def test_modifying_inputs_fails():
    results = _run(subject_for("inplace", InPlaceScale, features=FEATURES), "cpu/attn/inplace/causal/float32")
    assert results and "inputs_unchanged" in _failed_checks(results)


def test_registered_subjects_do_not_leak():
    subject = subject_for("temporary", ExactBackend)
    with registered(subject):
        assert any(c.backend == "temporary" for c in build_cases(tiers=["config"]))
    assert not any(c.backend == "temporary" for c in build_cases(tiers=["config"]))
    with (
        pytest.raises(ValueError, match="capability-table backend"),
        registered(dataclasses.replace(subject, name="torch")),
    ):
        pass
