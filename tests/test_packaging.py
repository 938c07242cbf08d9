"""The package as a user installs it: a built wheel, in a fresh virtual environment.

The wheel is built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``), must
contain every data file of ``olmo_attn/`` (``backends/preference.json`` drives ``backend=None``,
``recurrent/kernel_order.json`` GatedDeltaNet's ``backend="auto"``; ``py.typed``), and, installed into a new environment that borrows only PyTorch and NumPy from this
one, must make the same automatic backend choice from the same measured preferences as the source
tree. Plus the metadata: one version (``olmo_attn.__version__`` = the distribution's), an SPDX
license, extras pip can install, and a clean build (no setuptools deprecation warning).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("olmo_attn", "reference", "conformance")

# Runs in both interpreters; prints what the automatic choice depends on, as JSON.
PROBE = r"""
import importlib.resources, json, sys, types
import olmo_attn
from olmo_attn.backends import registry

out = {
    "file": olmo_attn.__file__,
    "version": olmo_attn.__version__,
    "py_typed": importlib.resources.files("olmo_attn").joinpath("py.typed").is_file(),
    "preferences": registry.load_preferences(),
    "cpu_choice": {
        kind: registry.choose_backend(feats, device="cpu")
        for kind, feats in {"causal": ["causal"], "sliding_window": ["causal", "sliding_window"],
                            "documents": ["causal", "documents"]}.items()
    },
}
# the order a Hopper GPU would use (what backend=None picks there among available backends)
real = registry.info_for
registry.info_for = lambda device: types.SimpleNamespace(arch="sm_90")
out["sm_90_order"] = {
    kind: registry.preference_order(None, feats)
    for kind, feats in {"causal": [], "sliding_window": ["sliding_window"], "documents": ["documents"]}.items()
}
registry.info_for = real
from olmo_attn.recurrent import kernel_order
out["gdn_sm_90_order"] = {
    f"{pas}_{lay}": kernel_order.kernel_order("sm_90", train=pas == "train", documents=lay == "documents")
    for pas in ("infer", "train") for lay in ("rows", "documents")
}
try:
    import importlib.metadata as md
    out["dist_version"] = md.version("olmo-attn")
except Exception as e:
    out["dist_version"] = repr(e)
