"""``benchmarks/triton_regs.py``: every Gated DeltaNet Triton kernel compiles for sm_90 on a
machine without a GPU (the separate prep kernels too), with its register, spill and
shared-memory figures read back from the cubin."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_every_kernel_compiles_for_hopper_with_its_resources():
    cmd = [sys.executable, "benchmarks/triton_regs.py", "--json", "--seq-len", "64", "--heads", "2"]
    cmd += ["--fused", "prep=0", "--tile", "wy_key_tile=64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    names = {row["kernel"] for row in rows}
    assert {
        "l2norm_fwd",
        "kkt",
        "solve",
        "wu",
        "state",
        "out",
        "dv_local",
        "dstate",
        "dqkwg",
        "wy_bwd",
    } <= names
    for row in rows:
        assert 0 < row["regs"] <= 255 and row["programs_per_sm"] >= 1, row
        assert row["constexprs"].get("BT", 64) == 64
    assert next(r for r in rows if r["kernel"] == "wy_bwd")["constexprs"]["BKT"] == 64  # --tile reached it
