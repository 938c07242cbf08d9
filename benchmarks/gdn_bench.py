"""Gated DeltaNet: correctness and speed of our chunked kernel, side by side with
flash-linear-attention (when importable) and causal softmax attention (cuDNN SDPA).

1. Correctness (bf16, small T): our chunked kernel — and fla's forward (and backward where fla
   allows it) — against the float64 token-by-token reference (``reference.twins``), with
   flash-linear-attention's relative-RMS metric and budgets: output / final state < 5e-3,
   dq / dk / dv / d(initial state) < 8e-3, d(beta) / d(g) < 2e-2.
2. Speed at B=2, T=8192, H=16, Dk=128, Dv=256, bf16 (workload 5 of ``docs/benchmarks.md``):
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

from backend_bench import time_runs  # noqa: E402  (this folder: on sys.path when its scripts run)

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
    """Median / min / max milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs, by the
    backend benchmark's timer (CUDA: events around every run, runs back to back, one sync; a sync
    per run counted our ~0.5 ms of forward launch overhead as GPU time on the H200: 2.36 ms that way
    against 1.68 ms back to back)."""
    times = time_runs(lambda _i: fn(), iters=iters, warmup=warmup, cuda=device.type == "cuda")
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


# ----------------------------------------------------------------------------- our Triton kernels

TRITON = functools.partial(chunk_gated_delta_rule, kernel="triton")
TORCH_C64 = functools.partial(chunk_gated_delta_rule, kernel="torch")
FP32_BUDGET = 1e-4  # float32 inputs: exact float32 products, far below the bf16 budgets


def _deadline_left(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.monotonic()


def _f64_reference(inp: dict, cu, do, dfin) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 outputs and gradients from our PyTorch chunked kernel on the same device (itself
    checked against the token-by-token float64 twin in the CPU tests); for benchmark-sized shapes,
    where the token-by-token reference would take minutes."""
    names = ("q", "k", "v", "g", "beta", "h0")
    lv = {n: inp[n].detach().double().requires_grad_() for n in names}
    o, fin = chunk_gated_delta_rule(
        *[lv[n] for n in names[:5]], initial_state=lv["h0"], output_final_state=True, use_qk_l2norm=True,
        cu_seqlens=cu, kernel="torch",
    )  # fmt: skip
    ((o * do.double()).sum() + (fin * dfin.double()).sum()).backward()
    return o.detach(), fin.detach(), {n: lv[n].grad for n in names}


def _judge(res: dict, ro, rfin, rgrads, dtype: torch.dtype) -> dict[str, Any]:
    errs = {"o": rel_rms(res["o"], ro), "final": rel_rms(res["final"], rfin)}
    errs.update({n: rel_rms(res[n], rgrads[n]) for n in ("q", "k", "v", "g", "beta", "h0") if n in res})
    budget = (lambda k: FP32_BUDGET) if dtype == torch.float32 else (lambda k: BUDGETS[k])
    finite = all(bool(torch.isfinite(t).all()) for t in res.values() if isinstance(t, torch.Tensor))
    return {"rel_rms": errs, "finite": finite, "pass": finite and all(errs[k] < budget(k) for k in errs)}


