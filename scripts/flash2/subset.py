"""Cut the flash-attn 2 source tree down to the head dims and features we test, before building.

A full flash-attn 2.8.3 build compiles 73 objects (6 head dims x fwd / fwd-causal / bwd /
bwd-causal / split-KV fwd / split-KV fwd-causal x fp16 / bf16, plus ``flash_api.cpp``); the
GPU conformance tier uses head dims 64, 128 and 256 in fp16 and bf16 only. This script edits an
unpacked sdist in place so that only those kernels build, and every other head dim fails with a
clear error instead of an undefined symbol:

* ``setup.py``: the kernel source list keeps ``flash_*_hdim{N}_*`` files for the kept ``N`` only;
  ``-DFLASHATTENTION_DISABLE_{ALIBI,SOFTCAP,UNEVEN_K}`` are added to both the nvcc and the C++
  flags (our adapter never passes ALiBi slopes or a softcap, and head dims 64/128/256 are their
  own rounded sizes; ``flash_api.cpp`` then refuses ALiBi, softcap and head dims that are not a
  multiple of 32 with a ``RuntimeError`` rather than running kernels that were compiled out).
  Dropout, local (sliding-window) attention, varlen and the split-KV kernels (used by
  ``flash_attn_with_kvcache``) stay.
* ``csrc/flash_attn/src/static_switch.h``: ``HEADDIM_SWITCH`` instantiates only the kept head dims;
  a call whose head dim rounds to another one raises ``RuntimeError`` naming the built ones.

    python3 scripts/flash2/subset.py --src flash_attn-2.8.3.post2 --hdims 64,128,256 --dry-run
    python3 scripts/flash2/subset.py --src flash_attn-2.8.3.post2 --hdims 64,128,256
    python3 scripts/flash2/subset.py --src flash_attn-2.8.3.post2 --count   # objects to build

Idempotent: running it twice leaves the same files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ALL_HDIMS = (32, 64, 96, 128, 192, 256)
DISABLE_FLAGS = (
    "FLASHATTENTION_DISABLE_ALIBI",
    "FLASHATTENTION_DISABLE_SOFTCAP",
    "FLASHATTENTION_DISABLE_UNEVEN_K",
)
KERNEL_KINDS = ("fwd", "fwd_split", "bwd")  # each x {"", "_causal"} x {fp16, bf16}
MARK = "// olmo-attn subset:"
PY_MARK = "# olmo-attn subset: features our adapter never uses"
_SOURCE_RE = re.compile(r'^\s*"csrc/flash_attn/src/flash_(?:fwd|bwd|fwd_split)_hdim(\d+)_\w+\.cu",\s*$')


def patch_setup(text: str, hdims: tuple[int, ...]) -> str:
    """``setup.py`` text with the kernel list cut to ``hdims`` and the disable flags added."""
    out = []
    for line in text.splitlines(keepends=True):
        m = _SOURCE_RE.match(line)
        if m and int(m.group(1)) not in hdims:
            continue
        out.append(line)
    text = "".join(out)
    flags = f"    {PY_MARK}\n" + "".join(f'    "-D{f}",\n' for f in DISABLE_FLAGS)
    if PY_MARK not in text:  # (setup.py already names these flags in comments: look for our mark)
        anchor = '    "--use_fast_math",\n'
        if anchor not in text:
            raise ValueError(
                "setup.py: nvcc flag anchor '--use_fast_math' not found (unexpected flash-attn version)"
            )
        text = text.replace(anchor, anchor + flags, 1)
        anchor_cxx = 'compiler_c17_flag=["-O3", "-std=c++17"]'
        if anchor_cxx not in text:
            raise ValueError(
                "setup.py: C++ flag anchor 'compiler_c17_flag' not found (unexpected flash-attn version)"
            )
        cxx = ", ".join(f'"-D{f}"' for f in DISABLE_FLAGS)
        text = text.replace(anchor_cxx, f'compiler_c17_flag=["-O3", "-std=c++17", {cxx}]', 1)
    return text


def headdim_switch(hdims: tuple[int, ...]) -> str:
    """The replacement ``HEADDIM_SWITCH``: kept dims dispatch, the others raise ``RuntimeError``."""
    built = " ".join(str(h) for h in hdims)
    lines = [
        f"{MARK} head dims {built}",
        "#define HEADDIM_SWITCH(HEADDIM, ...)   \\",
        "  [&] {                                    \\",
    ]
    for i, h in enumerate(ALL_HDIMS):
        cond = f"HEADDIM <= {h}"
        lines.append(f"    {'if' if i == 0 else '} else if'} ({cond}) {{ \\")
        if h in hdims:
            lines.append(f"      constexpr static int kHeadDim = {h}; \\")
            lines.append("      return __VA_ARGS__(); \\")
        else:
            lines.append(
                f'      TORCH_CHECK(false, "this flash-attn build has no kernels for head dim {h} '
                f'(built: {built}); rebuild without scripts/flash2/subset.py"); \\'
            )
    lines.append("    }                                      \\")
    lines.append("  }()")
    return "\n".join(lines) + "\n"


def patch_switch(text: str, hdims: tuple[int, ...]) -> str:
    """``static_switch.h`` text with ``HEADDIM_SWITCH`` replaced (the macro runs to ``}()``)."""
    start = text.find(MARK)
    if start < 0:
        start = text.find("#define HEADDIM_SWITCH(")
    if start < 0:
        raise ValueError("static_switch.h: HEADDIM_SWITCH not found (unexpected flash-attn version)")
    end = text.find("}()", start)
    if end < 0:
        raise ValueError("static_switch.h: end of HEADDIM_SWITCH not found")
    end = text.find("\n", end) + 1 or len(text)
    return text[:start] + headdim_switch(hdims) + text[end:]


def kept_sources(setup_text: str) -> list[str]:
    """Kernel sources (``csrc/flash_attn/src/*.cu``) the CUDA extension lists."""
    return [m.group(0).strip().strip('",') for m in map(_SOURCE_RE.match, setup_text.splitlines()) if m]


def check(src: Path, setup_text: str, switch_text: str, hdims: tuple[int, ...]) -> list[str]:
    """Problems with a patched tree (empty: consistent): every kept dim has its 12 kernels, no others,
    every listed file exists, and the switch instantiates exactly the kept dims."""
    problems = []
    kept = kept_sources(setup_text)
    for h in ALL_HDIMS:
        n = sum(f"_hdim{h}_" in s for s in kept)
        want = 2 * 2 * len(KERNEL_KINDS) if h in hdims else 0
        if n != want:
            problems.append(f"head dim {h}: {n} kernel sources listed, expected {want}")
    problems += [f"listed source missing: {s}" for s in kept if not (src / s).is_file()]
    inst = sorted(int(x) for x in re.findall(r"constexpr static int kHeadDim = (\d+);", switch_text))
    if inst != sorted(hdims):
        problems.append(f"HEADDIM_SWITCH instantiates {inst}, expected {sorted(hdims)}")
    code = "\n".join(ln for ln in setup_text.splitlines() if not ln.lstrip().startswith("#"))
    for f in DISABLE_FLAGS:
        if code.count(f'"-D{f}"') != 2:
            problems.append(f"setup.py: -D{f} should appear in the nvcc and the C++ flags")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="unpacked flash-attn sdist (holds setup.py)")
    ap.add_argument("--hdims", default="64,128,256", help="head dims to build, comma or space separated")
    ap.add_argument("--dry-run", action="store_true", help="print what would compile; write nothing")
    ap.add_argument(
        "--count", action="store_true", help="print the number of objects the patched tree builds"
    )
    a = ap.parse_args(argv)
    hdims = tuple(sorted({int(x) for x in re.split(r"[,\s]+", a.hdims.strip()) if x}))
    bad = [h for h in hdims if h not in ALL_HDIMS]
    if bad or not hdims:
        ap.error(f"--hdims {a.hdims!r}: each must be one of {ALL_HDIMS}")
    setup_path = a.src / "setup.py"
    switch_path = a.src / "csrc/flash_attn/src/static_switch.h"
    setup_text = patch_setup(setup_path.read_text(), hdims)
    switch_text = patch_switch(switch_path.read_text(), hdims)
    kept = kept_sources(setup_text)
    if a.count:
        print(len(kept) + 1)  # + flash_api.cpp
        return 0
    problems = check(a.src, setup_text, switch_text, hdims)
    if a.dry_run:
        print(f"head dims {hdims}: {len(kept)} kernel objects + flash_api.cpp = {len(kept) + 1} objects")
        for s in kept:
            print(f"  compile {s}")
        print("nvcc/C++ defines: " + " ".join(f"-D{f}" for f in DISABLE_FLAGS))
        print(switch_text[switch_text.find(MARK) :].split("}()")[0] + "}()")
    else:
        setup_path.write_text(setup_text)
        switch_path.write_text(switch_text)
        print(f"patched {setup_path} and {switch_path}: head dims {hdims}, {len(kept) + 1} objects")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
