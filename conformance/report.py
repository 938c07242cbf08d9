"""Report writers: JSON (trends), JUnit XML (CI), Markdown (people).

All three carry the fingerprint, the counts, the backend × feature matrix and every case; JUnit has
one ``<testsuite>`` per tier and one ``<testcase>`` per case (``classname`` =
``conformance.<tier>.<family>.<backend>``, ``name`` = the case id), with ``<failure>`` /
``<skipped>`` elements that CI tools read.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from .cases import TIERS, Case
from .checks import CheckResult
from .hardware import BackendRow, Fingerprint, capability_rows, format_fingerprint, merge_fingerprints
from .results import FAILED, PASSED, SKIPPED, CaseResult
from .runner import RunReport, build_matrix, row_label

SCHEMA = "olmo-attn-conformance/1"


def _num(x: float | None) -> float | str | None:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def report_dict(report: RunReport) -> dict[str, Any]:
    """The JSON document (also what :func:`write_json` writes)."""
    rows, cols, cells = build_matrix(report.results)
    return {
        "schema": SCHEMA,
        "started": _iso(report.started),
        "duration_s": round(report.duration_s, 3),
        "options": report.options,
        "provenance": report.provenance,
        "fingerprint": report.fingerprint.as_dict(),
        "counts": report.counts(),
        "exit_code": report.exit_code,
        "verdict": report.verdict()[1],
        "per_backend": [
            {
                "backend": v.backend,
                "verified": v.verified,
                "ran": v.ran,
                "failed": v.failed,
                "skipped": v.skipped,
                "skip_reasons": dict(v.skip_reasons),
            }
            for v in report.backend_summary()
        ],
        "matrix": {
            "rows": rows,
            "row_labels": {r: row_label(r, report.results, report.fingerprint.arch) for r in rows},
            "columns": cols,
            "cells": {
                r: {
                    c: {
                        "status": cell.status,
                        "worst_budget_ratio": _num(cell.worst),
                        "cases": cell.n,
                        "reason": cell.reason,
                    }
                    for (rr, c), cell in cells.items()
                    if rr == r
                }
                for r in rows
            },
        },
        "results": [r.as_dict() for r in report.results],
    }


def _write(path: str | os.PathLike, text: str) -> Path:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def write_json(report: RunReport, path: str | os.PathLike) -> Path:
    return _write(path, json.dumps(report_dict(report), indent=1, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------ JUnit


def _checks_text(r: CaseResult) -> str:
    lines = [r.message, ""]
    for c in r.checks:
        mark = "ok  " if c.passed else "FAIL"
        nums = ""
        if c.err is not None and c.threshold is not None:
            nums = f" err={c.err:.3e} threshold={c.threshold:.3e}"
            if c.baseline_err is not None:
                nums += f" baseline={c.baseline_err:.3e}"
        lines.append(f"{mark} {c.name}{nums}{(' — ' + c.message) if (c.message and not c.passed) else ''}")
    if r.info:
        lines.append("")
        lines.append("shape: " + json.dumps(r.info, default=str))
    return "\n".join(lines)


def junit_tree(report: RunReport) -> ET.ElementTree:
    root = ET.Element("testsuites", name="olmo-attn conformance")
    by_tier: dict[str, list[CaseResult]] = {}
    for r in report.results:
        by_tier.setdefault(r.case.tier, []).append(r)
    totals = Counter()
    fp = report.fingerprint
    for tier in [t for t in TIERS if t in by_tier]:
        rs = by_tier[tier]
        c = Counter(r.status for r in rs)
        totals.update(c)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"olmo-attn.conformance.{tier}",
            tests=str(len(rs)),
            failures=str(c[FAILED]),
            errors="0",
            skipped=str(c[SKIPPED]),
            time=f"{sum(r.duration_s for r in rs):.3f}",
            timestamp=_iso(report.started),
            hostname=os.uname().nodename if hasattr(os, "uname") else "",
        )
        props = ET.SubElement(suite, "properties")
        for k, v in (
            ("device", f"{fp.device} {fp.device_name} ({fp.arch})"),
            ("driver", fp.driver or "n/a"),
            ("cuda", fp.cuda or "n/a"),
            ("torch", fp.torch),
            ("python", fp.python),
            *((f"provenance.{k}", "" if v is None else v) for k, v in report.provenance.items()),
            *((f"backend.{b.name}", b.version or f"unavailable: {b.reason}") for b in fp.backends),
        ):
            ET.SubElement(props, "property", name=k, value=str(v))
        for r in rs:
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=f"conformance.{r.case.tier}.{r.case.family}.{r.case.backend}",
                name=r.case.id,
                time=f"{r.duration_s:.3f}",
            )
            if r.status == FAILED:
                names = ", ".join(dict.fromkeys(c.name for c in r.failed_checks)) or "exception"
                el = ET.SubElement(tc, "failure", message=r.message[:1000], type=names)
                el.text = _checks_text(r)
            elif r.status == SKIPPED:
                ET.SubElement(tc, "skipped", message=r.message[:1000])
            else:
                out = ET.SubElement(tc, "system-out")
                out.text = _checks_text(r)
    root.set("tests", str(len(report.results)))
    root.set("failures", str(totals[FAILED]))
    root.set("errors", "0")
    root.set("skipped", str(totals[SKIPPED]))
    root.set("time", f"{report.duration_s:.3f}")
    return ET.ElementTree(root)


def write_junit(report: RunReport, path: str | os.PathLike) -> Path:
    tree = junit_tree(report)
    ET.indent(tree, space=" ")
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tree.write(p, encoding="utf-8", xml_declaration=True)
    return p


# ------------------------------------------------------------------------------------------ Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def margin_points(report: RunReport) -> dict[str, list[float]]:
    """``"backend / family" -> [error / budget of each case that ran]`` (the strip plot's data)."""
    out: dict[str, list[float]] = {}
    for r in report.results:
        ratio = r.worst_budget_ratio
        if r.status == SKIPPED or ratio is None or not math.isfinite(ratio):
            continue
        out.setdefault(f"{r.case.backend} / {r.case.family}", []).append(float(ratio))
    return dict(sorted(out.items()))


def write_margin_plot(report: RunReport, path: str | os.PathLike) -> Path | None:
    """A strip plot of every case's error / budget, one row per backend / family, as a PNG at ``path``.

    Returns ``None`` (and writes nothing) when matplotlib is not installed (``pip install
    olmo-attn[plot]``) or no case has a budget check.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = margin_points(report)
    if not points:
        return None
    labels = list(points)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.2))
    for i, lb in enumerate(labels):
        xs = points[lb]
        jitter = [((k * 0.618) % 1.0 - 0.5) * 0.5 for k in range(len(xs))]  # deterministic spread
        ax.scatter(xs, [i + j for j in jitter], s=8, alpha=0.6)
    ax.axvline(1.0, color="red", linewidth=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("error / budget per case (log scale; > 1 fails)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown(report: RunReport, plot: str | None = None) -> str:
    """The Markdown report; ``plot``: the file name of the margin plot next to it (None: a note)."""
    fp = report.fingerprint
    counts = report.counts()
    rows, cols, cells = build_matrix(report.results)
    prov = report.provenance
    code, reasons = report.verdict()
    lines = [
        "# olmo-attn conformance report",
        "",
        f"- started: {_iso(report.started)}, duration {report.duration_s:.1f} s",
        f"- olmo-attn {prov.get('olmo_attn_version', 'unknown')}, commit "
        f"`{prov.get('git_commit') or 'not a git checkout'}`, seed {prov.get('seed')}",
        f"- command: `{prov.get('command', '')}`",
        f"- options: `{json.dumps(report.options)}`",
        f"- **{counts['total']} cases: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped** "
        f"(exit code {code}{': ' + _md_escape('; '.join(reasons)) if reasons else ''})",
        "",
        "## Per backend",
        "",
        *[f"- {v.backend}: {_md_escape(v.text())}" for v in report.backend_summary()],
        "",
        "## Environment",
        "",
        *[f"- {line}" for line in format_fingerprint(fp)],
        "",
        "| backend | version | status | verified | runs on | dtypes | head_dim | features |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in capability_rows(fp):
        lines.append("| " + " | ".join(_md_escape(str(row[k])) for k in row) + " |")
    lines += [
        "",
        "## Backend × feature",
        "",
        "Each cell: `pass`/`FAIL` with the worst error-to-budget ratio of its cases (≤ 1 passes), or the "
        "skip reason.",
        "",
        "| backend | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells_txt = []
        for c in cols:
            cell = cells.get((r, c))
            cells_txt.append(_md_escape(cell.text(60)) if cell else "")
        lines.append(
            f"| {_md_escape(row_label(r, report.results, report.fingerprint.arch))} | "
            + " | ".join(cells_txt)
            + " |"
        )
    failed = [r for r in report.results if r.status == FAILED]
    lines += ["", f"## Failures ({len(failed)})", ""]
    if not failed:
        lines.append("None.")
    for r in failed:
        lines.append(f"- `{r.case.id}`: {_md_escape(r.message[:600])}")
    skipped = Counter(r.message for r in report.results if r.status == SKIPPED)
    lines += ["", f"## Skipped ({sum(skipped.values())})", ""]
    for reason, n in skipped.most_common():
        lines.append(f"- {n} × {_md_escape(reason)}")
    ran = [r for r in report.results if r.status != SKIPPED and r.worst_budget_ratio is not None]
    ran.sort(key=lambda r: -(r.worst_budget_ratio or 0.0))
    lines += [
        "",
        "## Tightest cases (largest error-to-budget ratio)",
        "",
        "| case | worst ratio | check |",
        "|---|---|---|",
    ]
    for r in ran[:15]:
        worst = max((c for c in r.checks if c.budget_ratio is not None), key=lambda c: c.budget_ratio or 0.0)
        lines.append(f"| `{r.case.id}` | {r.worst_budget_ratio:.3f} | {worst.name} |")
    lines += ["", "## Margins (error / budget per case)", ""]
    if plot:
        lines.append(f"![error / budget per case, by backend and family]({plot})")
    else:
        lines.append(
            "No plot: install matplotlib (`pip install olmo-attn[plot]`) to get a strip plot of every "
            "case's error / budget per backend and family here."
        )
    return "\n".join(lines) + "\n"


def write_markdown(report: RunReport, path: str | os.PathLike) -> Path:
    """The Markdown report at ``path`` and, with matplotlib, ``<stem>-margins.png`` next to it."""
    p = Path(path)
    png = write_margin_plot(report, p.with_name(p.stem + "-margins.png"))
    return _write(path, markdown(report, png.name if png is not None else None))


# ------------------------------------------------------------------------------------------ reading back


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _result_from_dict(d: dict[str, Any]) -> CaseResult:
    case = Case(
        tier=d["tier"],
        family=d["family"],
        backend=d["backend"],
        variant=d["variant"],
        dtype=d["dtype"],
        params=tuple(d["params"].items()),
        features=tuple(d["features"]),
        size=d.get("size", "quick"),
        base_seed=d.get("base_seed", 0),
        skip_reason=d["message"] if d["status"] == SKIPPED else None,
    )
    checks = [
        CheckResult(
            c["name"],
            c["passed"],
            c["message"],
            _float(c["err"]),
            _float(c["baseline_err"]),
            _float(c["threshold"]),
        )
        for c in d["checks"]
    ]
    return CaseResult(
        case, d["status"], checks, d["message"], d["duration_s"], d.get("info", {}), d.get("compile")
    )


def _fingerprint_from_dict(d: dict[str, Any]) -> Fingerprint:
    d = dict(d)
    rows = [BackendRow(**{k: v for k, v in b.items() if k != "status"}) for b in d.pop("backends")]
    return Fingerprint(**d, backends=rows)


def load_json(path: str | os.PathLike) -> RunReport:
    """A :class:`RunReport` back from :func:`write_json`'s file (to merge runs, or re-render them)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise ValueError(
            f"{path}: not an olmo-attn conformance report (schema {doc.get('schema')!r}, want {SCHEMA!r})"
        )
    started = _dt.datetime.fromisoformat(doc["started"]).timestamp()
    return RunReport(
        [_result_from_dict(r) for r in doc["results"]],
        _fingerprint_from_dict(doc["fingerprint"]),
        doc.get("options", {}),
        started,
        float(doc["duration_s"]),
        doc.get("provenance", {}),
    )


