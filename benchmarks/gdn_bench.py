"""Gated DeltaNet: correctness and speed of our chunked kernel, side by side with
flash-linear-attention (when importable) and causal softmax attention (cuDNN SDPA).

1. Correctness (bf16, small T): our chunked kernel — and fla's forward (and backward where fla
   allows it) — against the float64 token-by-token reference (``reference.twins``), with
   flash-linear-attention's relative-RMS metric and budgets: output / final state < 5e-3,
   dq / dk / dv / d(initial state) < 8e-3, d(beta) / d(g) < 2e-2.
2. Speed at B=2, T=8192, H=16, Dk=128, Dv=256, bf16 (``/work/shared/BENCHMARKS.md`` workload 5):
   forward and forward+backward of our kernel (chunk 64 and 128, both intra-chunk solvers, with
   recomputation, with TF32 matmuls, with packed documents), fla's forward (and forward+backward where allowed), and causal SDPA
   through cuDNN at the same shape (Hq = Hkv = 16, D = 128). Peak memory for each.
3. Decoding: the recurrent step at batch 64 (state ``[64, 16, 128, 256]`` float32), eager and
   ``torch.compile``-fused, in GB/s of state traffic (read + write) against the HBM peak; and the
   whole ``GatedDeltaNet`` layer's decode step (d_model 2048) in tokens/s.

CUDA events, warm-up, median of >= 20 timed runs; random inputs.

    python benchmarks/gdn_bench.py                          # GPU; JSON to benchmarks/results/
    python benchmarks/gdn_bench.py --out /tmp/gdn.json
    python benchmarks/gdn_bench.py --smoke --out /tmp/g.json   # CPU, tiny shapes

The table printed last repeats the headline numbers and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from olmo_attn.hardware import package_status  # noqa: E402
from olmo_attn.recurrent import GatedDeltaNet, chunk_gated_delta_rule  # noqa: E402
from olmo_attn.recurrent import fla as fla_mod  # noqa: E402

BUDGETS = {"o": 5e-3, "final": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "h0": 8e-3, "g": 2e-2, "beta": 2e-2}
HBM_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}


# ---------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def _tf32(on: bool):
    """Allow TF32 for float32 matmuls (forward and backward) inside the block; restore after."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on or prev
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _time_ms(fn: Callable[[], Any], *, iters: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "n": len(times),
    }


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _fwd_bwd(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor):
    def run() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return run


# ------------------------------------------------------------------------------------------ inputs


def _gdr_inputs(B, T, H, HV, Dk, Dv, *, device, dtype, n_seq=None, seed=0, requires_grad=False):
    """fla-test-like inputs: q, k, v ~ N(0,1); g = logsigmoid(N(0,1)) float32; beta = 2 sigmoid(N(0,1))."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    out = {
        "q": rnd(B, T, H, Dk).to(device, dtype),
        "k": rnd(B, T, H, Dk).to(device, dtype),
        "v": rnd(B, T, HV, Dv).to(device, dtype),
        "g": F.logsigmoid(rnd(B, T, HV)).to(device),
        "beta": (2 * torch.sigmoid(rnd(B, T, HV))).to(device, dtype),
        "h0": rnd(n_seq if n_seq is not None else B, HV, Dk, Dv).to(device),
    }
    if requires_grad:
        for t in out.values():
            t.requires_grad_()
    return out


def _doc_lengths(total: int, n_docs: int, seed: int) -> list[int]:
    """Long-tailed document lengths (log-normal), summing to ``total``, not multiples of 64."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(n_docs, generator=gen) * 1.2)
    lens = [max(1, int(x)) for x in (w / w.sum() * total)]
    lens[-1] += total - sum(lens)
    return lens


def _cu(lens: list[int], device) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).square().mean().sqrt() / ref.square().mean().sqrt())


# ------------------------------------------------------------------------------------- correctness


