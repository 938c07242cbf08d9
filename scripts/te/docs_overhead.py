"""Transformer Engine with packed documents: our ``te`` adapter against TE's own call on the same
inputs, to find where ``benchmarks/backend_bench.py``'s forward gap at T=32k (B=1) comes from.

Per case (the benchmark's shapes and documents: Hq 32, Hkv 8, D 128, bf16): the no-grad forward
of each, timed in alternating order (adapter first, then raw first, twice) so an order effect
shows; each also synchronised after every call (host + GPU serial) and its host time alone; then
one profiled forward of each (kernel names and device time), so a difference in the kernels TE
picks separates from one in host work. Run with TE on the path (``source ~/te_site/te_env.sh``);
``NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2`` makes TE log its backend choice to stderr.

    python scripts/te/docs_overhead.py --out te-docs-overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import backend_bench as bb  # noqa: E402

from olmo_attn.backends.base import AttentionBackendName  # noqa: E402


def _events(fn: Any, iters: int) -> float:
    """Median ms per call, calls issued back to back (backend_bench's timing)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def _serial(fn: Any, iters: int) -> tuple[float, float]:
    """(median ms per call with a sync after each, median host ms of the call alone)."""
    wall, host = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
    return statistics.median(wall), statistics.median(host)


def _kernels(fn: Any) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dev and e.count:
            rows.append({"name": e.key[:160], "calls": e.count / 5, "device_us_per_fwd": dev / 5})
    return sorted(rows, key=lambda r: -r["device_us_per_fwd"])[:12]


def case(B: int, T: int, iters: int) -> dict[str, Any]:
    cfg = bb.BenchConfig(seq_lens=(T,), tokens=B * T, masks=("documents",), backends=("te",))
    cu, max_len, n_docs = bb.cu_doc_lens(B, T, cfg.seed + T, cfg.mean_doc_len)
    kwargs = {"cu_doc_lens": cu.cuda(), "max_doc_len": max_len}
    backend = AttentionBackendName("te").build(
        head_dim=cfg.head_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, window_size=(-1, -1)
    )
    raw, note = bb.raw_call("te", cfg, "documents", kwargs)
    q, k, v, _ = (t.requires_grad_() for t in bb._inputs(cfg, B, T, cfg.seed, torch.bfloat16))
    fns = {
        "adapter": lambda: backend((q, k, v), **kwargs),
        "raw": lambda: raw(q, k, v),
    }
    res: dict[str, Any] = {"B": B, "T": T, "n_docs": n_docs, "max_doc_len": max_len, "raw_call": note}
    with torch.no_grad():
        res["max_abs_diff"] = float((fns["adapter"]().float() - fns["raw"]().float()).abs().max())
        for order in (("adapter", "raw"), ("raw", "adapter")) * 2:
            for name in order:
                res.setdefault(f"{name}_fwd_ms", []).append(round(_events(fns[name], iters), 4))
        for name, fn in fns.items():
            res[f"{name}_serial_ms"], res[f"{name}_host_ms"] = (round(x, 4) for x in _serial(fn, iters))
            res[f"{name}_kernels"] = _kernels(fn)
        # leaves that do not require grad (the adapter's first call in backend_bench is like this)
        q2, k2, v2 = (t.detach() for t in (q, k, v))
        res["adapter_fwd_ms_no_requires_grad"] = round(
            _events(lambda: backend((q2, k2, v2), **kwargs), iters), 4
        )
        res["raw_fwd_ms_no_requires_grad"] = round(_events(lambda: raw(q2, k2, v2), iters), 4)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_kernels")}), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    rows = [case(B, T, args.iters) for B, T in ((1, 32768), (4, 8192))]
    args.out.write_text(json.dumps({"env": bb.fingerprint("cuda"), "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
