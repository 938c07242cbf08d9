"""Which FlashAttention-3 calls of an installed build run (forward + backward), each in its own
process, so that a crash (segfault) in one configuration does not hide the others.

    python scripts/flash3/probe.py [--timeout 60]      # prints one line per configuration
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import subprocess
import sys

CHILD = r"""
import sys, torch, flash_attn_interface as fi
hd, causal, det, varlen, hkv, dt = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4] == "1", int(sys.argv[5]), getattr(torch, sys.argv[6])
win = (int(sys.argv[7]), 0) if int(sys.argv[7]) >= 0 else (-1, -1)
torch.manual_seed(0)
B, T, H = 2, 512, 8
mk = lambda h: torch.randn(B, T, h, hd, device="cuda", dtype=dt, requires_grad=True)
q, k, v = mk(H), mk(hkv), mk(hkv)
if varlen:
    cu = torch.tensor([0, 200, 512, 1024], dtype=torch.int32, device="cuda")
    f = lambda a: a.reshape(B * T, *a.shape[2:])
    out = fi.flash_attn_varlen_func(f(q), f(k), f(v), cu, cu, 312, 312, causal=causal, window_size=win, deterministic=det)
else:
    out = fi.flash_attn_func(q, k, v, causal=causal, window_size=win, deterministic=det)
out = out[0] if isinstance(out, tuple) else out
out.float().sum().backward()
torch.cuda.synchronize()
print("ok", float(q.grad.float().abs().sum()) > 0)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--jobs", type=int, default=4)
    a = ap.parse_args()
    # (head dim, causal, deterministic, varlen, kv heads of 8, dtype, left window or -1)
    hds = (64, 128, 256)
    grid = [
        *itertools.product(hds, ("0", "1"), ("0",), ("0",), (8,), ("bfloat16",), (-1,)),
        *itertools.product(hds, ("1",), ("1",), ("0",), (8, 2), ("bfloat16",), (-1,)),
        *itertools.product(hds, ("1",), ("0",), ("1",), (8, 2), ("float16",), (-1,)),
        *itertools.product(hds, ("1",), ("0",), ("0",), (2,), ("bfloat16",), (-1,)),
        *itertools.product(hds, ("1",), ("0",), ("0", "1"), (8,), ("bfloat16",), (64,)),
    ]

    def one(cfg: tuple[object, ...]) -> str:
        hd, causal, det, varlen, hkv, dt, win = cfg
        args = [str(hd), causal, det, varlen, str(hkv), dt, str(win)]
        try:
            p = subprocess.run(
                [sys.executable, "-c", CHILD, *args],
                capture_output=True,
                text=True,
                timeout=a.timeout,
                env=dict(os.environ, PYTHONFAULTHANDLER="1"),
            )
            res = (
                p.stdout.strip().splitlines()[-1]
                if p.returncode == 0
                else f"rc={p.returncode} {p.stderr.strip()[-600:]}"
            )
        except subprocess.TimeoutExpired:
            res = "timeout"
        return f"hdim={hd} causal={causal} deterministic={det} varlen={varlen} hkv={hkv} {dt} window={win}: {res}"

    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:  # one GPU, a few processes at once
        for line in pool.map(one, grid):
            print(line, flush=True)


if __name__ == "__main__":
    main()
