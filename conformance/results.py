"""Case results and the state shared by the cases of one run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .checks import CheckResult

if TYPE_CHECKING:  # the case matrix imports nothing from here; keep it that way
    from .cases import Case

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class SkipCase(Exception):
    """Raised by a family when a case cannot run here for a reason found only at run time (an
    optional module of the library that has not landed, a package that imports but lacks a kernel)."""


@dataclass
class CaseResult:
    """What happened to one case: ``status`` is passed / failed / skipped; ``message`` names every
    failing check (or gives the skip reason, or the exception a backend raised)."""

    case: Case
    status: str
    checks: list[CheckResult] = field(default_factory=list)
    message: str = ""
    duration_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    compile: dict[str, Any] | None = None  # CompileDelta.as_dict(): torch.compile work in this case

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def worst_budget_ratio(self) -> float | None:
        """The largest ``err / threshold`` among this case's budget checks (None: no budget checks)."""
        ratios = [c.budget_ratio for c in self.checks if c.budget_ratio is not None]
        return max(ratios) if ratios else None

    def as_dict(self) -> dict[str, Any]:
        worst = self.worst_budget_ratio
        return {
            "id": self.case.id,
            "tier": self.case.tier,
            "family": self.case.family,
            "backend": self.case.backend,
            "variant": self.case.variant,
            "dtype": self.case.dtype,
            "params": {k: v for k, v in self.case.params},
            "features": list(self.case.features),
            "seed": self.case.seed,
            "base_seed": self.case.base_seed,
            "size": self.case.size,
            "status": self.status,
            "message": self.message,
            "duration_s": round(self.duration_s, 4),
            "worst_budget_ratio": worst if worst is None or math.isfinite(worst) else str(worst),
            "info": self.info,
            "compile": self.compile,
            "checks": [c.as_dict() for c in self.checks],
        }


def summarize_checks(checks: list[CheckResult]) -> tuple[str, str]:
    """``(status, message)`` from a case's checks: failed iff any check failed."""
    bad = [c for c in checks if not c.passed]
    if bad:
        names = ", ".join(dict.fromkeys(c.name for c in bad))
        details = " | ".join(c.message or c.name for c in bad[:6])
        more = f" | (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        return FAILED, f"failed checks: {names} — {details}{more}"
    return PASSED, f"{len(checks)} checks passed"


@dataclass
class Stored:
    """A backend's tensors for one problem, kept for the pairwise comparison."""

    outs: dict[str, torch.Tensor]
    refs: dict[str, torch.Tensor]
    lows: dict[str, torch.Tensor]
    dtype: torch.dtype


@dataclass
class RunContext:
    """State shared by the cases of one run (pairwise store)."""

    keep_for_pairwise: bool = True
    store: dict[str, dict[str, Stored]] = field(default_factory=dict)

    def remember(self, case: Case, stored: Stored) -> None:
        if self.keep_for_pairwise:
            self.store.setdefault(case.problem_key, {})[case.backend] = stored
