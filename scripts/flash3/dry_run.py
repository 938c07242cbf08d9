"""Print which objects FA3's ``hopper/setup.py`` would compile under the current environment.

Runs the part of ``setup.py`` that turns the ``FLASH_ATTENTION_DISABLE_*`` variables into the
source list (no torch, no CUDA needed), checks that every listed file exists, and prints the list.
Use it on the CPU machine with the variables ``scripts/flash3/build.sh`` exports:

    python3 scripts/flash3/dry_run.py HOPPER_DIR [--expect N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

START = "    feature_args = ("
END = '    sources += ["flash_prepare_scheduler.cu"]'


def sources(hopper: Path) -> list[str]:
    """The ``sources`` list ``hopper/setup.py`` builds for this environment."""
    text = (hopper / "setup.py").read_text()
    head, _, rest = text.partition("if not SKIP_CUDA_BUILD:")
    flags = "\n".join(ln for ln in head.splitlines() if ln.startswith(("DISABLE_", "ENABLE_")))
    a, b = rest.find(START), rest.find(END)
    if a < 0 or b < 0:
        raise ValueError(f"{hopper}/setup.py: source-list section not found (unexpected version)")
    body = rest[a : b + len(END)]
    body = "\n".join(ln[4:] if ln.startswith("    ") else ln for ln in body.splitlines())
    # the stable-ABI choice needs torch's version; the device's torch (2.11) takes flash_api_stable.cpp
    body = body.replace("torch_version = parse(torch.__version__)", "torch_version = parse('2.11.0')")
    ns: dict = {"os": os}
    exec("import itertools\nfrom packaging.version import parse\n" + flags + "\n" + body, ns)
    return list(ns["sources"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hopper", type=Path)
    ap.add_argument("--expect", type=int, default=None, help="fail unless this many objects")
    a = ap.parse_args(argv)
    src = sources(a.hopper)
    missing = [s for s in src if not (a.hopper / s).is_file()]
    for s in src:
        print(f"  compile {s}{'   (MISSING)' if s in missing else ''}")
    print(f"{len(src)} objects")
    bad = bool(missing) or (a.expect is not None and a.expect != len(src))
    if a.expect is not None and a.expect != len(src):
        print(f"PROBLEM: expected {a.expect} objects", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
