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
    cmd += ["--fused", "prep=0", "--tile", "wy_key_tile=64", "--sass"]
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
    for row in rows:  # SASS counts: every kernel has instructions, the recurrences' products tensor-core ops
        assert row["sass"]["total"] > 0 and set(row["sass"]) >= {"BAR", "SHFL", "LDL", "STL"}, row
    assert (
        next(r for r in rows if r["kernel"] == "state")["sass"]["HGMMA"]
        + next(r for r in rows if r["kernel"] == "state")["sass"]["HMMA"]
        > 0
    )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_prep_variants_compile_for_hopper():
    # W/U from T read back in the prep, or the prep for A and T only followed by _wu
    for mode, names in ((1, {"prep"}), (2, {"prep", "wu"})):
        cmd = [sys.executable, "benchmarks/triton_regs.py", "--json", "--seq-len", "64", "--heads", "2"]
        r = subprocess.run(
            [*cmd, "--tile", f"prep_wu={mode}"], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
        rows = json.loads(r.stdout)
        assert names <= {row["kernel"] for row in rows}
        assert next(row for row in rows if row["kernel"] == "prep")["constexprs"]["WU"] == mode
