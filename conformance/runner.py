"""Run a case list: progress bar, pairwise post-pass, the backend × feature matrix, the exit code.

Tiers run cheapest first (``config``, ``cpu``, ``multiproc``, ``gpu``, ``multigpu``). The terminal
shows a live progress bar (``rich`` when installed and the output is a terminal, plain lines
otherwise) and, at the end, the matrix: one row per backend, one column per feature, each cell
``pass``/``FAIL`` with the worst error-to-budget ratio of its cases, or ``skip: <reason>``; then a
per-backend verdict (verified / not verified, skip reasons grouped) and the five thinnest margins.

Exit codes (:attr:`RunReport.exit_code`): ``0`` cases ran, none failed, and everything named on the
command line (tiers, backends, ``-k``, ``--require``) was exercised; ``1`` a case failed; ``2`` a
usage error; ``3`` nothing, or not everything requested, was verified (also: any skip under
``--strict``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from .cases import LIBRARY_ROW, TIERS, Case, build_cases
from .families import run_case, run_cp_cases
from .families.pairwise import pairwise_results
from .hardware import NOT_VERIFIED, Fingerprint, fingerprint
from .provenance import run_provenance
from .results import FAILED, PASSED, SKIPPED, CaseResult, RunContext
from .subjects import all_subjects

FEATURE_ORDER = (
    "available",
    "table",
    "config",
    "causal",
    "non_causal",
    "gqa",
    "sliding_window",
    "documents",
    "documents_qk",
    "lse",
    "packed_qkv",
    "dropout",
    "kv_cache",
    "kv_cache_leftpad",
    "module",
    "gate",
    "rope",
    "qk_norm",
    "clip_qkv",
    "fused",
    "normalized",
    "gdn",
    "gdn_decode",
    "ring_cp",
    "ulysses_cp",
    "pairwise",
)


MAX_WIDTH = 120  # columns of the plain-text matrix

CP_BATCH = 8  # context-parallel cases per launch of worker processes


def _batchable(case: Case) -> bool:
    return case.family == "cp" and case.skip_reason is None


def _batch_key(case: Case) -> tuple:
    return (case.tier, case.param.get("world"))


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_VERIFIED = 0, 1, 2, 3


def default_tiers() -> list[str]:
    """``config``, ``cpu`` and ``multiproc`` everywhere; plus ``gpu`` and ``multigpu`` where CUDA is
    available."""
    tiers = ["config", "cpu", "multiproc"]
    if torch.cuda.is_available():
        tiers += ["gpu", "multigpu"]
    return tiers


def parse_tiers(spec: str | Sequence[str] | None) -> list[str]:
    """``"all"``, one tier, or a comma-separated list → tiers in cheapest-first order."""
    if spec is None:
        return default_tiers()
    items = [spec] if isinstance(spec, str) else list(spec)
    names: set[str] = set()
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                names |= set(TIERS)
            elif part in TIERS:
                names.add(part)
            else:
                raise ValueError(f"unknown tier {part!r}; choose among {', '.join(TIERS)}, all")
    return [t for t in TIERS if t in names]


# ------------------------------------------------------------------------------------------ progress


SLOW_CASE_S = 5.0  # plain progress names every case slower than this


class Progress:
    """A live progress bar (rich) or plain progress lines."""

    def __init__(self, total: int, stream: TextIO, use_rich: bool | None = None, quiet: bool = False):
        self.total = total
        self.stream = stream
        self.quiet = quiet
        self.done = 0
        self.failed = 0
        self._t0 = time.perf_counter()
        self._tier: str | None = None
        self._rich: Any = None
        if use_rich is None:
            use_rich = stream.isatty()
        if use_rich and not quiet:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress

                self._console = Console(file=stream)
                self._rich = RichProgress(
                    TextColumn("[bold]conformance"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[failed]} failed"),
                    TimeElapsedColumn(),
                    TextColumn("{task.description}"),
                    console=self._console,
                    transient=True,
                )
                self._task = self._rich.add_task("", total=total, failed=0)
                self._rich.start()
            except ImportError:
                self._rich = None

    def start_case(self, case: Case) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=case.id)
        elif not self.quiet and case.tier != self._tier:
            print(f"[{self.done}/{self.total}] tier {case.tier}", file=self.stream, flush=True)
        self._tier = case.tier

    def end_case(self, result: CaseResult) -> None:
        self.done += 1
        if result.status == FAILED:
            self.failed += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1, failed=self.failed)
            if result.status == FAILED:
                self._console.print(f"[red]FAIL[/red] {result.case.id}: {result.message}")
            return
        if self.quiet:
            return
        if result.status == FAILED:
            print(
                f"[{self.done}/{self.total}] FAIL {result.case.id}: {result.message}",
                file=self.stream,
                flush=True,
            )
        elif result.duration_s > SLOW_CASE_S:
            print(
                f"[{self.done}/{self.total}] {result.status} in {result.duration_s:.1f} s: {result.case.id}",
                file=self.stream,
                flush=True,
            )
        elif self.done == self.total or self.done % 25 == 0:
            print(
                f"[{self.done}/{self.total}] {self.failed} failed so far ({time.perf_counter() - self._t0:.0f} s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------------------------------ report


@dataclass
class RunReport:
    """Everything a run produced: results, fingerprint, options, timing."""

    results: list[CaseResult]
    fingerprint: Fingerprint
    options: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    duration_s: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.results)
        return {"total": len(self.results), PASSED: c[PASSED], FAILED: c[FAILED], SKIPPED: c[SKIPPED]}

    def verdict(self) -> tuple[int, list[str]]:
        """``(exit code, reasons)``: why the run is not a clean pass (empty when it is)."""
        return verdict(self.results, self.options)

    @property
    def exit_code(self) -> int:
        return self.verdict()[0]

    def backend_summary(self) -> list[BackendVerdict]:
        return backend_summary(self.results)

    def matrix(self) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
        return build_matrix(self.results)


@dataclass
class BackendVerdict:
    """One backend's outcome: cases that ran (outside the config tier), failed, and skip reasons."""

    backend: str
    ran: int = 0
    failed: int = 0
    skipped: int = 0
    config_only: int = 0  # config-tier cases that ran (they verify no numerics)
    skip_reasons: Counter = field(default_factory=Counter)

    @property
    def verified(self) -> bool:
        return self.ran > 0 and self.failed == 0

    def text(self) -> str:
        if self.failed:
            head = f"FAILED ({self.failed} of {self.ran} cases that ran failed)"
        elif self.ran:
            head = f"verified ({self.ran} cases passed)"
        else:
            head = "NOT verified (no numerical case ran)"
        if self.skipped:
            reasons = "; ".join(f"{n} x {r}" for r, n in self.skip_reasons.most_common(3))
            more = len(self.skip_reasons) - 3
            head += f"; {self.skipped} skipped: {reasons}" + (f"; +{more} other reasons" if more > 0 else "")
        return head


