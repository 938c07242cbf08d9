"""Case execution: one function per family, dispatched by :func:`run_case`.

A family function takes ``(case, subject, ctx)`` and returns ``(checks, info)``. An exception
raised while a case runs fails the case with the exception's text and the innermost frames, and so
does an ``UnsupportedFeatureError`` for a feature the backend's table entry claims.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from olmo_attn.exceptions import CompileLimitWarning

from .. import compile_stats
from ..checks import CheckResult, fail
from ..results import FAILED, SKIPPED, CaseResult, RunContext, SkipCase, summarize_checks
from ..subjects import Subject, get_subject

if TYPE_CHECKING:  # cases.py imports no family: the matrix and the families stay apart
    from ..cases import Case

__all__ = ["FAMILIES", "SkipCase", "family_fn", "result_from", "run_case", "run_cp_cases"]

FamilyFn = Callable[["Case", Subject, RunContext], tuple[list[CheckResult], dict[str, Any]]]


FAMILIES: dict[str, tuple[str, str]] = {
    "config": ("config", "run_config"),
    "attn": ("softmax", "run_attn"),
    "kernel": ("softmax", "run_kernel"),
    "packed": ("softmax", "run_packed"),
    "dropout": ("softmax", "run_dropout"),
    "kvcache": ("kvcache", "run_kvcache"),
    "module": ("modules", "run_module"),
    "gdn": ("gdn", "run_gdn"),
    "cp": ("cp", "run_cp"),
    "containment": ("containment", "run_containment"),
    "pairwise": ("pairwise", "run_pairwise"),
}


def family_fn(family: str) -> FamilyFn:
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def _exception_text(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = "; ".join(f"{f.filename.rsplit('/', 2)[-2:][-1]}:{f.lineno} in {f.name}" for f in frames[-3:])
    return f"{type(e).__name__}: {e} (at {where})"


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """float32 means float32 while a case runs: no TF32 in matmuls or cuDNN convolutions (PyTorch
    enables TF32 convolutions by default; a float32 case judged with float32 budgets would otherwise
    measure the global flags). Restored on exit."""
    prev = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision = prev
        torch.set_float32_matmul_precision(precision)


def run_case(case: Case, ctx: RunContext | None = None, subject: Subject | None = None) -> CaseResult:
    """Run one case and judge it; never raises (harness bugs show up as failed cases)."""
    ctx = ctx or RunContext()
    t0 = time.perf_counter()
    if case.skip_reason is not None:
        return CaseResult(case, SKIPPED, [], case.skip_reason, 0.0)
    before = compile_stats.snapshot()
    try:
        if subject is None and case.family not in ("config", "pairwise", "gdn"):
            subject = get_subject(case.backend)
        fn = family_fn(case.family)
        with full_fp32(), warnings.catch_warnings():
            # a kernel that fell back from its compiled form mid-case is a failure, not a pass
            warnings.simplefilter("error", CompileLimitWarning)
            outcome: Any = fn(case, subject, ctx)  # type: ignore[arg-type]
    except Exception as e:
        outcome = e
    result = result_from(case, outcome, time.perf_counter() - t0)
    compiled = compile_stats.since(before)
    if compiled.frames or compiled.backwards:
        result.compile = compiled.as_dict()
    return result


def result_from(case: Case, outcome: Any, duration_s: float) -> CaseResult:
    """A :class:`CaseResult` from a family's ``(checks, info)`` or the exception it raised."""
    if isinstance(outcome, SkipCase):
        return CaseResult(case, SKIPPED, [], str(outcome), duration_s)
    if isinstance(outcome, BaseException):
        text = _exception_text(outcome)
        check = fail("exception", f"exception: {text}")
        return CaseResult(case, FAILED, [check], f"failed checks: exception — {text}", duration_s)
    checks, info = outcome
    if not checks:
        checks = [fail("harness", "the case produced no checks")]
    status, message = summarize_checks(checks)
    return CaseResult(case, status, checks, message, duration_s, info)


def run_cp_cases(cases: list[Case]) -> list[CaseResult]:
    """Context-parallel cases of one tier and world size in one launch of worker processes."""
    from .cp import run_cp_batch

    t0 = time.perf_counter()
    subjects = []
    for c in cases:
        try:
            subjects.append(get_subject(c.backend))
        except ValueError:
            subjects.append(None)
    with full_fp32():
        outcomes = run_cp_batch(cases, subjects)
    share = (time.perf_counter() - t0) / max(len(cases), 1)
    return [result_from(c, o, share) for c, o in zip(cases, outcomes)]
