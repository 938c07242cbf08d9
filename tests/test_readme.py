"""Every code block of the README runs (Python) or is a valid command (shell), as written.

* ``python`` blocks are executed in a fresh namespace, in order; where a block says ``"cuda"`` and
  this machine has no GPU, ``"cpu"`` is used instead. The context-parallel script (the block that
  starts with ``# cp_example.py``) needs several processes: ``tests/cp/test_readme_cp_example.py``
  runs it under ``torchrun``.
* ``bash`` blocks: every command is checked without running it (running ``./scripts/test.sh`` from
  the test suite would recurse): scripts exist and parse (``bash -n``), ``olmo-attn`` /
  ``./scripts/run.sh`` arguments parse with the CLI's own parser, ``pip install`` arguments are
  valid requirements whose extras exist in ``pyproject.toml``, ``torchrun`` runs a script the README
  defines. A command of another form fails the test: add a rule here when the README gains one.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CP_EXAMPLE_MARK = "# cp_example.py"

_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def readme_blocks(lang: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return [body for tag, body in _BLOCK.findall(README.read_text(encoding="utf-8")) if tag == lang]


def cp_example_source() -> str:
    """The README's context-parallel script (shared with tests/cp/test_readme_cp_example.py)."""
    found = [b for b in readme_blocks("python") if b.startswith(CP_EXAMPLE_MARK)]
    assert len(found) == 1, f"the README must have exactly one python block starting with {CP_EXAMPLE_MARK!r}"
    return found[0]


def _on_this_device(code: str) -> str:
    return code if torch.cuda.is_available() else code.replace('"cuda"', '"cpu"')


def _single_process_blocks() -> list[str]:
    return [b for b in readme_blocks("python") if not b.startswith(CP_EXAMPLE_MARK)]


def test_readme_has_its_examples():
    python = readme_blocks("python")
    assert any("AttentionConfig(" in b for b in python), "README lost its usage example"
    cp_example_source()
    assert readme_blocks("bash"), "README lost its two commands"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_single_process_blocks())))
def test_readme_python_block_runs(index: int):
    code = _single_process_blocks()[index]
    scope: dict = {"__name__": "__readme__"}
    exec(compile(_on_this_device(code), f"{README}:python-block-{index}", "exec"), scope)
    if "attn" in scope and "y" in scope:  # the usage example: forward and backward really happened
        assert tuple(scope["y"].shape) == (2, 2048, 1024)
        assert all(p.grad is not None for p in scope["attn"].parameters())


# ---------------------------------------------------------------------------------------------- shell


def _commands() -> list[str]:
    """Every command of every bash block (comments dropped, ``&&`` chains split)."""
    out: list[str] = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def _check_script(path: str) -> None:
    script = ROOT / path
    assert script.is_file(), f"README runs {path}, which does not exist"
    assert script.stat().st_mode & 0o111, f"README runs {path}, which is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def _check_cli(args: list[str]) -> None:
    from olmo_attn.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit as e:  # argparse exits on bad arguments
        raise AssertionError(f"olmo-attn {' '.join(args)}: the CLI rejects these arguments") from e


def _check_pip_install(args: list[str]) -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert args[:2] == ["pip", "install"], args
    for arg in args[2:]:
        if arg.startswith("-"):
            assert arg in {"-e", "--no-build-isolation", "--no-deps"}, (
                f"pip install {arg}: not a documented option"
            )
            continue
        local = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg)
        if local:
            unknown = set((local.group(1) or "").split(",")) - extras - {""}
            assert not unknown, f"pip install {arg}: no extra {sorted(unknown)} in pyproject.toml"
        else:
            Requirement(arg)  # raises on an invalid requirement string


def _check_torchrun(args: list[str]) -> None:
    script = next(a for a in args[1:] if a.endswith(".py"))
    defined = script == "cp_example.py" and cp_example_source().startswith(f"{CP_EXAMPLE_MARK}:")
    assert defined or (ROOT / script).is_file(), f"torchrun {script}: neither in the repo nor a README script"


@pytest.mark.parametrize("command", _commands())
def test_readme_shell_command_is_valid(command: str):
    args = shlex.split(command)
    head = args[0]
    if head in ("./scripts/run.sh", "./scripts/test.sh") or head.startswith(("scripts/", "benchmarks/")):
        _check_script(head.removeprefix("./"))
        if head == "./scripts/run.sh":
            _check_cli(["conformance", *args[1:]])
    elif head == "olmo-attn":
        _check_cli(args[1:])
    elif args[:3] == ["python", "-m", "conformance"]:
        _check_cli(["conformance", *args[3:]])
    elif head == "pip":
        _check_pip_install(args)
    elif head == "torchrun":
        _check_torchrun(args)
    else:
        raise AssertionError(f"README command of an unchecked form: {command!r} (add a rule to {__file__})")
