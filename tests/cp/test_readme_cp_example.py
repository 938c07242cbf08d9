"""The README's context-parallel script runs as written: ``torchrun`` on two CPU processes (gloo).

It shards a batch with each load balancer (zig-zag, llama3, Ulysses), with packed documents and
without, runs forward and backward on every rank's shard, gathers the output and the input
gradient, and asserts they equal one process running the whole sequence; here we also check that
all six combinations reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_readme import cp_example_source  # tests/ is not a package: found through sys.path

COMBINATIONS = [(s, d) for s in ("zig_zag", "llama3", "ulysses") for d in ("documents", "plain")]


@pytest.mark.slow
def test_readme_cp_example_on_two_gloo_ranks(tmp_path: Path):
    script = tmp_path / "cp_example.py"
    script.write_text(cp_example_source(), encoding="utf-8")
    repo = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # the CPU path (gloo) on every machine, as the README says it runs
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"the README's CP example failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    lines = [ln.split() for ln in proc.stdout.splitlines() if "max|cp - single|" in ln]
    assert sorted((ln[0], ln[1]) for ln in lines) == sorted(COMBINATIONS), proc.stdout