def _reference(inp: dict, cu: torch.Tensor | None, B: int, T: int, do, dfin):
    """Float64 token-by-token reference on CPU: outputs, final state and input gradients."""
    from reference import twins

    names = ("q", "k", "v", "g", "beta", "h0")
    leaves = {n: inp[n].detach().double().cpu().requires_grad_() for n in names}
    args = [leaves[n] for n in names[:5]]
    if cu is not None:
        args = [a.reshape(1, B * T, *a.shape[2:]) for a in args]
    o, fin = twins.gated_delta_rule(
        *args,
        initial_state=leaves["h0"],
        output_final_state=True,
        use_qk_l2norm=True,
        cu_seqlens=None if cu is None else cu.cpu().numpy(),
    )
    o = o.reshape(B, T, *o.shape[2:])
    ((o * do.double().cpu()).sum() + (fin * dfin.double().cpu()).sum()).backward()
    return o.detach(), fin.detach(), {n: leaves[n].grad for n in names}


def _check(kernel: Callable, inp: dict, cu, do, dfin, with_grad: bool) -> dict[str, Any]:
    names = ("q", "k", "v", "g", "beta", "h0")
    leaves = {n: inp[n].detach().clone().requires_grad_(with_grad) for n in names}
    o, fin = kernel(
        *[leaves[n] for n in names[:5]],
        initial_state=leaves["h0"],
        output_final_state=True,
        use_qk_l2norm=True,
        cu_seqlens=cu,
    )
    res: dict[str, Any] = {"o": o, "final": fin}
    if with_grad:
        ((o.float() * do).sum() + (fin.float() * dfin).sum()).backward()
        res.update({n: leaves[n].grad for n in names})
    return res


