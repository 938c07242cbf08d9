"""``benchmarks/compile_bench.py --smoke``: runs on the CPU, counts one compiled frame across
document layouts and two (prefill + shared step) across decode steps, and matches eager; for
``GatedDeltaNet`` too, with its automatic kernel choice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compile_bench


def test_compile_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    cases = ["attention/documents", "attention/decode", "fused/causal", "gdn/documents", "gdn/decode"]
    assert compile_bench.main(["--smoke", "--out", str(out), "--cases", *cases]) == 0
    rows = {f"{r['module']}/{r['case']}": r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == set(cases)
    assert rows["attention/documents"]["frames"] == 1 and rows["attention/documents"]["layouts"] == 3
    assert rows["attention/decode"]["frames"] == 2
    assert rows["fused/causal"]["frames"] == 1
    assert rows["gdn/documents"]["frames"] == 1 and rows["gdn/decode"]["frames"] == 2  # backend=None
    for r in rows.values():
        assert r["max_abs_diff"] <= 1e-5 and r["eager_ms"] > 0 and r["compiled_ms"] > 0
