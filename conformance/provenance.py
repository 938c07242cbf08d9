"""Where a run's code came from: the olmo-attn version, the git commit (and whether the checkout had
uncommitted changes), and the command line. Every report and ``olmo-attn info`` carry these."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def olmo_attn_version() -> str:
    """``olmo_attn._version.__version__`` (``"unknown"`` when the package cannot be imported)."""
    try:
        from olmo_attn._version import __version__
    except Exception:  # a broken install still gets a report
        return "unknown"
    return str(__version__)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """``"<sha>"`` or ``"<sha>-dirty"`` when run from a git checkout of this project; ``None`` otherwise
    (an installed wheel)."""
    if not (REPO_ROOT / ".git").exists():
        return None
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if status else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``sys.argv`` when ``argv`` is None), shell-quoted."""
    args = list(sys.argv if argv is None else argv)
    if args and args[0].endswith(("__main__.py", "cli.py")):
        args[0] = "olmo-attn"
    return shlex.join(args)


def provenance(argv: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
    """``{"olmo_attn_version", "git_commit", "command", "seed"}``."""
    return {
        "olmo_attn_version": olmo_attn_version(),
        "git_commit": git_commit(),
        "command": command_line(argv),
        "seed": seed,
    }


def run_provenance(options: Mapping[str, Any] | None, seed: int | None = None) -> dict[str, Any]:
    """:func:`provenance` of a run: its ``seed`` (default ``options["seed"]``) and the command the user
    typed, as recorded in ``options["command"]``, where there is one."""
    opts = options or {}
    prov = provenance(seed=opts.get("seed") if seed is None else seed)
    if opts.get("command"):
        prov["command"] = opts["command"]
    return prov


__all__ = ["command_line", "git_commit", "olmo_attn_version", "provenance", "run_provenance"]