def correctness(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    B, H, HV, Dk, Dv = (1, 1, 2, 16, 32) if smoke else (2, 2, 4, 128, 256)
    cases = [
        {"name": "gva-negeig-h0", "T": 100 if smoke else 300, "docs": None},
        {
            "name": "docs-negeig-h0",
            "T": 130 if smoke else 330,
            "docs": [37, 0, 70, 23] if smoke else [100, 1, 0, 150, 79],
        },
    ]
    fla_ok_fwd, fla_why_fwd = fla_mod.fla_kernel_usable(device, torch.bfloat16, backward=False)
    fla_ok_bwd, fla_why_bwd = fla_mod.fla_kernel_usable(device, torch.bfloat16, backward=True)
    out = []
    for case in cases:
        T = case["T"]
        bb = 1 if case["docs"] else B
        cu = _cu(case["docs"], device) if case["docs"] else None
        n_seq = len(case["docs"]) if case["docs"] else bb
        inp = _gdr_inputs(bb, T, H, HV, Dk, Dv, device=device, dtype=torch.bfloat16, n_seq=n_seq, seed=1)
        gen = torch.Generator().manual_seed(2)
        do = torch.randn(bb, T, HV, Dv, generator=gen).to(device)
        dfin = torch.randn(n_seq, HV, Dk, Dv, generator=gen).to(device)
        ro, rfin, rgrads = _reference(inp, cu, bb, T, do, dfin)
        subjects: list[tuple[str, Callable, bool]] = [
            ("ours", chunk_gated_delta_rule, True),
            ("ours:C=128", functools.partial(chunk_gated_delta_rule, chunk_size=128), True),
            ("ours:old", functools.partial(chunk_gated_delta_rule, solve="blocked", scan="delta"), True),
        ]
        if device.type == "cuda":
            subjects.append(("ours+tf32", chunk_gated_delta_rule, True))
        if fla_ok_fwd:
            subjects.append(("fla", fla_mod.fla_chunk_gated_delta_rule, fla_ok_bwd))
        for name, kernel, grad in subjects:
            row: dict[str, Any] = {"case": case["name"], "kernel": name, "T": T, "dtype": "bfloat16"}
            try:
                with _tf32(name.endswith("tf32")):
                    res = _check(kernel, inp, cu, do, dfin, grad)
                errs = {"o": rel_rms(res["o"], ro), "final": rel_rms(res["final"], rfin)}
                if grad:
                    errs.update({n: rel_rms(res[n], rgrads[n]) for n in ("q", "k", "v", "g", "beta", "h0")})
                else:
                    row["backward"] = f"not run: {fla_why_bwd}"
                row["rel_rms"] = errs
                row["finite"] = all(bool(torch.isfinite(t).all()) for t in res.values() if t is not None)
                row["pass"] = row["finite"] and all(errs[k] < BUDGETS[k] for k in errs)
            except Exception as e:  # report, keep going
                row.update({"pass": False, "error": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
            out.append(row)
            print(json.dumps(row))
    if not fla_ok_fwd:
        out.append({"kernel": "fla", "skipped": fla_why_fwd})
    return out


# ----------------------------------------------------------------------------------------- speed


# (label, chunk, solve, scan, recompute, tf32); "delta" + "blocked" at C=64 is the previous default
SPEED_VARIANTS: list[tuple[str, int, str, str, bool, bool]] = [
    ("new[C=64]", 64, "doubling", "transition", False, False),
    ("new[C=128]", 128, "doubling", "transition", False, False),
    ("new[C=64,solve]", 64, "solve", "transition", False, False),
    ("new[C=64,blocked]", 64, "blocked", "transition", False, False),
    ("new[C=64,tf32]", 64, "doubling", "transition", False, True),
    ("new[C=128,tf32]", 128, "doubling", "transition", False, True),
    ("new[C=64,recompute]", 64, "doubling", "transition", True, False),
    ("old[C=64,delta,blocked]", 64, "blocked", "delta", False, False),
    ("old[C=128,delta,blocked]", 128, "blocked", "delta", False, False),
    ("old[C=128,delta,blocked,tf32]", 128, "blocked", "delta", False, True),
]
SMOKE_VARIANTS = [
    ("new[C=64]", 64, "doubling", "transition", False, False),
    ("new[C=32,recompute]", 32, "solve", "transition", True, False),
    ("old[C=64,delta,blocked]", 64, "blocked", "delta", False, False),
]
HEADLINE_NEW, HEADLINE_OLD = "new[C=64]", "old[C=64,delta,blocked]"


def speed(device: torch.device, smoke: bool, iters: int, warmup: int) -> list[dict[str, Any]]:
    B, T, H, Dk, Dv = (1, 256, 2, 32, 64) if smoke else (2, 8192, 16, 128, 256)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = _gdr_inputs(B, T, H, H, Dk, Dv, device=device, dtype=dt, requires_grad=True)
    names = ("q", "k", "v", "g", "beta")
    leaves = [inp[n] for n in names]
    do = torch.randn(B, T, H, Dv, device=device, dtype=dt)
    rows: list[dict[str, Any]] = []

    def record(name: str, kind: str, fn: Callable, **extra: Any) -> None:
        row: dict[str, Any] = {
            "subject": name,
            "pass": kind,
            "B": B,
            "T": T,
            "H": H,
            "Dk": Dk,
            "Dv": Dv,
            **extra,
        }
        try:
            row.update(_time_ms(fn, iters=iters, warmup=warmup, device=device))
            row["peak_mb"] = _peak_mb(fn, device)
            row["tokens_per_s"] = B * T / (row["median_ms"] / 1e3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row))

    for label, C, solve, scan, rc, tf32 in SMOKE_VARIANTS if smoke else SPEED_VARIANTS:

        def fwd(C=C, solve=solve, scan=scan, rc=rc) -> torch.Tensor:
            return chunk_gated_delta_rule(
                *leaves, use_qk_l2norm=True, chunk_size=C, solve=solve, scan=scan, recompute=rc
            )[0]

        extra = {"chunk": C, "solve": solve, "scan": scan, "recompute": rc, "tf32": tf32}
        with _tf32(tf32):
            with torch.no_grad():
                record(f"ours:{label}", "fwd", fwd, **extra)
            record(f"ours:{label}", "fwd+bwd", _fwd_bwd(fwd, leaves, do), **extra)

    lens = _doc_lengths(B * T, 8 if smoke else 40, seed=3)
    cu = _cu(lens, device)
    for label, solve, scan in (("new", "auto", "transition"), ("old", "blocked", "delta")):

        def fwd_docs(solve=solve, scan=scan) -> torch.Tensor:
            return chunk_gated_delta_rule(*leaves, use_qk_l2norm=True, cu_seqlens=cu, solve=solve, scan=scan)[
                0
            ]

        extra = {"n_docs": len(lens), "longest_doc": max(lens), "solve": solve, "scan": scan}
        with torch.no_grad():
            record(f"ours:{label}[docs]", "fwd", fwd_docs, **extra)
        record(f"ours:{label}[docs]", "fwd+bwd", _fwd_bwd(fwd_docs, leaves, do), **extra)

    ok_f, why_f = fla_mod.fla_kernel_usable(device, dt, backward=False)
    ok_b, why_b = fla_mod.fla_kernel_usable(device, dt, backward=True)
    if ok_f:

        def fla_fwd() -> torch.Tensor:
            return fla_mod.fla_chunk_gated_delta_rule(*leaves, use_qk_l2norm=True)[0]

        with torch.no_grad():
            record("fla", "fwd", fla_fwd)
        if ok_b:
            record("fla", "fwd+bwd", _fwd_bwd(fla_fwd, leaves, do))
        else:
            rows.append({"subject": "fla", "pass": "fwd+bwd", "skipped": why_b})
    else:
        rows.append({"subject": "fla", "pass": "fwd", "skipped": why_f})

    # causal softmax attention at the same shape: Hq = Hkv = H, D = Dk
    q = torch.randn(B, H, T, Dk, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(B, H, T, Dk, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(B, H, T, Dk, device=device, dtype=dt, requires_grad=True)
    dso = torch.randn(B, H, T, Dk, device=device, dtype=dt)
    flops_fwd = 4 * B * H * Dk * T * (T + 1) / 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backends = [("cudnn", SDPBackend.CUDNN_ATTENTION)] if device.type == "cuda" else []
    sdpa_backends.append(("default", None))
    for label, be in sdpa_backends:

        def attn(be=be) -> torch.Tensor:
            if be is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        with torch.no_grad():
            record(f"sdpa[{label}]", "fwd", attn, flops=flops_fwd)
        record(f"sdpa[{label}]", "fwd+bwd", _fwd_bwd(attn, [q, k, v], dso), flops=3.5 * flops_fwd)
        if "error" not in rows[-1]:
            break  # cuDNN worked: the default SDPA is not needed
    for r in rows:
        if "flops" in r and "median_ms" in r:
            r["tflops"] = r["flops"] / (r["median_ms"] / 1e3) / 1e12
    return rows


# ------------------------------------------------------------------------------------------- scan


def scan(device: torch.device, smoke: bool, iters: int, warmup: int) -> list[dict[str, Any]]:
    """The sequential part alone: ``S' = M S + Bc`` over the chunks of B=2, T=8192, H=16 (one
    ``baddbmm`` of ``[32, 128x128] @ [32, 128x256]`` float32 per chunk), forward loop and backward
    loop, eager; and the forward loop replayed from a CUDA graph (captured here, fixed tensors),
    which removes the CPU launch cost: the gap between the two is what graph capture or a fused
    Triton scan could still save."""
    from olmo_attn.recurrent.chunked import _StateRecurrence

    B, T, H, Dk, Dv = (1, 256, 2, 32, 64) if smoke else (2, 8192, 16, 128, 256)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(5)
    for C in (64,) if smoke else (64, 128):
        S, N = -(-T // C), B * H
        # a contraction plus noise keeps the state bounded over the loop
        m = (0.9 * torch.eye(Dk) + 0.01 * torch.randn(S, N, Dk, Dk, generator=gen)).to(device)
        bc = (0.1 * torch.randn(S, N, Dk, Dv, generator=gen)).to(device)
        m.requires_grad_()
        bc.requires_grad_()
        ds = torch.randn(S, N, Dk, Dv, generator=gen).to(device)
        base = {"chunk": C, "steps": S, "N": N, "Dk": Dk, "Dv": Dv}

        def fwd(m=m, bc=bc, N=N) -> torch.Tensor:
            return _StateRecurrence.apply(m, bc, None, None, N)[0]

        def fwd_bwd(m=m, bc=bc, ds=ds) -> None:
            m.grad = bc.grad = None
            fwd(m, bc).backward(ds)

        cases: list[tuple[str, Callable]] = [
            ("scan[eager] fwd", lambda fwd=fwd: fwd()),
            ("scan[eager] fwd+bwd", fwd_bwd),
        ]
        if device.type == "cuda":
            try:
                with torch.no_grad():
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        fwd()  # warm-up (cuBLAS handles, workspaces) outside the capture
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fwd()
                cases.append(("scan[cuda-graph] fwd", graph.replay))
            except Exception as e:
                rows.append({"subject": "scan[cuda-graph] fwd", **base, "error": f"{type(e).__name__}: {e}"})
        for name, fn in cases:
            row: dict[str, Any] = {"subject": name, **base}
            try:
                if name.endswith("fwd"):
                    with torch.no_grad():
                        row.update(_time_ms(fn, iters=iters, warmup=warmup, device=device))
                else:
                    row.update(_time_ms(fn, iters=iters, warmup=warmup, device=device))
                row["us_per_step"] = row["median_ms"] * 1e3 / S
                row["GFLOP_per_s"] = (
                    2 * N * Dk * Dk * Dv * S * (2 if "bwd" in name else 1) / (row["median_ms"] / 1e3) / 1e9
                )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row))
    return rows


# ---------------------------------------------------------------------------------------- decode


def decode(device: torch.device, smoke: bool, iters: int, warmup: int) -> list[dict[str, Any]]:
    from olmo_attn.recurrent import recurrent as rec
    from olmo_attn.recurrent.chunked import l2norm

    B, H, Dk, Dv = (4, 2, 32, 64) if smoke else (64, 16, 128, 256)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in HBM_PEAK_GBS.items() if k in gpu), None)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(4)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(B, H, Dk, generator=gen).to(device, dt)
    k = torch.randn(B, H, Dk, generator=gen).to(device, dt)
    v = torch.randn(B, H, Dv, generator=gen).to(device, dt)
    g = F.logsigmoid(torch.randn(B, H, generator=gen)).to(device)
    beta = torch.sigmoid(torch.randn(B, H, generator=gen)).to(device, dt)
    state = torch.randn(B, H, Dk, Dv, generator=gen).to(device) * 0.01
    state_bytes = state.numel() * state.element_size()

    def gbs(row: dict[str, Any]) -> None:
        row["GB_per_s"] = 2 * state_bytes / (row["median_ms"] / 1e3) / 1e9
        if peak:
            row["hbm_peak_GB_per_s"] = peak
            row["fraction_of_hbm"] = row["GB_per_s"] / peak

    # the previous compiled step (matmul form, out of place: cuBLAS reads S, a fused update
    # reads S and writes a new one), for comparison
    old_compiled = torch.compile(rec._step_math, dynamic=False, fullgraph=True)
    qn, kn = l2norm(q.float()), l2norm(k.float())
    steps: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
        (
            "step[eager,in-place]",
            lambda s: rec.gated_delta_rule_step(q, k, v, g, beta, s, use_qk_l2norm=True, kernel="eager"),
        ),
        (
            "step[triton]",
            lambda s: rec.gated_delta_rule_step(q, k, v, g, beta, s, use_qk_l2norm=True, kernel="triton"),
        ),
        (
            "step[compile,fused]",
            lambda s: rec.gated_delta_rule_step(q, k, v, g, beta, s, use_qk_l2norm=True, kernel="compile"),
        ),
        (
            "step[compile,old matmul form]",
            lambda s: old_compiled(qn, kn, v.float(), g, beta.float(), s, Dk**-0.5),
        ),
    ]
    for label, fn in steps:
        row: dict[str, Any] = {
            "subject": label,
            "B": B,
            "HV": H,
            "Dk": Dk,
            "Dv": Dv,
            "state_MB": state_bytes / 2**20,
        }
        try:
            s = state.clone()
            with torch.no_grad():
                ref_o, _ = rec.gated_delta_rule_step(
                    q, k, v, g, beta, state.clone(), use_qk_l2norm=True, kernel="eager"
                )
                out = fn(state.clone())
                o_chk = out[0] if isinstance(out, tuple) else out
                row["rel_rms_vs_eager"] = rel_rms(o_chk.float(), ref_o.float())
                row.update(
                    _time_ms(lambda fn=fn, s=s: fn(s), iters=max(iters, 50), warmup=warmup + 3, device=device)
                )
            gbs(row)
            fails = rec.step_kernel_failures()
            if "triton" in label and not package_status("triton").available:
                fails["triton"] = "triton is not importable"
            if any(key in label for key in fails):
                row["fell_back_to_eager"] = {key: val for key, val in fails.items() if key in label}
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row))

    ok, why = fla_mod.fla_kernel_usable(device, dt, backward=False)
    row = {
        "subject": "fla.fused_recurrent",
        "B": B,
        "HV": H,
        "Dk": Dk,
        "Dv": Dv,
        "state_MB": state_bytes / 2**20,
    }
    if ok:
        try:
            import importlib

            fused = importlib.import_module("fla.ops.gated_delta_rule").fused_recurrent_gated_delta_rule
            q1, k1, v1 = q[:, None], k[:, None], v[:, None]
            g1, b1 = g[:, None], beta[:, None]

            def fla_step() -> None:
                fused(
                    q1, k1, v1, g=g1, beta=b1, initial_state=state, output_final_state=True,
                    use_qk_l2norm_in_kernel=True,
                )  # fmt: skip

            with torch.no_grad():
                row.update(_time_ms(fla_step, iters=max(iters, 50), warmup=warmup + 3, device=device))
            gbs(row)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    else:
        row["skipped"] = why
    rows.append(row)
    print(json.dumps(row))

    # whole layer, one token per step (projections + convs + step + norm + output)
    d_model = 256 if smoke else 2048
    for kernel in ("auto", "eager", "compile"):
        row = {"subject": f"GatedDeltaNet.decode_step[{kernel}]", "B": B, "d_model": d_model, "n_heads": H}
        try:
            m = GatedDeltaNet(d_model=d_model, n_heads=H, head_dim=Dk, dtype=dt, init_device=str(device))
            m.decode_kernel = kernel
            cache = m.init_cache(B)
            x = torch.randn(B, 1, d_model, device=device, dtype=dt)
            with torch.no_grad():
                row.update(
                    _time_ms(
                        lambda m=m, cache=cache, x=x: m(x, cache=cache),
                        iters=max(iters, 50),
                        warmup=warmup + 2,
                        device=device,
                    )
                )
            row["tokens_per_s"] = B / (row["median_ms"] / 1e3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row))
    return rows