def triton_correctness(device: torch.device, smoke: bool, deadline: float | None) -> list[dict[str, Any]]:
    """Ours (Triton) against float64 at small shapes (token-by-token twin) and at benchmark-sized
    shapes (our float64 PyTorch kernel), outputs and every gradient, chunk 64; fla's forward where
    it runs; document isolation (NaN planted in one document)."""
    out: list[dict[str, Any]] = []
    small = (1, 1, 2, 16, 32) if smoke else (2, 2, 4, 128, 256)
    B, H, HV, Dk, Dv = small
    cases: list[dict[str, Any]] = [
        {"name": "gva-negeig-h0", "B": B, "T": 100 if smoke else 300, "H": H, "HV": HV, "docs": None, "ref": "twin"},
        {"name": "docs-negeig-h0", "B": 1, "T": 0, "H": H, "HV": HV, "ref": "twin",
         "docs": [37, 0, 70, 23] if smoke else [100, 1, 0, 150, 79, 64, 65]},
    ]  # fmt: skip
    if not smoke:
        lens = _doc_lengths(16384, 8, seed=7)
        cases += [
            {"name": "bench-8k", "B": 2, "T": 8192, "H": 16, "HV": 16, "docs": None, "ref": "f64"},
            {"name": "bench-gva-docs", "B": 1, "T": 0, "H": 16, "HV": 32, "docs": lens, "ref": "f64"},
        ]
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if smoke else [torch.bfloat16, torch.float32]
    fla_fwd, fla_why = fla_mod.fla_kernel_usable(device, torch.bfloat16, backward=False)
    fla_bwd, fla_bwhy = fla_mod.fla_kernel_usable(device, torch.bfloat16, backward=True)
    for case in cases:
        if _deadline_left(deadline) < 30:
            out.append({"case": case["name"], "skipped": "time budget"})
            continue
        bb, T = case["B"], case["T"]
        if case["docs"]:
            T = sum(case["docs"])
        cu = _cu(case["docs"], device) if case["docs"] else None
        n_seq = len(case["docs"]) if case["docs"] else bb
        Dk_, Dv_ = (Dk, Dv) if case["ref"] == "twin" else (128, 256)
        for dt in dtypes if case["ref"] == "twin" else [torch.bfloat16]:
            row: dict[str, Any] = {
                "case": case["name"],
                "kernel": "ours:triton",
                "T": T,
                "dtype": str(dt)[6:],
            }
            try:
                inp = _gdr_inputs(
                    bb, T, case["H"], case["HV"], Dk_, Dv_, device=device, dtype=dt, n_seq=n_seq, seed=1
                )
                gen = torch.Generator().manual_seed(2)
                do = torch.randn(bb, T, case["HV"], Dv_, generator=gen).to(device)
                dfin = torch.randn(n_seq, case["HV"], Dk_, Dv_, generator=gen).to(device)
                if case["ref"] == "twin":
                    ro, rfin, rg = _reference(inp, cu, bb, T, do, dfin)
                else:
                    ro, rfin, rg = _f64_reference(inp, cu, do, dfin)
                res = _check(TRITON, inp, cu, do, dfin, True)
                row.update(_judge(res, ro, rfin, rg, dt))
                if dt == torch.bfloat16 and fla_fwd:
                    fr = _check(fla_mod.fla_chunk_gated_delta_rule, inp, cu, do, dfin, fla_bwd)
                    out.append({"case": case["name"], "kernel": "fla", "T": T, "dtype": "bfloat16",
                                **_judge(fr, ro, rfin, rg, dt),
                                **({} if fla_bwd else {"backward": f"not run: {fla_bwhy}"})})  # fmt: skip
                    print(json.dumps(out[-1]))
                del res, rg
            except Exception as e:
                row.update({"pass": False, "error": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
            out.append(row)
            print(json.dumps(row))
    if not fla_fwd:
        out.append({"kernel": "fla", "skipped": fla_why})
    # NaN planted in one document's v: other documents' outputs and gradients must be bit-identical
    row = {"case": "nan-isolation", "kernel": "ours:triton"}
    try:
        lens = [70, 129, 64, 33]
        cu = _cu(lens, device)
        inp = _gdr_inputs(1, sum(lens), 2, 4, 64, 64, device=device, dtype=torch.bfloat16, n_seq=4, seed=3)
        gen = torch.Generator().manual_seed(4)
        do = torch.randn(1, sum(lens), 4, 64, generator=gen).to(device)
        dfin = torch.randn(4, 4, 64, 64, generator=gen).to(device)
        clean = _check(TRITON, inp, cu, do, dfin, True)
        bad = {n: t.clone() for n, t in inp.items()}
        bad["v"][0, 70 + 5, 1, 3] = float("nan")  # document 1
        pois = _check(TRITON, bad, cu, do, dfin, True)
        keep = torch.ones(sum(lens), dtype=torch.bool, device=device)
        keep[70 : 70 + 129] = False
        same = {}
        for n in ("o", "q", "k", "v", "g", "beta"):
            same[n] = bool(torch.equal(clean[n][0, keep], pois[n][0, keep]))
        same["final"] = bool(torch.equal(clean["final"][[0, 2, 3]], pois["final"][[0, 2, 3]]))
        row.update({"identical_outside": same, "pass": all(same.values())})
    except Exception as e:
        row.update({"pass": False, "error": f"{type(e).__name__}: {e}"})
        traceback.print_exc()
    out.append(row)
    print(json.dumps(row))
    return out


def _first_call_s(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _shapes(smoke: bool) -> list[dict[str, Any]]:
    """Benchmark shapes: (label, B, T, H, HV, Dk, Dv, documents)."""
    if smoke:
        return [{"label": "smoke", "B": 1, "T": 256, "H": 2, "HV": 2, "Dk": 32, "Dv": 64, "docs": None}]
    return [
        {"label": "bench B2 T8k H16 Dv256", "B": 2, "T": 8192, "H": 16, "HV": 16, "Dk": 128, "Dv": 256, "docs": None},
        {"label": "B1 T32k H16 Dv256", "B": 1, "T": 32768, "H": 16, "HV": 16, "Dk": 128, "Dv": 256, "docs": None},
        {"label": "docs~2k T16k H16 Dv256", "B": 1, "T": 16384, "H": 16, "HV": 16, "Dk": 128, "Dv": 256, "docs": "lognormal2k"},
        {"label": "FlashQLA 8k H16/32 d128", "B": 1, "T": 8192, "H": 16, "HV": 32, "Dk": 128, "Dv": 128, "docs": None},
        {"label": "FlashQLA 32k H16/32 d128", "B": 1, "T": 32768, "H": 16, "HV": 32, "Dk": 128, "Dv": 128, "docs": None},
    ]  # fmt: skip


def _lognormal_docs(total: int, mean: int, seed: int) -> list[int]:
    """Log-normal document lengths (median ~``mean``), cut to sum to ``total``."""
    gen = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    while sum(lens) < total:
        lens.append(max(1, int(math.exp(math.log(mean) + 0.8 * float(torch.randn(1, generator=gen))))))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def _speed_shape(
    rows: list[dict[str, Any]],
    shp: dict[str, Any],
    with_torch: bool,
    device: torch.device,
    dt: torch.dtype,
    iters: int,
    warmup: int,
) -> None:
    """One shape of :func:`triton_speed` (rows appended to ``rows``)."""
    B, T, H, HV, Dk, Dv = (shp[k] for k in ("B", "T", "H", "HV", "Dk", "Dv"))
    lens = _lognormal_docs(B * T, 2048, seed=11) if shp["docs"] else None
    cu = _cu(lens, device) if lens else None
    inp = _gdr_inputs(B, T, H, HV, Dk, Dv, device=device, dtype=dt, requires_grad=True)
    leaves = [inp[n] for n in ("q", "k", "v", "g", "beta")]
    do = torch.randn(B, T, HV, Dv, device=device, dtype=dt)
    base = {"shape": shp["label"], "B": B, "T": T, "H": H, "HV": HV, "Dk": Dk, "Dv": Dv}
    if lens:
        base.update({"n_docs": len(lens), "longest_doc": max(lens)})

    def record(name: str, kind: str, fn: Callable, **extra: Any) -> None:
        row: dict[str, Any] = {"subject": name, "pass": kind, **base, **extra}
        try:
            row.update(_time_ms(fn, iters=iters, warmup=warmup, device=device))
            row["peak_mb"] = _peak_mb(fn, device)
            row["tokens_per_s"] = B * T / (row["median_ms"] / 1e3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row))

    def ours(fn=TRITON) -> torch.Tensor:
        return fn(*leaves, use_qk_l2norm=True, cu_seqlens=cu)[0]

    if not rows or all(r.get("subject") != "ours:triton" for r in rows):
        try:
            first_f = _first_call_s(lambda: ours(), device)
            first_b = _first_call_s(_fwd_bwd(ours, leaves, do), device)
            rows.append({"subject": "ours:triton", "pass": "first call", **base,
                         "first_fwd_s": first_f, "first_fwd_bwd_s": first_b})  # fmt: skip
            print(json.dumps(rows[-1]))
        except Exception as e:
            rows.append(
                {
                    "subject": "ours:triton",
                    "pass": "first call",
                    **base,
                    "error": f"{type(e).__name__}: {e}",
                }
            )
            traceback.print_exc()
    with torch.no_grad():
        record("ours:triton", "fwd", ours)
    record("ours:triton", "fwd[train]", ours)  # grad on: keeps what the backward reads
    record("ours:triton", "fwd+bwd", _fwd_bwd(ours, leaves, do))
    ok_f, why_f = fla_mod.fla_kernel_usable(device, dt, backward=False)
    ok_b, why_b = fla_mod.fla_kernel_usable(device, dt, backward=True)
    if ok_f:

        def fla_fwd() -> torch.Tensor:
            return fla_mod.fla_chunk_gated_delta_rule(*leaves, use_qk_l2norm=True, cu_seqlens=cu)[0]

        with torch.no_grad():
            record("fla", "fwd", fla_fwd)
        if ok_b:
            record("fla", "fwd+bwd", _fwd_bwd(fla_fwd, leaves, do))
        else:
            rows.append({"subject": "fla", "pass": "fwd+bwd", **base, "skipped": why_b})
    else:
        rows.append({"subject": "fla", "pass": "fwd", **base, "skipped": why_f})
    if with_torch:
        with torch.no_grad():
            record("ours:torch[C=64]", "fwd", lambda: ours(TORCH_C64))
        record("ours:torch[C=64]", "fwd+bwd", _fwd_bwd(lambda: ours(TORCH_C64), leaves, do))
    # causal softmax attention, same width: Hq = Hkv = HV heads of Dk
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qa, ka, va = (
            torch.randn(B, HV, T, Dk, device=device, dtype=dt, requires_grad=True) for _ in range(3)
        )
        dso = torch.randn(B, HV, T, Dk, device=device, dtype=dt)

        def attn() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qa, ka, va, is_causal=True)

        with torch.no_grad():
            record("sdpa[cudnn]", "fwd", attn)
        record("sdpa[cudnn]", "fwd+bwd", _fwd_bwd(attn, [qa, ka, va], dso))
        del qa, ka, va


def triton_speed(
    device: torch.device,
    smoke: bool,
    iters: int,
    warmup: int,
    deadline: float | None,
    shapes: list[str] | None,
) -> list[dict[str, Any]]:
    """Ours (Triton) forward and forward+backward, fla's forward, cuDNN causal attention of the
    same width, our PyTorch kernel (headline shape only), at each shape; peak memory; first-call
    (compile) time of ours."""
    rows: list[dict[str, Any]] = []
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shp in _shapes(smoke):
        if shapes and not any(key in shp["label"] for key in shapes):
            continue
        if _deadline_left(deadline) < 20:
            rows.append({"shape": shp["label"], "skipped": "time budget"})
            continue
        _speed_shape(rows, shp, shp is _shapes(smoke)[0] or smoke, device, dt, iters, warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _stage_times(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> dict[str, float]:
    """Milliseconds per Triton stage of ``fn`` (median over ``reps``): CUDA events at each launch."""
    from olmo_attn.recurrent import triton_chunk as tc

    per: dict[str, list[float]] = {}
    for _ in range(reps):
        marks: list[tuple[str, Any]] = []

        def hook(name: str, marks=marks) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((name, ev))

        tc._STAGE_HOOK.append(hook)
        try:
            fn()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        finally:
            tc._STAGE_HOOK.remove(hook)
        end.synchronize()
        seen: dict[str, float] = {}
        for (name, ev), nxt in zip(marks, [m[1] for m in marks[1:]] + [end]):
            key = name
            i = 2
            while key in seen:
                key, i = f"{name}#{i}", i + 1
            seen[key] = ev.elapsed_time(nxt)
        for key, val in seen.items():
            per.setdefault(key, []).append(val)
    return {k: statistics.median(v) for k, v in per.items()}


def _bench_leaves(device: torch.device, smoke: bool):
    B, T, H, Dk, Dv = (1, 256, 2, 32, 64) if smoke else (2, 8192, 16, 128, 256)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = _gdr_inputs(B, T, H, H, Dk, Dv, device=device, dtype=dt, requires_grad=True)
    leaves = [inp[n] for n in ("q", "k", "v", "g", "beta")]
    do = torch.randn(B, T, H, Dv, device=device, dtype=dt)

    def fwd() -> torch.Tensor:
        return TRITON(*leaves, use_qk_l2norm=True)[0]

    return fwd, _fwd_bwd(fwd, leaves, do), leaves


def triton_stages(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    """Per-kernel time of ours at the benchmark shape (forward+backward, stage = launch to launch)."""
    if device.type != "cuda":
        return []
    _fwd, fb, _ = _bench_leaves(device, smoke)
    fb()
    row = {"subject": "ours:triton stages fwd+bwd", "stages_ms": _stage_times(fb, device)}
    print(json.dumps(row))
    return [row]


def _kernel_times(fn: Callable[[], Any], reps: int) -> list[dict[str, Any]]:
    """GPU time of each kernel ``fn`` launches (``torch.profiler``, CUPTI): name, calls per ``fn``
    call, microseconds per call, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":  # a kernel (or memcpy / memset) on the GPU's timeline
            us = ev.device_time_total  # its elapsed time
            if us > 0:
                per.setdefault(ev.name, []).append(us)
    rows = [{"kernel": name[:120], "calls": len(ts) / reps, "us": sum(ts) / reps} for name, ts in per.items()]
    return sorted(rows, key=lambda r: -r["us"])


def kernel_profile(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    """Per-kernel GPU time at the benchmark shape: ours (forward without grad, forward+backward)
    and fla's forward, each with its total, so a stage can be compared kernel by kernel."""
    if device.type != "cuda":
        return []
    fwd, fb, leaves = _bench_leaves(device, smoke)
    subjects: list[tuple[str, Callable[[], Any]]] = [("ours:triton fwd", fwd), ("ours:triton fwd+bwd", fb)]
    ok_f, _why = fla_mod.fla_kernel_usable(device, leaves[0].dtype, backward=False)
    if ok_f:
        subjects.append(
            ("fla fwd", lambda: fla_mod.fla_chunk_gated_delta_rule(*leaves, use_qk_l2norm=True)[0])
        )
    rows = []
    for label, fn in subjects:
        ctx = torch.no_grad() if label.endswith(" fwd") else contextlib.nullcontext()
        with ctx:
            kernels = _kernel_times(fn, reps=5)
        row = {"subject": label, "total_us": sum(k["us"] for k in kernels), "kernels": kernels}
        print(json.dumps(row))
        rows.append(row)
    return rows


TUNE_CANDIDATES = {  # largest stages first (a time budget cuts the tail); the default kernel choices' stages
    "wy_bwd": [(8, 1), (4, 2), (8, 2), (16, 1)],
    "state_out": [(4, 2), (8, 2), (4, 3), (8, 1)],
    "dqkwg": [(8, 3), (8, 2), (4, 2), (16, 2)],
    "dstate": [(8, 2), (4, 2), (8, 1), (4, 3)],
    "prep": [(4, 2), (2, 2), (8, 2), (4, 1)],
    "dv_local": [(4, 2), (8, 2), (4, 3)],
}
TILE_CANDIDATES = {
    "state_values": [8192, 4096, 16384],
    "dstate_values": [8192, 4096],
    "state_out_values": [8192, 4096, 2048],
    "chunk_bv": [64, 128, 32],
}


def triton_tune(device: torch.device, smoke: bool, deadline: float | None) -> list[dict[str, Any]]:
    """For each kernel, each (num_warps, num_stages) candidate: its stage time at the benchmark
    shape (forward+backward); tile widths likewise. Each candidate is checked against the default
    settings' results (bitwise equality is not expected; rel-RMS of o and grads). Stops at the
    time budget; leaves the defaults in place."""
    if device.type != "cuda":
        return []
    from olmo_attn.recurrent import triton_chunk as tc

    rows: list[dict[str, Any]] = []
    _fwd, fb, leaves = _bench_leaves(device, smoke)
    fb()
    ref = [t.grad.clone() for t in leaves]
    for name, cands in TUNE_CANDIDATES.items():
        default = dict(tc.LAUNCH[name])
        for nw, ns in cands:
            if _deadline_left(deadline) < 15:
                rows.append({"kernel": name, "skipped": "time budget"})
                break
            tc.LAUNCH[name] = {"num_warps": nw, "num_stages": ns}
            row: dict[str, Any] = {"kernel": name, "num_warps": nw, "num_stages": ns}
            try:
                fb()
                row["max_grad_rel_rms_vs_default"] = max(rel_rms(t.grad, r) for t, r in zip(leaves, ref))
                st = _stage_times(fb, device, reps=3)
                row["stage_ms"] = sum(v for k, v in st.items() if k.split("#")[0] == name)
                row["total_ms"] = sum(st.values())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row))
        tc.LAUNCH[name] = default
    for name, cands in TILE_CANDIDATES.items():
        default_t = tc.TILES[name]
        for val in cands:
            if _deadline_left(deadline) < 15:
                break
            tc.TILES[name] = val
            row = {"tile": name, "value": val}
            try:
                fb()
                row["max_grad_rel_rms_vs_default"] = max(rel_rms(t.grad, r) for t, r in zip(leaves, ref))
                st = _stage_times(fb, device, reps=3)
                row["stages_ms"] = st
                row["total_ms"] = sum(st.values())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row))
        tc.TILES[name] = default_t
    return rows