def merge(reports: list[RunReport]) -> RunReport:
    """One report from several runs on the same machine (a run split to fit a time limit, or shards run
    side by side): results concatenated in tier order (a case id seen twice keeps its last result,
    except that a skip never replaces a result of a case that ran);
    the duration is the wall-clock time the runs covered (overlapping shards counted once)."""
    if not reports:
        raise ValueError("merge needs at least one report")
    names = {(r.fingerprint.device_name, r.fingerprint.arch) for r in reports}
    if len(names) > 1:
        raise ValueError(f"refusing to merge runs from different devices: {sorted(names)}")
    by_id: dict[str, CaseResult] = {}
    for rep_ in reports:
        for r in rep_.results:
            seen = by_id.get(r.case.id)
            if seen is not None and r.status == SKIPPED and seen.status != SKIPPED:
                continue  # a case that ran keeps its result over a later skip (e.g. a spent time budget)
            by_id.pop(r.case.id, None)
            by_id[r.case.id] = r
    rank = {t: i for i, t in enumerate(TIERS)}
    results = sorted(by_id.values(), key=lambda r: rank.get(r.case.tier, len(rank)))
    wall, end = 0.0, -math.inf
    for start, stop in sorted((r.started, r.started + r.duration_s) for r in reports):
        wall += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return RunReport(
        results,
        merge_fingerprints([r.fingerprint for r in reports]),
        {"merged": [r.options for r in reports], "busy_s": sum(r.duration_s for r in reports)},
        min(r.started for r in reports),
        wall,
        dict(reports[0].provenance, merged_commands=[r.provenance.get("command") for r in reports]),
    )
