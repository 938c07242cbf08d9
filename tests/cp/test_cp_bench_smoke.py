"""``benchmarks/cp_bench.py --smoke`` end to end on CPU / gloo (the GPU run uses the same code)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_cp_bench_smoke(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import cp_bench
    finally:
        sys.path.remove(str(BENCH))
    sys.path.append(str(BENCH))  # the ranks import cp_bench by name
    out = tmp_path / "cp.json"
    code = cp_bench.main(["--smoke", "--launch", "2", "--tokens", "32", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert {r["strategy"] for r in res["throughput"]} == {"zig_zag", "llama3", "ulysses"}
    assert all(c["passed"] for c in res["correctness"]) and len(res["correctness"]) == 6
    assert all(r["fwd_bwd_ms"] > 0 and r["pct_ideal_fwd_bwd"] > 0 for r in res["throughput"])
    assert "% ideal fwd+bwd" in capsys.readouterr().out
