"""Where the time of our Gated DeltaNet Triton kernels goes on a GPU: device time per kernel
(torch.profiler) against the wall time of the same forward / forward+backward, so host overhead
(launch gaps) and kernel time are told apart.

    python scripts/gpu/gdn_profile.py [--B 2 --T 8192 --H 16 --Dk 128 --Dv 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from olmo_attn.recurrent.triton_chunk import triton_chunk_gated_delta_rule


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("B", 2), ("T", 8192), ("H", 16), ("HV", 16), ("Dk", 128), ("Dv", 256)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(a.B, a.T, a.H, a.Dk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(a.B, a.T, a.H, a.Dk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(a.B, a.T, a.HV, a.Dv, device=dev, dtype=dt, requires_grad=True)
    g = (-torch.rand(a.B, a.T, a.HV, device=dev) * 0.1).requires_grad_(True)  # log-decay, float32
    beta = torch.rand(a.B, a.T, a.HV, device=dev, dtype=dt).requires_grad_(True)
    do = torch.randn(a.B, a.T, a.HV, a.Dv, device=dev, dtype=dt)

    def fwd() -> torch.Tensor:
        return triton_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)[0]

    def fwd_nograd() -> None:
        with torch.no_grad():
            fwd()

    def fwd_bwd() -> None:
        torch.autograd.grad(fwd(), (q, k, v, g, beta), do)

    result = {}
    for label, fn in (("fwd", fwd_nograd), ("fwd[train]", fwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.iters):
            fn()
        end.record()
        end.synchronize()
        wall = start.elapsed_time(end) / a.iters
        # host time per call: launches queued without waiting (the GPU is idle-bound when host > wall)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            fn()
        host = (time.perf_counter() - t0) * 1e3 / a.iters
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                fn()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            dev_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if dev_us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
                rows.append((e.key, dev_us / a.iters / 1e3, e.count // a.iters))
        rows.sort(key=lambda r: -r[1])
        busy = sum(r[1] for r in rows)
        result[label] = {"wall_ms": wall, "kernel_ms": busy, "host_ms": host, "kernels": rows}
        print(
            f"== {label}: wall {wall:.3f} ms/iter, device busy {busy:.3f} ms/iter ({100 * busy / wall:.0f}%),"
            f" host {host:.3f} ms/call"
        )
        for key, ms, n in rows[:25]:
            print(f"  {ms:8.3f} ms  x{n:<3d} {key[:100]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
