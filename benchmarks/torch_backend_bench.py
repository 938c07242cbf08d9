"""TorchAttentionBackend speed, side by side with plain SDPA-cuDNN in the same run.

Workloads (docs/benchmarks.md): causal, sliding window 4096, packed documents with long-tailed lengths,
and sliding window + documents, at B2 T8192 Hq32 Hkv8 D128 bf16 on CUDA. For each: forward and
forward+backward, CUDA events, warm-up, median of ``--iters`` (>= 20) runs, random inputs. FLOPs
count only allowed (query, key) pairs: forward ``4·B·Hq·D·pairs``, backward ``2.5×`` forward.

Rows per workload:
  ``torch``            our backend (SDPA for causal, FlexAttention for the rest; documents with
                       ``DOCUMENT_KERNEL`` = ``flex`` and, as ``torch[varlen]``, ``varlen``)
  ``sdpa_cudnn``       plain causal ``F.scaled_dot_product_attention`` under
                       ``sdpa_kernel(CUDNN_ATTENTION)`` (same shape; the speed anchor)
  ``dense_mask``       what OLMo-core's torch backend does for masks: repeat K/V heads and pass a
                       dense T×T boolean mask to SDPA

Usage::

    python benchmarks/torch_backend_bench.py --out benchmarks/results/h100-$(date +%F).json
    python benchmarks/torch_backend_bench.py --smoke --out /tmp/smoke.json   # tiny, runs on CPU
"""

from __future__ import annotations

import argparse
import datetime
import itertools
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olmo_attn.backends.torch_backend import TorchAttentionBackend
from olmo_attn.ops import torch_kernel
from olmo_attn.ops.kernel import KernelCall
from olmo_attn.ops.masking import allowed_pairs, build_mask_index


