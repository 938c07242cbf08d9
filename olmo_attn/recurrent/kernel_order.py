"""Which Gated DeltaNet chunk kernel ``backend="auto"`` runs: measured per GPU architecture.

``kernel_order.json`` holds, per architecture (``"sm_90"``), the chunk kernels in the order of
their measured speed for each pass and layout: ``infer_rows``, ``infer_documents`` (forward
without grad), ``train_rows``, ``train_documents`` (forward+backward), fastest first; and
``excluded``: kernels our correctness judgement failed on that architecture, with the reason
(never chosen there automatically, whatever their speed). A kernel runs only where its own guard
lets it (fla's refusal of its Hopper backward, our kernels' dtype / head-size limits), so the
order is walked until one can; our PyTorch kernel is the last resort everywhere. An architecture
without an entry (not measured in this project) gets :data:`DEFAULT_ORDER`: ours first.

The file is written from benchmark results, never by hand::

    python benchmarks/gdn_order.py benchmarks/results/<run>.json ...   # speed, correctness, conformance

(:func:`derive` is the rule: per pass and layout, kernels ordered by the geometric mean of their
median times over the shapes where every ranked kernel ran; a kernel that did not run at all for
that pass, e.g. refused by its guard, follows the measured ones.)
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ORDER", "KERNELS", "ORDER_FILE", "derive", "kernel_order", "load_orders", "write_order"]

ORDER_FILE = Path(__file__).with_name("kernel_order.json")
KERNELS = ("triton", "fla")  # GPU chunk kernels; our PyTorch kernel ("torch") follows them all
DEFAULT_ORDER = ("triton", "fla")
SLOTS = ("infer_rows", "infer_documents", "train_rows", "train_documents")
_SUBJECTS = {"ours:triton": "triton", "fla": "fla"}  # gdn_bench triton_speed subjects
_PASSES = {"fwd": "infer", "fwd+bwd": "train"}


@functools.cache
def load_orders(path: str | None = None) -> dict[str, Any]:
    """The parsed order file (cached; ``{}`` if it is missing)."""
    p = Path(path) if path else ORDER_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def kernel_order(arch: str | None, *, train: bool, documents: bool) -> tuple[str, ...]:
    """GPU chunk kernels for ``arch`` in measured order, the excluded ones dropped."""
    entry = load_orders().get(arch or "", {})
    slot = f"{'train' if train else 'infer'}_{'documents' if documents else 'rows'}"
    order = [k for k in entry.get(slot, DEFAULT_ORDER) if k in KERNELS]
    order += [k for k in DEFAULT_ORDER if k not in order]
    excluded = entry.get("excluded", {})
    return tuple(k for k in order if k not in excluded)


def _failures(result: dict[str, Any]) -> dict[str, str]:
    """Kernels with a failed correctness row (gdn_bench) or a failed gdn conformance case."""
    bad: dict[str, str] = {}
    for sec in ("triton_correctness", "correctness"):
        for row in result.get(sec, []) or []:
            name = _SUBJECTS.get(row.get("kernel", ""), row.get("kernel"))  # "ours:triton" -> "triton"
            if name in KERNELS and row.get("pass") is False:
                bad.setdefault(name, f"gdn_bench {sec}: case {row.get('case')} failed against float64")
    for case in result.get("results", []) or []:  # a conformance report
        name = case.get("backend")
        if case.get("family") == "gdn" and name in KERNELS and case.get("status") == "failed":
            bad.setdefault(name, f"conformance: {case.get('id')} failed: {str(case.get('message'))[:200]}")
    return bad


def derive(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One architecture's entry from gdn_bench / conformance JSON results of that architecture:
    per slot the kernels by the geometric mean of their median times over the shapes where all
    ranked kernels ran (later results replace earlier rows of the same subject, pass and shape),
    then the kernels that did not run for that pass; ``excluded`` from failed correctness."""
    times: dict[tuple[str, str, str], float] = {}  # (slot, shape, kernel) -> median ms
    excluded: dict[str, str] = {}
    for res in results:
        for row in res.get("triton_speed", []) or []:
            kern, pas = _SUBJECTS.get(row.get("subject", "")), _PASSES.get(row.get("pass", ""))
            if kern and pas and row.get("median_ms"):
                layout = "documents" if row.get("n_docs") else "rows"
                times[(f"{pas}_{layout}", row["shape"], kern)] = float(row["median_ms"])
        for k, why in _failures(res).items():
            excluded.setdefault(k, why)
    entry: dict[str, Any] = {}
    for slot in SLOTS:
        ran = {k for (s, _, k) in times if s == slot}
        shapes = {sh for (s, sh, _) in times if s == slot}
        common = [sh for sh in sorted(shapes) if all((slot, sh, k) in times for k in ran)]
        score = {
            k: math.exp(sum(math.log(times[(slot, sh, k)]) for sh in common) / len(common)) for k in ran
        } if common else {}  # fmt: skip
        order = sorted(score, key=score.get)
        order += [k for k in DEFAULT_ORDER if k not in order]
        entry[slot] = order
        entry[f"_{slot}_ms"] = {k: round(v, 4) for k, v in sorted(score.items(), key=lambda kv: kv[1])}
        entry[f"_{slot}_shapes"] = common
    entry["excluded"] = excluded
    return entry


def write_order(arch: str, entry: dict[str, Any], *, source: str, path: str | Path | None = None) -> Path:
    """Replace ``arch``'s entry of the order file (other architectures kept); returns the path."""
    p = Path(path) if path else ORDER_FILE
    table = json.loads(p.read_text()) if p.exists() else {}
    table[arch] = {"_source": source, **entry}
    p.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    load_orders.cache_clear()
    return p
