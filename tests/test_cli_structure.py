"""The production package does not import the harness; the harness owns its command; the case
matrix and the family modules import each other in one direction only.

``olmo-attn`` is a thin entry point: ``import olmo_attn``, ``import olmo_attn.cli`` and
``olmo-attn --version`` leave ``conformance`` unloaded; ``olmo-attn conformance`` / ``info`` hand
their arguments to ``conformance.cli``. Every harness module imports first in a fresh interpreter,
and ``conformance.cases`` loads no family module (it is the families that read the matrix).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def _loaded(code: str) -> list[str]:
    probe = (
        code
        + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'conformance')))"
    )
    proc = _fresh(probe)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_its_cli_leaves_the_harness_out():
    assert _loaded("import olmo_attn; import olmo_attn.cli") == []


def test_version_and_help_do_not_import_the_harness():
    code = (
        "import contextlib, io, olmo_attn.cli as cli\n"
        "for argv in (['--version'], ['--help'], []):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)"
    )
    assert _loaded(code) == []


def test_the_conformance_subcommand_imports_the_harness_when_it_runs():
    loaded = _loaded(
        "import contextlib, io, olmo_attn.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['conformance', '--tier', 'config', '--list', '-k', 'library']) == 0"
    )
    assert "conformance.cli" in loaded and "conformance.cases" in loaded


def test_olmo_attn_conformance_and_python_m_conformance_are_one_command(capsys):
    from conformance.cli import main as harness_main
    from olmo_attn.cli import main

    argv = ["--tier", "config,cpu", "--list", "-k", "torch and causal"]
    assert main(["conformance", *argv]) == 0
    via_olmo = capsys.readouterr().out
    assert harness_main(argv) == 0
    assert capsys.readouterr().out == via_olmo and "cpu/attn/torch/causal" in via_olmo
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == via_olmo


def test_usage_errors_and_help_keep_their_exit_codes_and_names(capsys):
    from olmo_attn.cli import main

    assert main([]) == 2
    assert "conformance" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["no_such_command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["conformance", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: olmo-attn conformance") and "--time-budget" in text
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2
    assert "olmo-attn info" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m conformance")


def test_the_full_parser_validates_every_subcommands_options():
    from olmo_attn.cli import build_parser

    args = build_parser().parse_args(["conformance", "--tier", "gpu", "--full", "--json", "r.json"])
    assert (args.command, args.tier, args.quick, args.json) == ("conformance", ["gpu"], False, "r.json")
    assert build_parser().parse_args(["info", "--json"]).json is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["conformance", "--no-such-option"])


def _harness_modules() -> list[str]:
    out = []
    for p in sorted((ROOT / "conformance").rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] in ("__main__", "conftest") or parts[-1].startswith("test_"):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


@pytest.mark.parametrize("module", _harness_modules())
def test_every_harness_module_imports_first_in_a_fresh_interpreter(module: str):
    proc = _fresh(f"import {module} as m; print(m.__name__)")
    assert proc.returncode == 0, f"`import {module}` failed in a fresh interpreter:\n{proc.stderr}"


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, function-level imports included (relative ones resolved)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def test_the_case_matrix_imports_no_family_and_results_only_types_cases():
    cases = _imports(ROOT / "conformance" / "cases.py", "conformance")
    assert not {m for m in cases if m.startswith("conformance.families")}, sorted(cases)
    loaded = _loaded("import conformance.cases")
    assert not [m for m in loaded if m.startswith("conformance.families")], loaded
    assert "conformance.cases" not in _loaded("import conformance.results")


def test_the_matrix_lists_exactly_the_containment_familys_variants():
    from conformance.cases import containment_variants
    from conformance.families.containment import variants

    assert containment_variants() == variants()


def test_gdn_availability_moved_without_changing_its_answer():
    from conformance.subjects import gdn_unavailable_reason

    assert gdn_unavailable_reason("torch", "cpu") is None
    assert "CUDA" in (gdn_unavailable_reason("triton", "cpu") or "")