def backend_summary(results: Sequence[CaseResult]) -> list[BackendVerdict]:
    """Per backend (matrix row): what was verified and what was not, and why."""
    out: dict[str, BackendVerdict] = {}
    for r in results:
        for name in _row_names(r.case.backend):
            v = out.setdefault(name, BackendVerdict(name))
            if r.status == SKIPPED:
                v.skipped += 1
                v.skip_reasons[r.message] += 1
            elif r.case.family == "config":
                v.config_only += 1
                v.failed += r.status == FAILED
            else:
                v.ran += 1
                v.failed += r.status == FAILED
    order = {n: i for i, n in enumerate([s.name for s in all_subjects()] + [LIBRARY_ROW])}
    return sorted(out.values(), key=lambda v: order.get(v.backend, len(order)))


def verdict(results: Sequence[CaseResult], options: dict[str, Any]) -> tuple[int, list[str]]:
    """The exit code of a run and its reasons.

    ``options`` keys read: ``explicit_tiers`` / ``explicit_backends`` (what the user named, or None),
    ``pattern``, ``require`` (backends that must run and pass), ``strict`` (any skip fails).
    """
    reasons: list[str] = []
    failed = [r for r in results if r.status == FAILED]
    if failed:
        return EXIT_FAILED, [f"{len(failed)} case(s) failed"]
    ran = [r for r in results if r.status != SKIPPED]
    if not results:
        pat = options.get("pattern")
        reasons.append("no case was selected" + (f" (-k {pat!r} matched nothing)" if pat else ""))
    elif not ran:
        reasons.append(f"all {len(results)} selected cases were skipped")
    for tier in options.get("explicit_tiers") or []:
        if not any(r.case.tier == tier for r in ran):
            why = Counter(r.message for r in results if r.case.tier == tier).most_common(1)
            reasons.append(
                f"tier {tier!r} was requested but no case of it ran" + (f" ({why[0][0]})" if why else "")
            )
    by_backend = {v.backend: v for v in backend_summary(results)}
    named = list(
        dict.fromkeys(list(options.get("explicit_backends") or []) + list(options.get("require") or []))
    )
    for b in named:
        v = by_backend.get(b)
        config_only = set(options.get("tiers") or []) == {"config"}
        if v is None or not (v.ran or (config_only and v.config_only)):
            why = f" ({v.skip_reasons.most_common(1)[0][0]})" if v is not None and v.skip_reasons else ""
            reasons.append(f"backend {b!r} was requested but ran no case{why}")
    if options.get("interrupted"):
        unfinished = sum(r.message.startswith("interrupted:") for r in results if r.status == SKIPPED)
        reasons.append(
            f"the run was stopped by {options['interrupted']}; {unfinished} case(s) did not finish"
        )
    if options.get("strict"):
        skipped = [r for r in results if r.status == SKIPPED]
        if skipped:
            reasons.append(f"--strict: {len(skipped)} case(s) skipped")
    return (EXIT_NOT_VERIFIED if reasons else EXIT_OK), reasons