print(json.dumps(out, sort_keys=True))
"""


def _copy_sources(dst: Path) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _data_files(pkg: str) -> set[str]:
    """Non-Python files of a package in the source tree, as wheel paths."""
    base = ROOT / pkg
    return {
        f"{pkg}/{p.relative_to(base).as_posix()}"
        for p in base.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }


def _probe(python: str, cwd: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    _copy_sources(src)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",  # shows setuptools' own warnings
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(out.glob("olmo_attn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], proc.stdout + proc.stderr


@pytest.mark.slow
def test_wheel_contains_every_data_file(built_wheel):
    wheel, log = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _data_files("olmo_attn") | {
        "olmo_attn/backends/preference.json",
        "olmo_attn/recurrent/kernel_order.json",
        "olmo_attn/py.typed",
    }
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    for pkg in PACKAGES:  # every module of the three packages
        modules = {f"{pkg}/{p.relative_to(ROOT / pkg).as_posix()}" for p in (ROOT / pkg).rglob("*.py")}
        assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    # setuptools' warnings about the project's own metadata (e.g. a license table) show under -v
    bad = [ln for ln in log.splitlines() if "BuildBackendWarning" in ln or "DeprecationWarning" in ln]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_installed_wheel_chooses_like_the_source_tree(built_wheel, tmp_path: Path):
    import torch

    wheel, _ = built_wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # borrow PyTorch and NumPy (and nothing of this checkout) from the running interpreter; a .pth
    # entry is appended after the venv's own site-packages, so the installed wheel wins
    (site / "borrowed_torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OLMO_ATTN_ALLOW_UNVERIFIED")}
    installed = _probe(str(py), tmp_path, env)
    source = _probe(sys.executable, ROOT, {**env, "PYTHONPATH": str(ROOT)})

    assert Path(installed["file"]).resolve().is_relative_to(venv.resolve()), installed["file"]
    assert Path(source["file"]).resolve().is_relative_to(ROOT), source["file"]
    assert installed["preferences"], "the installed package found no preference.json"
    assert installed["gdn_sm_90_order"]["train_rows"][0] == "triton", installed["gdn_sm_90_order"]
    for key in ("preferences", "cpu_choice", "sm_90_order", "gdn_sm_90_order", "version", "py_typed"):
        assert installed[key] == source[key], (key, installed[key], source[key])
    assert installed["dist_version"] == installed["version"]
    assert installed["py_typed"] is True
    assert (venv / "bin" / "olmo-attn").is_file(), "the wheel installs no olmo-attn command"
    version = subprocess.run(
        [str(venv / "bin" / "olmo-attn"), "--version"], capture_output=True, text=True, env=env, timeout=120
    )
    assert version.returncode == 0 and version.stdout.strip() == f"olmo-attn {source['version']}", version


def test_one_version_and_valid_metadata():
    tomllib = pytest.importorskip("tomllib")
    import olmo_attn
    from olmo_attn._version import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], (
        "the version is written in pyproject.toml"
    )
    assert olmo_attn.__version__ == __version__
    assert isinstance(project["license"], str), "license must be an SPDX expression string"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{__version__}]" in changelog, "CHANGELOG.md has no entry for the current version"


def test_extras_are_installable_as_written():
    """No extra whose requirements need --no-build-isolation (pip install .[x] would fail)."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needs_torch_to_build = (
        "flash-attn>",
        "flash-attn=",
        "flash_attn",
        "ring-flash-attn",
        "transformer-engine",
        "transformer_engine",
    )
    for name, reqs in extras.items():
        for req in reqs:
            assert not req.replace(" ", "").startswith(needs_torch_to_build), (
                f"extra {name!r} requires {req!r}, which compiles against torch and fails under pip's build "
                "isolation; document the --no-build-isolation command in the README instead"
            )
    assert "matplotlib>=3.7" in extras["plot"]


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout with scripts/env.sh and pyproject.toml, and a .venv whose python records pip calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "env.sh", tmp_path / "scripts" / "env.sh")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "pip_calls.log"
    fake = bin_dir / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> {calls}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return tmp_path, calls


def _source_env(checkout: Path, extras: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OLMO_ATTN_EXTRAS": extras, "PYTHON": sys.executable, "OLMO_ATTN_FORCE_VENV": "1"}
    return subprocess.run(
        ["bash", "-c", 'source scripts/env.sh && echo "VENV_PY=$VENV_PY"'],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_setup_installs_once_per_pyproject_and_extras(tmp_path: Path):
    """scripts/env.sh: the first call installs, later calls with the same pyproject.toml and no new
    extras install nothing and print nothing; a new extra or a changed pyproject.toml reinstalls."""
    checkout, calls = _fake_checkout(tmp_path)

    def pip_calls() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    first = _source_env(checkout, "dev")
    assert pip_calls() == ["-m pip install --disable-pip-version-check -e .[dev]"]
    assert "setting up" in first.stderr and f"VENV_PY={checkout}/.venv/bin/python" in first.stdout
    again = _source_env(checkout, "dev")
    assert len(pip_calls()) == 1 and again.stderr == "", again.stderr  # quiet, nothing installed
    _source_env(checkout, "peer")  # a new extra: installed together with the ones already there
    assert pip_calls()[-1].endswith("-e .[dev,peer]")
    for extras in ("", "dev", "peer,dev"):  # subsets of what is installed
        assert _source_env(checkout, extras).stderr == ""
    assert len(pip_calls()) == 2
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    _source_env(checkout, "")
    assert len(pip_calls()) == 3, "a changed pyproject.toml must reinstall"
