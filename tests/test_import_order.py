"""Each module imports on its own in a fresh interpreter, first thing (no import cycle).

A cycle such as ``olmo_attn.cp.ring`` -> ``olmo_attn.backends.base`` -> ... -> ``olmo_attn.cp.ring``
only shows when the cycle's member is the very first module imported, so every case runs in a new
subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "olmo_attn.cp.ring",
    "olmo_attn.cp.ulysses",
    "olmo_attn.cp",
    "olmo_attn.backends.base",
    "olmo_attn.backends.registry",
    "olmo_attn.backends.capabilities",
    "olmo_attn.backends.torch_backend",
    "olmo_attn.config",
]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    code = f"import {module} as m; print(m.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"`import {module}` failed in a fresh interpreter:\n{proc.stderr}"
    assert proc.stdout.strip() == module