# ------------------------------------------------------------------------------------------ main


def fingerprint(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["sm"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cudnn"] = torch.backends.cudnn.version()
    for mod, dist in (("triton", None), ("fla", "fla-core"), ("tilelang", None)):
        st = package_status(mod, dist)
        env[mod] = st.version if st.available else f"unavailable ({st.reason})"
    if device.type == "cuda":
        env["fla_backward_refusal"] = fla_mod.fla_backward_refusal(device.index or 0)
    return env


def _table(result: dict[str, Any]) -> str:
    lines = ["", "== Gated DeltaNet benchmark ==", f"device: {result['env'].get('gpu', 'cpu')}"]
    lines.append("")
    lines.append(
        "correctness (bf16 vs float64 reference, rel-RMS; budgets o/state 5e-3, dqkv 8e-3, dgate 2e-2)"
    )
    for r in result["correctness"]:
        if "skipped" in r:
            lines.append(f"  {r['kernel']:5s} skipped: {r['skipped']}")
            continue
        errs = r.get("rel_rms", {})
        worst = max(errs.items(), key=lambda kv: kv[1] / BUDGETS[kv[0]]) if errs else ("-", float("nan"))
        lines.append(
            f"  {r['kernel']:5s} {r['case']:16s} {'PASS' if r.get('pass') else 'FAIL'}  o={errs.get('o', float('nan')):.2e} "
            f"final={errs.get('final', float('nan')):.2e}  worst {worst[0]}={worst[1]:.2e}"
            + (f"  ({r['backward']})" if "backward" in r else "")
            + (f"  error: {r['error']}" if "error" in r else "")
        )
    lines.append("")
    lines.append(f"{'subject':36s} {'pass':8s} {'median ms':>10s} {'peak MB':>9s} {'TFLOP/s':>8s}")
    by = {}
    for r in result["speed"]:
        key = (r["subject"], r["pass"])
        by[key] = r
        if "skipped" in r:
            lines.append(f"{r['subject']:36s} {r['pass']:8s} skipped: {r['skipped']}")
        elif "error" in r:
            lines.append(f"{r['subject']:36s} {r['pass']:8s} error: {r['error'][:80]}")
        else:
            pk = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
            tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
            lines.append(f"{r['subject']:36s} {r['pass']:8s} {r['median_ms']:10.3f} {pk:>9s} {tf:>8s}")
    ours, old = f"ours:{HEADLINE_NEW}", f"ours:{HEADLINE_OLD}"
    sdpa = next((s for s, _ in by if s.startswith("sdpa[") and "median_ms" in by[(s, "fwd")]), None)
    ratios = {}
    for p in ("fwd", "fwd+bwd"):
        o = by.get((ours, p), {}).get("median_ms")
        for other in ("fla", sdpa, old):
            t = by.get((other, p), {}).get("median_ms") if other else None
            if o and t:
                ratios[f"{ours} / {other} {p}"] = o / t
    result["ratios"] = ratios
    if ratios:
        lines.append("")
        lines.extend(f"ratio {k}: {v:.2f}x" for k, v in ratios.items())
    lines.append("")
    for r in result.get("scan", []):
        if "error" in r:
            lines.append(f"{r['subject']:28s} C={r.get('chunk')} error: {r['error'][:80]}")
        elif "median_ms" in r:
            lines.append(
                f"{r['subject']:28s} C={r['chunk']:<4d} {r['median_ms']:8.3f} ms  {r['us_per_step']:6.2f} us/step  "
                f"{r['GFLOP_per_s']:7.0f} GFLOP/s"
            )
    lines.append("")
    for r in result["decode"]:
        if "skipped" in r:
            lines.append(f"{r['subject']:28s} skipped: {r['skipped'][:80]}")
        elif "error" in r:
            lines.append(f"{r['subject']:28s} error: {r['error'][:80]}")
        elif "GB_per_s" in r:
            frac = (
                f" ({100 * r['fraction_of_hbm']:.0f}% of {r['hbm_peak_GB_per_s']:.0f})"
                if "fraction_of_hbm" in r
                else ""
            )
            lines.append(
                f"{r['subject']:28s} {r['median_ms'] * 1e3:8.1f} us  {r['GB_per_s']:7.0f} GB/s{frac}"
                + (f"  (fell back to eager: {r['fell_back_to_eager']})" if "fell_back_to_eager" in r else "")
            )
        else:
            lines.append(
                f"{r['subject']:28s} {r['median_ms'] * 1e3:8.1f} us  {r['tokens_per_s']:.0f} tokens/s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few iterations")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "speed", "scan", "decode"])
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    iters = 3 if args.smoke else max(20, args.iters)
    warmup = 1 if args.smoke else args.warmup
    torch.manual_seed(0)
    result: dict[str, Any] = {"env": fingerprint(device), "smoke": args.smoke}
    print(json.dumps(result["env"]))
    failed = False
    for section, fn in (
        ("correctness", lambda: correctness(device, args.smoke)),
        ("speed", lambda: speed(device, args.smoke, iters, warmup)),
        ("scan", lambda: scan(device, args.smoke, iters, warmup)),
        ("decode", lambda: decode(device, args.smoke, iters, warmup)),
    ):
        if section in args.skip:
            result[section] = []
            continue
        try:
            result[section] = fn()
        except Exception as e:
            traceback.print_exc()
            result[section] = [{"error": f"{type(e).__name__}: {e}"}]
            failed = True
    table = _table(result)
    failed |= any(not r.get("pass", True) for r in result["correctness"] if "skipped" not in r)
    out = args.out
    if out is None:
        gpu = result["env"].get("gpu", "cpu").replace(" ", "_")
        out = ROOT / "benchmarks" / "results" / f"{gpu}-{_dt.date.today().isoformat()}-gdn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)
        )
    )
    print(table)
    print(f"\nJSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