# (label, FUSED overrides, TILES overrides, LAUNCH overrides)
CHOICES: list[tuple[str, dict[str, bool], dict[str, int], dict[str, dict[str, int]]]] = [
    ("default", {}, {}, {}),
    ("recompute states", {"keep_states": False}, {}, {}),
    ("separate prep kernels", {"prep": False}, {}, {}),
    ("separate out kernel", {"out": False}, {}, {}),
    ("state+out BV64", {}, {"state_out_values": 8192}, {}),
    ("state/dstate BV32", {}, {"state_values": 4096, "dstate_values": 4096}, {}),
    ("state BV32 (dstate 64)", {}, {"state_values": 4096}, {}),
    ("chunk spans loaded in the recurrences", {"seq_offsets": False}, {}, {}),
    (
        "recurrences num_stages 3",
        {},
        {},
        {k: {"num_stages": 3} for k in ("state", "state_out", "dstate")},
    ),
    (
        "recurrences num_stages 1",
        {},
        {},
        {k: {"num_stages": 1} for k in ("state", "state_out", "dstate")},
    ),
    ("prep: 16x16, num_warps 8", {}, {}, {"prep": {"num_warps": 8}}),
    ("prep: W/U from T re-read", {}, {"prep_wu": 1}, {}),
    ("prep: W/U from T re-read, w8", {}, {"prep_wu": 1}, {"prep": {"num_warps": 8}}),
    ("prep: W/U from T re-read, s1", {}, {"prep_wu": 1}, {"prep": {"num_stages": 1}}),
    ("prep: W/U from T re-read, P stored for the read-out", {"pre_p": True}, {"prep_wu": 1}, {}),
    ("prep: A and T, then _wu", {}, {"prep_wu": 2}, {}),
    ("prep: A and T, then _wu storing P for the read-out", {"pre_p": True}, {"prep_wu": 2}, {}),
    ("prep: A and T w8, then _wu", {}, {"prep_wu": 2}, {"prep": {"num_warps": 8}}),
    ("prep: A and T, then _wu w8", {}, {"prep_wu": 2}, {"wu": {"num_warps": 8}}),
    ("separate prep kernels, solve w8", {"prep": False}, {}, {"solve": {"num_warps": 8}}),
    ("dqkwg: key tiles of 64, w8s2", {}, {"dqkwg_key_tile": 64}, {"dqkwg": {"num_stages": 2}}),
    (
        "dqkwg: key tiles of 64, w4s2",
        {},
        {"dqkwg_key_tile": 64},
        {"dqkwg": {"num_warps": 4, "num_stages": 2}},
    ),
    (
        "dqkwg: key tiles of 32, w4s2",
        {},
        {"dqkwg_key_tile": 32},
        {"dqkwg": {"num_warps": 4, "num_stages": 2}},
    ),
    ("separate prep kernels, solve w2", {"prep": False}, {}, {"solve": {"num_warps": 2}}),
    ("wy_bwd: key tiles of 64, w4s1", {}, {"wy_key_tile": 64}, {"wy_bwd": {"num_stages": 1}}),
    ("wy_bwd: key tiles of 32, w8s1", {}, {}, {"wy_bwd": {"num_warps": 8, "num_stages": 1}}),
    ("wy_bwd: key tiles of 64, w4s2", {}, {"wy_key_tile": 64}, {}),
    ("wy_bwd: key tiles of 32, w4s1", {}, {}, {"wy_bwd": {"num_stages": 1}}),
    ("state_out: value tiles of 16", {}, {"state_out_values": 2048}, {}),
    ("dqkwg w4s2", {}, {}, {"dqkwg": {"num_warps": 4, "num_stages": 2}}),
    ("dstate w4s2", {}, {}, {"dstate": {"num_warps": 4, "num_stages": 2}}),
]