def thinnest(results: Sequence[CaseResult], n: int = 5) -> list[CaseResult]:
    """The ``n`` passing cases with the largest error / budget ratio (the thinnest margins)."""
    ranked = [r for r in results if r.status == PASSED and r.worst_budget_ratio is not None]
    ranked.sort(key=lambda r: -float(r.worst_budget_ratio or 0.0))
    return ranked[:n]


@dataclass
class Cell:
    status: str  # "pass" | "FAIL" | "skip"
    worst: float | None
    n: int
    reason: str = ""

    def text(self, width: int | None = None) -> str:
        if self.status == "skip":
            t = f"skip: {self.reason}"
        else:
            t = self.status + (
                f" {self.worst:.2f}" if self.worst is not None and self.worst != float("inf") else ""
            )
            if self.worst == float("inf"):
                t += " inf"
        if width is not None and len(t) > width:
            t = t[: width - 1] + "…"
        return t


def _row_names(backend: str) -> list[str]:
    return backend.split("~") if "~" in backend else [backend]


def build_matrix(results: Sequence[CaseResult]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """Rows (backends), columns (features) and cells of the backend × feature matrix."""
    buckets: dict[tuple[str, str], list[CaseResult]] = {}
    rows: list[str] = []
    cols: set[str] = set()
    for r in results:
        for row in _row_names(r.case.backend):
            if row not in rows:
                rows.append(row)
            for f in r.case.features:
                cols.add(f)
                buckets.setdefault((row, f), []).append(r)
    order = {n: i for i, n in enumerate([s.name for s in all_subjects()] + [LIBRARY_ROW])}
    rows.sort(key=lambda n: order.get(n, len(order)))
    columns = [f for f in FEATURE_ORDER if f in cols] + sorted(cols - set(FEATURE_ORDER))
    cells: dict[tuple[str, str], Cell] = {}
    for key, rs in buckets.items():
        ran = [r for r in rs if r.status != SKIPPED]
        ratios = [r.worst_budget_ratio for r in ran if r.worst_budget_ratio is not None]
        worst = max(ratios) if ratios else None
        if any(r.status == FAILED for r in ran):
            cells[key] = Cell("FAIL", worst, len(rs))
        elif ran:
            cells[key] = Cell("pass", worst, len(rs))
        else:
            reason = Counter(r.message for r in rs).most_common(1)[0][0]
            cells[key] = Cell("skip", None, len(rs), reason)
    return rows, columns, cells


def row_label(name: str, results: Sequence[CaseResult], arch: str | None = None) -> str:
    """Backend name, marked when the capability table does not list it as verified on the run's
    hardware ``arch`` (``"sm_90"``, ``"cpu"``; ``None``: on any)."""
    subj = {s.name: s for s in all_subjects()}.get(name)
    if name == LIBRARY_ROW or (subj is not None and subj.verified_for(arch)):
        return name  # (rows without a table entry, e.g. GDN's "fla", are unverified)
    ran = [
        r
        for r in results
        if name in _row_names(r.case.backend) and r.status != SKIPPED and r.case.family != "config"
    ]
    if not ran:
        return f"{name} ({NOT_VERIFIED})"
    return f"{name} (ran here; {NOT_VERIFIED} per the table)"


def print_summary(report: RunReport, stream: TextIO, use_rich: bool | None = None) -> None:
    """The backend × feature matrix and the counts."""
    rows, cols, cells = report.matrix()
    counts = report.counts()
    if use_rich is None:
        use_rich = stream.isatty()
    title = (
        f"{counts['total']} cases: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped "
        f"in {report.duration_s:.1f} s"
    )
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table

            console = Console(file=stream)
            table = Table(title="backend × feature (worst error/budget ratio; ≤ 1 passes)", show_lines=False)
            table.add_column("backend")
            for c in cols:
                table.add_column(c, overflow="fold")
            for r in rows:
                row = [row_label(r, report.results, report.fingerprint.arch)]
                for c in cols:
                    cell = cells.get((r, c))
                    if cell is None:
                        row.append("")
                    elif cell.status == "FAIL":
                        row.append(f"[red]{cell.text(28)}[/red]")
                    elif cell.status == "pass":
                        row.append(f"[green]{cell.text(28)}[/green]")
                    else:
                        row.append(f"[dim]{cell.text(28)}[/dim]")
                table.add_row(*row)
            console.print(table)
            console.print(("[red]" if counts[FAILED] else "[green]") + title)
            _print_failures(report, stream)
            _print_verdict(report, stream)
            return
        except ImportError:
            pass
    for line in matrix_lines(rows, cols, cells, report.results, report.fingerprint.arch):
        print(line, file=stream)
    print(title, file=stream)
    _print_failures(report, stream)
    _print_verdict(report, stream)


def _print_verdict(report: RunReport, stream: TextIO) -> None:
    """Per-backend verified / not verified (skip reasons grouped), thinnest margins, the exit code."""
    print("per backend:", file=stream)
    for v in report.backend_summary():
        print(f"  {v.backend}: {v.text()}", file=stream)
    thin = thinnest(report.results)
    if thin:
        print("thinnest margins (error / budget):", file=stream)
        for r in thin:
            print(f"  {float(r.worst_budget_ratio or 0.0):.3f}  {r.case.id}", file=stream)
    prov = report.provenance
    if prov:
        print(
            f"olmo-attn {prov.get('olmo_attn_version')} ({prov.get('git_commit') or 'not a git checkout'}), "
            f"seed {prov.get('seed')}: {prov.get('command')}",
            file=stream,
        )
    code, reasons = report.verdict()
    word = {EXIT_OK: "verified", EXIT_FAILED: "FAILED"}.get(code, "NOT VERIFIED")
    print(f"verdict: {word} (exit code {code})" + (": " + "; ".join(reasons) if reasons else ""), file=stream)


def _print_failures(report: RunReport, stream: TextIO) -> None:
    failed = [r for r in report.results if r.status == FAILED]
    for r in failed[:50]:
        print(f"FAILED {r.case.id}: {r.message}", file=stream)
    if len(failed) > 50:
        print(f"... and {len(failed) - 50} more failures (see the JSON / JUnit report)", file=stream)


def matrix_lines(
    rows: list[str],
    cols: list[str],
    cells: dict[tuple[str, str], Cell],
    results: Sequence[CaseResult],
    arch: str | None = None,
) -> list[str]:
    """The matrix as aligned plain-text lines, at most ``MAX_WIDTH`` columns wide: the feature
    columns are wrapped into several blocks (skip reasons shortened; full ones are in the reports)."""
    labels = [row_label(r, results, arch) for r in rows]
    w0 = min(max([len("backend")] + [len(lb) for lb in labels]), 40)
    widths = [max(len(c), 10) for c in cols]
    blocks: list[list[int]] = [[]]
    used = w0
    for i, w in enumerate(widths):
        if blocks[-1] and used + 3 + w > MAX_WIDTH:
            blocks.append([])
            used = w0
        blocks[-1].append(i)
        used += 3 + w
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        head = "backend".ljust(w0) + " | " + " | ".join(cols[i].ljust(widths[i]) for i in block)
        lines += [head, "-" * len(head)]
        for r, lb in zip(rows, labels):
            parts = []
            for i in block:
                cell = cells.get((r, cols[i]))
                parts.append((cell.text(widths[i]) if cell else "").ljust(widths[i]))
            label = lb if len(lb) <= w0 else lb[: w0 - 1] + "…"
            lines.append((label.ljust(w0) + " | " + " | ".join(parts)).rstrip())
    return lines


# ------------------------------------------------------------------------------------------ run


def run_cases(
    cases: Sequence[Case],
    *,
    stream: TextIO | None = None,
    progress: bool = True,
    use_rich: bool | None = None,
    options: dict[str, Any] | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    time_budget_s: float | None = None,
    checkpoint: Callable[[RunReport], None] | None = None,
    checkpoint_every_s: float = 30.0,
) -> RunReport:
    """Run ``cases`` in order (tiers cheapest first), then the pairwise comparisons.

    ``time_budget_s``: no case starts after this many seconds; the rest are reported as skipped
    with that reason (a run that must fit a time limit still ends with a complete report).
    ``checkpoint`` is called with the report so far at most every ``checkpoint_every_s`` seconds,
    so a run killed from outside leaves its finished cases behind.
    """
    stream = stream or sys.stdout
    prov = run_provenance(options)
    started = time.time()
    t0 = time.perf_counter()
    fp = fingerprint()
    ctx = RunContext()
    bar = Progress(len(cases), stream, use_rich=use_rich, quiet=not progress)
    results: list[CaseResult] = []
    by_key: dict[str, dict[str, Case]] = {}
    rank = {t: n for n, t in enumerate(TIERS)}
    # within a tier, context-parallel cases grouped by world size (so they batch), otherwise as given
    cases = sorted(
        cases, key=lambda c: (rank[c.tier], _batchable(c), c.param.get("world", 0) if _batchable(c) else 0)
    )
    last_checkpoint = time.perf_counter()
    try:
        i = 0
        while i < len(cases):
            case = cases[i]
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                reason = f"not started: the run's time budget of {time_budget_s:g} s was used up"
                for rest in cases[i:]:
                    res = CaseResult(rest, SKIPPED, [], reason, 0.0)
                    results.append(res)
                    bar.end_case(res)
                break
            bar.start_case(case)
            if _batchable(case):  # consecutive CP cases of one tier and world size share a launch
                j = i + 1
                while (
                    j < len(cases)
                    and j - i < CP_BATCH
                    and _batchable(cases[j])
                    and _batch_key(cases[j]) == _batch_key(case)
                ):
                    j += 1
                batch = run_cp_cases(list(cases[i:j]))
            else:
                j = i + 1
                batch = [run_case(case, ctx)]
            for res in batch:
                if res.status != SKIPPED:
                    by_key.setdefault(res.case.problem_key, {})[res.case.backend] = res.case
                results.append(res)
                bar.end_case(res)
                if on_result is not None:
                    on_result(res)
            i = j
            if checkpoint is not None and time.perf_counter() - last_checkpoint > checkpoint_every_s:
                checkpoint(
                    RunReport(list(results), fp, options or {}, started, time.perf_counter() - t0, prov)
                )
                last_checkpoint = time.perf_counter()
    finally:
        bar.close()
    results += pairwise_results(ctx, by_key)
    return RunReport(results, fp, options or {}, started, time.perf_counter() - t0, prov)


def run(
    *,
    tiers: Sequence[str] | str | None = None,
    backends: Sequence[str] | None = None,
    quick: bool = True,
    pattern: str | None = None,
    seed: int = 0,
    stream: TextIO | None = None,
    progress: bool = True,
    use_rich: bool | None = None,
) -> RunReport:
    """Build the case matrix and run it (what ``olmo-attn conformance`` does)."""
    tier_list = parse_tiers(tiers)
    cases = build_cases(tiers=tier_list, backends=backends, quick=quick, seed=seed, pattern=pattern)
    options = {
        "tiers": tier_list,
        "backends": list(backends) if backends else "all",
        "mode": "quick" if quick else "full",
        "pattern": pattern,
        "seed": seed,
    }
    return run_cases(cases, stream=stream, progress=progress, use_rich=use_rich, options=options)


__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_VERIFIED",
    "EXIT_OK",
    "EXIT_USAGE",
    "BackendVerdict",
    "Cell",
    "RunReport",
    "backend_summary",
    "build_matrix",
    "default_tiers",
    "parse_tiers",
    "print_summary",
    "run",
    "run_cases",
    "thinnest",
    "verdict",
]
