"""Registers, spills and shared memory of every Gated DeltaNet Triton kernel, compiled for a GPU
this machine need not have (default sm_90), at the benchmark shape.

The host functions of ``olmo_attn.recurrent.triton_chunk`` run on CPU tensors of the benchmark's
shape; each kernel launch is caught, specialised exactly as Triton's launcher would (argument
types, divisibility, ``== 1`` constants, the launch options of ``LAUNCH``), compiled for the
target, and the cubin's resource use read back with ``cuobjdump``. Nothing runs on a GPU, so this
answers "does this kernel spill, how many registers, how many programs fit a multiprocessor"
between GPU sessions. A stack frame (``stack B`` > 0) at 255 registers is spilled registers.

    python benchmarks/triton_regs.py                              # B1 T128, H16 Dk128 Dv256 bf16, sm_90
    python benchmarks/triton_regs.py --arch 100 --dtype float32
    python benchmarks/triton_regs.py --set wy_bwd.num_warps=4     # a LAUNCH override
    python benchmarks/triton_regs.py --fused prep=0 --tile wy_key_tile=64   # kernel choices
    python benchmarks/triton_regs.py --sass       # and SASS instruction counts (barriers, shuffles, spills)

Occupancy here is the register and shared-memory bound only (65,536 registers and 227 KiB of
shared memory per multiprocessor, 64 warps), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions: compiled, never launched here

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from olmo_attn.recurrent import triton_chunk as tc  # noqa: E402

REGS_PER_SM, SMEM_PER_SM, WARPS_PER_SM = 65536, 227 * 1024, 64


def _compile(fn: Any, target: Any, args: tuple, kwargs: dict) -> Any:
    """Triton's own launch-time specialisation of ``fn(*args, **kwargs)``, compiled for ``target``."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, None)
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def _resources(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    out = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)")):
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else 0
    return out


SASS_OPS = ("BAR", "SHFL", "LDS", "STS", "LDL", "STL", "LDG", "STG", "HMMA", "HGMMA", "FFMA")


def _sass_counts(cubin: bytes, nvdisasm: str) -> dict[str, int]:
    """Instructions of the cubin's SASS: ``total`` and the count of each op in ``SASS_OPS``
    (barriers, shuffles, shared/local/global memory, tensor-core and FMA ops)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, f.name], capture_output=True, text=True, check=True).stdout
    ops: dict[str, int] = {}
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            op = m.group(1).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    return {"total": sum(ops.values()), **{k: ops.get(k, 0) for k in SASS_OPS}}


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per distinct kernel launch of a forward (no grad and training) and a backward."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    kern = tc._kernels()
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()

    class Catch:
        def __init__(self, name: str, fn: Any) -> None:
            self.name, self.fn = name, fn

        def __getitem__(self, grid: tuple) -> Any:
            def launch(*a: Any, **kw: Any) -> None:
                key = (self.name, tuple(sorted((k, str(v)) for k, v in kw.items())))
                if key in seen:
                    return
                seen.add(key)
                k = _compile(self.fn, target, a, dict(kw))
                res = _resources(k.asm["cubin"], cuobjdump)
                if getattr(args, "sass", False):
                    res["sass"] = _sass_counts(k.asm["cubin"], cuobjdump.replace("cuobjdump", "nvdisasm"))
                warps = kw.get("num_warps", 4)
                smem = int(k.metadata.shared)
                fit = min(
                    REGS_PER_SM // max(1, res["regs"] * 32 * warps),
                    SMEM_PER_SM // smem if smem else 99,
                    WARPS_PER_SM // warps,
                )
                rows.append(
                    {
                        "kernel": self.name,
                        "grid": list(grid),
                        "num_warps": warps,
                        "num_stages": kw.get("num_stages"),
                        **res,
                        "shared_bytes": smem,
                        "programs_per_sm": fit,
                        "constexprs": {
                            k_: v
                            for k_, v in kw.items()
                            if k_ not in ("num_warps", "num_stages") and k_.isupper()
                        },
                    }
                )

            return launch

    for name, fn in list(vars(kern).items()):
        setattr(kern, name, Catch(name, fn))
    try:
        dt = getattr(torch, args.dtype)
        B, T, H, HV, Dk, Dv = args.batch, args.seq_len, args.heads, args.heads * args.rep, args.dk, args.dv
        q = torch.randn(B, T, H, Dk, dtype=dt)
        k = torch.randn(B, T, H, Dk, dtype=dt)
        v = torch.randn(B, T, HV, Dv, dtype=dt)
        g = -torch.rand(B, T, HV)
        beta = torch.rand(B, T, HV, dtype=dt)
        h0 = torch.zeros(B, HV, Dk, Dv)
        cu = tc._row_offsets(B * T, T, q.device)
        n_slots = tc.n_slots_for(B * T, B, False, T)
        scale = Dk**-0.5
        tc._fwd_impl(q, k, v, g, beta, h0, cu, n_slots, scale, True, False)
        saved = tc._fwd_impl(q, k, v, g, beta, h0, cu, n_slots, scale, True, True)
        o, _final, qn, kn, rq, rk, tm, gc, w, h, vn = saved
        tc._bwd_impl(
            q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc, w, h, vn, torch.randn_like(o),
            None, n_slots, scale, True, True,
        )  # fmt: skip
    finally:
        tc._kernels.cache_clear()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per row (shapes of the kernels do not depend on it)"
    )
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rep", type=int, default=1, help="value heads per q/k head")
    p.add_argument("--dk", type=int, default=128)
    p.add_argument("--dv", type=int, default=256)
    p.add_argument("--set", action="append", default=[], metavar="KERNEL.OPTION=INT", help="override LAUNCH")
    p.add_argument(
        "--fused", action="append", default=[], metavar="NAME=0|1", help="override FUSED (kernel choices)"
    )
    p.add_argument("--tile", action="append", default=[], metavar="NAME=INT", help="override TILES")
    p.add_argument("--sass", action="store_true", help="also count SASS instructions (total, barriers, ...)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    for item in args.set:
        lhs, val = item.split("=")
        kname, opt = lhs.split(".")
        tc.LAUNCH[kname][opt] = int(val)
    for table, items in ((tc.FUSED, args.fused), (tc.TILES, args.tile)):
        for item in items:
            key, val = item.split("=")
            if key not in table:
                p.error(f"unknown key {key!r}; known: {', '.join(table)}")
            table[key] = type(table[key])(int(val))
    rows = collect(args)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    sass_cols = ("total", "BAR", "SHFL", "LDL", "STL") if args.sass else ()
    print(
        f"{'kernel':<12} {'warps':>5} {'stages':>6} {'regs':>5} {'stack B':>8} {'smem KiB':>9} {'fit/SM':>6}"
        + "".join(f" {c:>6}" for c in sass_cols)
    )
    for r in rows:
        print(
            f"{r['kernel']:<12} {r['num_warps']:>5} {r['num_stages']!s:>6} {r['regs']:>5} {r['stack']:>8} "
            f"{r['shared_bytes'] / 1024:>9.1f} {r['programs_per_sm']:>6}"
            + "".join(f" {r['sass'][c]:>6}" for c in sass_cols)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
