"""The README's usage example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_usage_example_runs():
    text = README.read_text()
    code = re.search(r"```python\n(import torch\nfrom olmo_attn import AttentionConfig.*?)```", text, re.S)
    assert code is not None, "README lost its usage example"
    scope: dict = {}
    exec(compile(code.group(1), str(README), "exec"), scope)
    assert tuple(scope["y"].shape) == (2, 2048, 1024)
    assert all(p.grad is not None for p in scope["attn"].parameters())
