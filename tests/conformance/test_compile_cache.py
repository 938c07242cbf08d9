"""``--compile-cache DIR``: every compiler cache the GPU tier fills points into DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conformance.compile_stats import CACHE_VARIABLES

REPO = Path(__file__).resolve().parents[2]


def test_compile_cache_points_every_cache_into_one_folder(tmp_path: Path) -> None:
    code = (
        "import json, os, sys; from conformance.compile_stats import use_compile_cache; "
        "v = use_compile_cache(sys.argv[1]); print(json.dumps([v, {k: os.environ[k] for k in v}]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cc")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    values, seen = json.loads(p.stdout)
    assert values == seen and set(values) == set(CACHE_VARIABLES)
    root = (tmp_path / "cc").resolve()
    assert values["TORCHINDUCTOR_CACHE_DIR"] == str(root)
    assert values["TRITON_CACHE_DIR"] == str(root / "triton")
    assert values["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert values["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(root / "cute")
    assert (root / "triton").is_dir() and (root / "cute").is_dir()