def long_tailed_docs(batch: int, seq_len: int, seed: int, min_len: int = 16) -> list[int]:
    """``cu_doc_lens`` over the flattened batch: Pareto-distributed lengths (many short, a few long), per row."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for b in range(batch):
        pos = 0
        while pos < seq_len:
            u = float(torch.rand((), generator=g))
            length = int(min_len / (1.0 - u) ** (1 / 1.1))  # Pareto(alpha=1.1, x_min=min_len)
            length = min(max(length, 1), seq_len - pos)
            pos += length
            cu.append(b * seq_len + pos)
    return cu


def count_pairs(tokens: int, seq_len: int, window: tuple[int, int], cu: list[int] | None) -> int:
    """Allowed (query, key) pairs of the whole batch, computed blockwise (no T×T mask)."""
    if cu is None:
        call = KernelCall(scale=1.0, causal=True, window=window)
        index = build_mask_index(call, tq=seq_len, tk=seq_len, device="cpu")
        return int(allowed_pairs(index, 512, 512)[0]) * (tokens // seq_len)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    call = KernelCall(scale=1.0, causal=True, window=window, cu_seqlens_q=cu_t, cu_seqlens_k=cu_t)
    return int(allowed_pairs(build_mask_index(call, tq=tokens, tk=tokens, device="cpu"), 512, 512)[0])


def timer(device: torch.device, warmup: int, iters: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""

    def run(fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
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
        return statistics.median(times)

    return run


def dense_mask_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """OLMo-core style: repeat kv heads, SDPA with a dense ``[T, T]`` (or ``[B, 1, T, T]``) bool mask."""
    g = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def dense_mask(
    T: int, B: int, window: tuple[int, int], cu: list[int] | None, device: torch.device
) -> torch.Tensor:
    i = torch.arange(T, device=device)
    m = i[None, :] <= i[:, None]
    if window[0] >= 0:
        m &= i[None, :] >= i[:, None] - window[0]
    if cu is None:
        return m
    seg = torch.searchsorted(
        torch.tensor(cu[1:], device=device), torch.arange(B * T, device=device), right=True
    )
    seg = seg.view(B, T)
    return (m[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]  # [B, 1, T, T]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per measurement (>= 20 on GPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--skip-dense-mask", action="store_true", help="skip the OLMo-core-style dense mask rows")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        B, T, Hq, Hkv, D, W = 1, 512, 4, 2, 32, 128
        iters, warmup = args.iters or 3, args.warmup or 1
    else:
        B, T, Hq, Hkv, D, W = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim, args.window
        iters, warmup = args.iters or 25, args.warmup or 5
        if device.type == "cuda" and iters < 20:
            raise SystemExit(f"--iters={iters}: speed figures are the median of >= 20 runs")
    scale = 1.0 / math.sqrt(D)
    tokens = B * T
    window = (W - 1, 0)
    cu_docs = long_tailed_docs(B, T, seed=0, min_len=16 if not args.smoke else 4)
    measure = timer(device, warmup, iters)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    dout = torch.randn(B, T, Hq, D, device=device, dtype=dtype, generator=g)

    def fwd_bwd(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            q.grad = k.grad = v.grad = None
            f().backward(dout)

        return run

    def no_grad(f: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return f()

        return run

    workloads = {
        "causal": ((-1, -1), None),
        f"swa{W}": (window, None),
        "documents": ((-1, -1), cu_docs),
        f"swa{W}+documents": (window, cu_docs),
    }
    causal_pairs = count_pairs(tokens, T, (-1, -1), None)
    results: list[dict[str, Any]] = []

    def record(workload: str, impl: str, pairs: int, f: Callable[[], torch.Tensor]) -> None:
        row: dict[str, Any] = {"workload": workload, "impl": impl, "pairs": pairs}
        flops = 4 * Hq * D * pairs  # pairs are summed over the batch
        try:
            row["fwd_ms"] = measure(no_grad(f))
            row["fwdbwd_ms"] = measure(fwd_bwd(f))
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
        except Exception as e:  # a path this PyTorch/GPU lacks: report, keep going
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(row)
        print(json.dumps(row), flush=True)

    def cudnn_causal() -> torch.Tensor:
        if device.type != "cuda":  # CPU smoke: PyTorch's default CPU kernel
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)

    for name, (win, cu) in workloads.items():
        pairs = count_pairs(tokens, T, win, cu)
        be = TorchAttentionBackend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, window_size=win).to(device)
        kw = {} if cu is None else {"cu_doc_lens": torch.tensor(cu, dtype=torch.int32, device=device)}
        kernels = ["flex", "varlen"] if cu is not None else ["flex"]
        for doc_kernel in kernels:
            torch_kernel.DOCUMENT_KERNEL = doc_kernel
            impl = "torch" if doc_kernel == "flex" else "torch[varlen]"
            record(name, impl, pairs, lambda be=be, kw=kw: be((q, k, v), **kw))
        torch_kernel.DOCUMENT_KERNEL = "flex"
        record(name, "sdpa_cudnn(causal)", causal_pairs, cudnn_causal)
        if name != "causal" and not args.skip_dense_mask:
            mask = dense_mask(T, B, win, cu, device)
            record(name, "dense_mask", pairs, lambda mask=mask: dense_mask_attention(q, k, v, mask, scale))
            del mask

    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
    }
    config = dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, window=W, dtype=str(dtype), iters=iters, warmup=warmup)
    config["n_documents"] = len(cu_docs) - 1
    config["doc_lengths_max"] = max(b - a for a, b in itertools.pairwise(cu_docs))
    out = {"env": env, "config": config, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    anchor = {r["workload"]: r for r in results if r["impl"].startswith("sdpa_cudnn")}
    print(
        f"\n{env['device']}  torch {env['torch']}  B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} {dtype}  (median of {iters})"
    )
    print(
        f"{'workload':<22}{'impl':<22}{'fwd ms':>9}{'TF/s':>7}{'f+b ms':>9}{'TF/s':>7}{'vs cuDNN causal f / f+b':>26}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['workload']:<22}{r['impl']:<22}  error: {r['error'][:60]}")
            continue
        a = anchor.get(r["workload"], {})
        ratio = (
            f"{r['fwd_ms'] / a['fwd_ms']:.2f}x / {r['fwdbwd_ms'] / a['fwdbwd_ms']:.2f}x"
            if "fwd_ms" in a
            else "-"
        )
        print(
            f"{r['workload']:<22}{r['impl']:<22}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>7.1f}"
            f"{r['fwdbwd_ms']:>9.3f}{r['fwdbwd_tflops']:>7.1f}{ratio:>26}"
        )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