def triton_choices(
    device: torch.device,
    smoke: bool,
    iters: int,
    warmup: int,
    deadline: float | None,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Each kernel choice of ``triton_chunk.FUSED`` / ``TILES`` against the defaults, on the same
    inputs at the benchmark shape: accuracy against float64 (bf16 budgets; outputs and every
    gradient), forward (no grad) and forward+backward milliseconds, peak memory of each. ``only``:
    substrings of the labels to run (``"default"`` always runs, as the yardstick)."""
    if device.type != "cuda" and not smoke:
        return []
    from olmo_attn.recurrent import triton_chunk as tc

    B, T, H, Dk, Dv = (1, 256, 2, 32, 64) if smoke else (2, 8192, 16, 128, 256)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = _gdr_inputs(B, T, H, H, Dk, Dv, device=device, dtype=dt, seed=1)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, Dv, generator=gen).to(device)
    dfin = torch.randn(B, H, Dk, Dv, generator=gen).to(device)
    ro, rfin, rg = _f64_reference(inp, None, do, dfin)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inp.items()}
    args = [leaves[n] for n in ("q", "k", "v", "g", "beta")]
    do_dt = do.to(dt)

    def fwd() -> torch.Tensor:
        return TRITON(*args, use_qk_l2norm=True)[0]

    rows: list[dict[str, Any]] = []
    saved = (dict(tc.FUSED), dict(tc.TILES), {k: dict(v) for k, v in tc.LAUNCH.items()})
    for label, fused, tiles, launch in CHOICES:
        if only and label != "default" and not any(o in label for o in only):
            continue
        if _deadline_left(deadline) < 20:
            rows.append({"choice": label, "skipped": "time budget"})
            continue
        tc.FUSED.update(fused)
        tc.TILES.update(tiles)
        for k, v in launch.items():
            tc.LAUNCH[k].update(v)
        row: dict[str, Any] = {"choice": label, "fused": dict(tc.FUSED), "tiles": dict(tc.TILES)}
        if launch:
            row["launch"] = {k: dict(tc.LAUNCH[k]) for k in launch}
        try:
            res = _check(TRITON, inp, None, do, dfin, True)
            row.update(_judge(res, ro, rfin, rg, dt))
            del res
            with torch.no_grad():
                row["fwd"] = _time_ms(fwd, iters=iters, warmup=warmup, device=device)
                row["fwd_peak_mb"] = _peak_mb(fwd, device)
            fb = _fwd_bwd(fwd, args, do_dt)
            row["fwd+bwd"] = _time_ms(fb, iters=iters, warmup=warmup, device=device)
            row["fwd+bwd_peak_mb"] = _peak_mb(fb, device)
            if device.type == "cuda":
                row["stages_ms"] = _stage_times(fb, device, reps=3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
        finally:
            tc.FUSED.clear()
            tc.FUSED.update(saved[0])
            tc.TILES.clear()
            tc.TILES.update(saved[1])
            for k, v in saved[2].items():
                tc.LAUNCH[k].clear()
                tc.LAUNCH[k].update(v)
        rows.append(row)
        print(json.dumps(row))
    return rows


def layer_speed(device: torch.device, smoke: bool, iters: int, warmup: int) -> list[dict[str, Any]]:
    """The whole ``GatedDeltaNet`` layer (projections, short convolutions, gates, kernel, norm)
    forward and forward+backward in tokens/s, next to our causal ``Attention`` layer of the same
    width (d_model 2048, 16 heads of 128, no RoPE) and default backend. bf16 parameters and inputs."""
    from olmo_attn import Attention

    d_model, H, Dk = (128, 2, 32) if smoke else (2048, 16, 128)
    B, T = (1, 256) if smoke else (2, 8192)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev = str(device)
    rows: list[dict[str, Any]] = []
    subjects: list[tuple[str, Callable[[], torch.nn.Module]]] = [
        (f"GatedDeltaNet[{b}]", functools.partial(
            GatedDeltaNet, d_model=d_model, n_heads=H, head_dim=Dk, dtype=dt, init_device=dev, backend=b))
        for b in (("triton", "torch") if device.type == "cuda" else ("torch",))
    ]  # fmt: skip
    subjects.append(
        ("Attention[causal]", functools.partial(
            Attention, d_model=d_model, n_heads=H, head_dim=Dk, bias=False, dtype=dt, init_device=dev))
    )  # fmt: skip
    x = torch.randn(B, T, d_model, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(B, T, d_model, device=device, dtype=dt)
    for name, make in subjects:
        base = {"subject": name, "B": B, "T": T, "d_model": d_model, "n_heads": H, "head_dim": Dk}
        try:
            m = make()
            if hasattr(m, "init_weights"):
                m.init_weights(init_method="normal", d_model=d_model, block_idx=0, num_blocks=1)
            params = [p for p in m.parameters() if p.requires_grad]
        except Exception as e:
            rows.append({**base, "error": f"{type(e).__name__}: {e}"})
            continue
        for kind in ("fwd", "fwd+bwd"):
            row = {**base, "pass": kind}
            try:
                if kind == "fwd":

                    def fn(m=m) -> Any:
                        with torch.no_grad():
                            return m(x)
                else:

                    def fn(m=m, params=params) -> None:
                        x.grad = None
                        for p in params:
                            p.grad = None
                        m(x).backward(dy)

                row.update(_time_ms(fn, iters=max(5, iters // 2), warmup=warmup, device=device))
                row["tokens_per_s"] = B * T / (row["median_ms"] / 1e3)
                row["peak_mb"] = _peak_mb(fn, device)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row))
        del m, params
    return rows


def _triton_table(result: dict[str, Any]) -> str:
    lines = ["", "== Gated DeltaNet: our Triton kernels ==", f"device: {result['env'].get('gpu', 'cpu')}", ""]
    lines.append(
        "correctness vs float64 (rel-RMS; bf16/fp16 budgets o/state 5e-3, dqkv 8e-3, dgate 2e-2; fp32 1e-4)"
    )
    for r in result.get("triton_correctness", []):
        if "skipped" in r:
            lines.append(f"  {r.get('kernel', r.get('case', '')):12s} skipped: {r['skipped'][:90]}")
            continue
        errs = r.get("rel_rms", {})
        worst = max(errs.items(), key=lambda kv: kv[1] / BUDGETS[kv[0]]) if errs else ("-", float("nan"))
        extra = f"  identical outside: {r['identical_outside']}" if "identical_outside" in r else ""
        lines.append(
            f"  {r.get('kernel', ''):12s} {r.get('case', ''):16s} {r.get('dtype', ''):9s} {'PASS' if r.get('pass') else 'FAIL'}"
            f"  o={errs.get('o', float('nan')):.1e} final={errs.get('final', float('nan')):.1e} worst {worst[0]}={worst[1]:.1e}"
            + extra
            + (f"  error: {r['error'][:120]}" if "error" in r else "")
        )
    lines.append("")
    lines.append(f"{'shape':26s} {'subject':18s} {'pass':10s} {'median ms':>10s} {'peak MB':>9s}")
    for r in result.get("triton_speed", []):
        if "first_fwd_s" in r:
            lines.append(
                f"{r['shape']:26s} {r['subject']:18s} first call: fwd {r['first_fwd_s']:.1f} s, fwd+bwd {r['first_fwd_bwd_s']:.1f} s"
            )
        elif "skipped" in r:
            lines.append(
                f"{r.get('shape', ''):26s} {r.get('subject', ''):18s} {r.get('pass', ''):10s} skipped: {r['skipped'][:70]}"
            )
        elif "error" in r:
            lines.append(
                f"{r.get('shape', ''):26s} {r.get('subject', ''):18s} {r.get('pass', ''):10s} error: {r['error'][:70]}"
            )
        elif "median_ms" in r:
            pk = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
            lines.append(
                f"{r['shape']:26s} {r['subject']:18s} {r['pass']:10s} {r['median_ms']:10.3f} {pk:>9s}"
            )
    if result.get("layer"):
        lines.append("")
        for r in result["layer"]:
            if "median_ms" in r:
                lines.append(
                    f"layer {r['subject']:26s} {r['pass']:8s} {r['median_ms']:9.3f} ms  {r['tokens_per_s']:12.0f} tokens/s"
                )
            elif "error" in r:
                lines.append(f"layer {r['subject']:26s} {r.get('pass', ''):8s} error: {r['error'][:80]}")
    for r in result.get("triton_stages", []):
        lines.append("")
        lines.append("stages (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms"].items()))
    best: dict[str, tuple[float, str]] = {}
    for r in result.get("triton_tune", []):
        if "stage_ms" in r:
            cur = best.get(r["kernel"])
            if cur is None or r["stage_ms"] < cur[0]:
                best[r["kernel"]] = (r["stage_ms"], f"w{r['num_warps']}s{r['num_stages']}")
        if "tile" in r and "total_ms" in r:
            lines.append(f"tile {r['tile']}={r['value']}: total {r['total_ms']:.3f} ms")
    if best:
        lines.append(
            "best launch per kernel: " + ", ".join(f"{k} {v[1]} {v[0]:.3f}" for k, v in best.items())
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def fingerprint(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "timing": "back-to-back CUDA events, one sync per series",
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
    from olmo_attn.recurrent import triton_chunk as tc

    env["kernel_choices"] = {"fused": dict(tc.FUSED), "tiles": dict(tc.TILES)}
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


SECTIONS = (
    "triton_correctness",
    "triton_speed",
    "triton_stages",
    "kernel_profile",
    "triton_choices",
    "layer",
    "triton_tune",
    "correctness",
    "speed",
    "scan",
    "decode",
)
DEFAULT_SECTIONS = (
    "triton_correctness",
    "triton_speed",
    "triton_stages",
    "triton_choices",
    "correctness",
    "decode",
)


def _apply_settings(items: list[str]) -> None:
    """``--set``: override ``triton_chunk.FUSED`` / ``TILES`` / ``LAUNCH`` entries for this run."""
    from olmo_attn.recurrent import triton_chunk as tc

    for item in items:
        key, _, val = item.partition("=")
        if key in tc.FUSED:
            tc.FUSED[key] = val.lower() in ("1", "true", "on", "yes")
        elif key in tc.TILES:
            tc.TILES[key] = int(val)
        elif "." in key and key.split(".")[0] in tc.LAUNCH:
            name, opt = key.split(".", 1)
            tc.LAUNCH[name][opt] = int(val)
        else:
            raise SystemExit(
                f"--set {item}: unknown key {key!r} (FUSED {list(tc.FUSED)}, TILES {list(tc.TILES)})"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few iterations")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sections", nargs="*", default=list(DEFAULT_SECTIONS), choices=SECTIONS)
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    ap.add_argument(
        "--shapes", nargs="*", default=None, help="substrings of the shape labels to run (triton_speed)"
    )
    ap.add_argument(
        "--choices", nargs="*", default=None, help="substrings of the choice labels to run (triton_choices)"
    )
    ap.add_argument("--budget", type=float, default=None, help="seconds; later sections stop early past it")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="kernel choices for the whole run: FUSED keys (prep, out, keep_states, wy_lowp, seq_offsets, "
        "pre_p) =0/1, TILES keys (state_values, state_out_values, chunk_bv, wy_key_tile, prep_wu, "
        "dqkwg_key_tile) = int, LAUNCH: kernel.num_warps=N",
    )
    ap.add_argument(
        "--write-order",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="derive this architecture's GatedDeltaNet kernel order from this run (triton_speed rows, "
        "correctness verdicts) and write it (default: the package's recurrent/kernel_order.json)",
    )
    args = ap.parse_args(argv)
    _apply_settings(args.set)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    iters = 3 if args.smoke else max(10, args.iters)
    warmup = 1 if args.smoke else args.warmup
    deadline = None if args.budget is None else time.monotonic() + args.budget
    torch.manual_seed(0)
    result: dict[str, Any] = {"env": fingerprint(device), "smoke": args.smoke}
    print(json.dumps(result["env"]))
    failed = False
    runners = {
        "triton_correctness": lambda: triton_correctness(device, args.smoke, deadline),
        "triton_speed": lambda: triton_speed(device, args.smoke, iters, warmup, deadline, args.shapes),
        "triton_stages": lambda: triton_stages(device, args.smoke),
        "kernel_profile": lambda: kernel_profile(device, args.smoke),
        "triton_tune": lambda: triton_tune(device, args.smoke, deadline),
        "triton_choices": lambda: triton_choices(device, args.smoke, iters, warmup, deadline, args.choices),
        "layer": lambda: layer_speed(device, args.smoke, iters, warmup),
        "correctness": lambda: correctness(device, args.smoke),
        "speed": lambda: speed(device, args.smoke, iters, warmup),
        "scan": lambda: scan(device, args.smoke, iters, warmup),
        "decode": lambda: decode(device, args.smoke, iters, warmup),
    }
    for section in SECTIONS:
        result.setdefault(section, [])
        if section not in args.sections or section in args.skip:
            continue
        if _deadline_left(deadline) < 10:
            result[section] = [{"skipped": "time budget"}]
            continue
        t0 = time.monotonic()
        try:
            result[section] = runners[section]()
        except Exception as e:
            traceback.print_exc()
            result[section] = [{"error": f"{type(e).__name__}: {e}"}]
            failed = True
        print(f"== section {section}: {time.monotonic() - t0:.1f} s", flush=True)
        out = _write(result, args.out)
    table = ""
    for make in (_table, _triton_table):
        try:
            table += make(result) + "\n"
        except Exception as e:  # a malformed row must not hide the rest
            table += f"({make.__name__} failed: {type(e).__name__}: {e})\n"
    failed |= any(
        not r.get("pass", True)
        for sec in ("correctness", "triton_correctness")
        for r in result[sec]
        if "skipped" not in r
    )
    out = _write(result, args.out)
    if args.write_order is not None:
        from gdn_order import arch_of  # this folder (on sys.path when its scripts run)

        from olmo_attn.recurrent import kernel_order as ko

        arch = arch_of(result)
        if device.type != "cuda" or not result.get("triton_speed") or arch is None:
            print("--write-order: needs a GPU run with the triton_speed section; nothing written")
        else:
            path = ko.write_order(
                arch,
                ko.derive([result]),
                source=f"benchmarks/gdn_bench.py ({out.name})",
                path=args.write_order or None,
            )
            print(f"kernel order for {arch} -> {path}")
    print(table)
    print(f"\nJSON: {out}")
    return 1 if failed else 0


def _write(result: dict[str, Any], out: Path | None) -> Path:
    """Write the results so far (after every section: a run cut short keeps what it measured)."""
    if out is None:
        gpu = result["env"].get("gpu", "cpu").replace(" ", "_")
        out = ROOT / "benchmarks" / "results" / f"{gpu}-{_dt.date.today().isoformat()}-gdn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)
        )
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
