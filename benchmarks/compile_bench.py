"""``torch.compile(fullgraph=True)`` against eager for our attention modules (torch backend).

For ``Attention``, ``FusedAttention`` and ``NormalizedAttention``: forward+backward of plain causal,
of packed documents whose boundaries change every batch, of a sliding window (``Attention``), and
KV-cache decode steps (``Attention``, ``NormalizedAttention``); for ``GatedDeltaNet`` packed
documents and cached decode steps (its kernels are opaque custom ops: Triton on CUDA, the PyTorch
chunked kernel on CPU). Per case: eager and compiled
milliseconds (median, CUDA events back to back on GPUs), the first compiled call's seconds
(compilation), the number of compiled frames after all batches / steps (1 = no recompile; decoding:
prefill + one shared step graph = 2), the compiled output's largest difference from eager, and on
CUDA the three kernels with the most device time in one compiled step (that the compiled path still
runs cuDNN / flash / Flex kernels, not a decomposed matmul-softmax).

    python benchmarks/compile_bench.py --out benchmarks/results/h200-DATE-compile.json   # GPU, bf16
    python benchmarks/compile_bench.py --smoke --out /tmp/c.json                          # CPU, tiny
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from backend_bench import time_runs  # this folder is on sys.path when a script of it runs
from torch._dynamo.testing import CompileCounterWithBackend

from olmo_attn.attention import Attention, FusedAttention, NormalizedAttention
from olmo_attn.recurrent import GatedDeltaNet
from olmo_attn.rope import RoPEConfig

CASES = (
    ("attention", "causal"),
    ("attention", "documents"),
    ("attention", "window"),
    ("attention", "decode"),
    ("fused", "causal"),
    ("fused", "documents"),
    ("normalized", "causal"),
    ("normalized", "documents"),
    ("normalized", "decode"),
    ("gdn", "documents"),
    ("gdn", "decode"),
)


def _layouts(n_tokens: int, n_docs: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` different ``cu_doc_lens`` of ``n_docs`` documents over ``n_tokens`` (same shape)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cuts = torch.randperm(n_tokens - 1, generator=g)[: n_docs - 1].add(1).sort().values
        out.append(torch.cat([torch.tensor([0]), cuts, torch.tensor([n_tokens])]).to(torch.int32))
    return out


def _build(
    kind: str, case: str, d_model: int, n_heads: int, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    torch.manual_seed(0)
    rope = RoPEConfig(theta=500_000)
    if kind == "attention":
        window = 512 if case == "window" else None
        m: torch.nn.Module = Attention(
            d_model=d_model, n_heads=n_heads, n_kv_heads=max(1, n_heads // 4), rope=rope,
            backend="torch", window_size=window, init_device=device,
        )  # fmt: skip
    elif kind == "gdn":  # d_model 2048, 16 heads: Dk 128, Dv 256 (gdn_bench's shape)
        m = GatedDeltaNet(d_model=d_model, n_heads=n_heads, init_device=device)
    elif kind == "fused":
        fused_rope = RoPEConfig(name="fused", theta=500_000)
        m = FusedAttention(
            d_model=d_model, n_heads=n_heads, rope=fused_rope, backend="torch", init_device=device
        )
    else:
        m = NormalizedAttention(
            d_model=d_model, n_heads=n_heads, n_kv_heads=max(1, n_heads // 4), rope=rope, backend="torch",
            init_device=device,
        )  # fmt: skip
    return m.to(device=device, dtype=dtype)


def _time(fn: Callable[[int], Any], iters: int, cuda: bool) -> float:
    """Median ms of ``fn(i)`` (the backend benchmark's timer: back-to-back CUDA events on GPUs)."""
    return statistics.median(time_runs(fn, iters=iters, warmup=0, cuda=cuda))


def _top_kernels(fn: Callable[[], Any]) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [
        (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0), e.key)
        for e in prof.key_averages()
    ]
    return [k[:80] for t, k in sorted(rows, reverse=True)[:3] if t > 0]


def run_case(kind: str, case: str, cfg: argparse.Namespace) -> dict[str, Any]:
    cuda = cfg.device.startswith("cuda")
    dtype = getattr(torch, cfg.dtype)
    B, T, d = cfg.batch, cfg.seq_len, cfg.d_model
    eager = _build(kind, case, d, cfg.n_heads, cfg.device, dtype)
    model = _build(kind, case, d, cfg.n_heads, cfg.device, dtype)
    row: dict[str, Any] = {"module": kind, "case": case, "B": B, "T": T, "d_model": d}
    for m in (eager, model):
        if getattr(m, "rope", None) is not None:
            m.rope.warmup_cache(
                max(B * T, T + cfg.decode_steps + 8), cfg.device
            )  # no table fill under compile
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(cfg.backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = torch.Generator(device=cfg.device).manual_seed(1)
    if case == "decode":
        prompt = torch.randn(B, T, d, generator=g, device=cfg.device, dtype=dtype)
        steps = [
            torch.randn(B, 1, d, generator=g, device=cfg.device, dtype=dtype) for _ in range(cfg.decode_steps)
        ]
        results = {}
        for name, m in (("eager", eager), ("compiled", compiled)):
            mod = eager if m is eager else model
            if kind == "gdn":
                cache = mod.init_cache(B, device=cfg.device)
                call = lambda m, x, cache=cache: m(x, cache=cache)
            else:
                mod.init_kv_cache_manager(B, T + cfg.decode_steps + 1)
                call = lambda m, x: m(x)
            with torch.no_grad():
                t0 = time.perf_counter()
                call(m, prompt)
                if cuda:
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                outs = []
                times = []
                for x in steps:
                    t1 = time.perf_counter()
                    outs.append(call(m, x))
                    if cuda:
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - t1) * 1e3)
            skip = min(2, len(times) - 1)  # the first steps compile the step graph
            results[name] = (first, statistics.median(times[skip:]), outs)
        row.update(
            eager_ms=results["eager"][1], compiled_ms=results["compiled"][1], first_call_s=results["compiled"][0],
            unit="ms per decode step (wall, synchronised)", frames=counter.frame_count,
            max_abs_diff=max(float((a.float() - b.float()).abs().max()) for a, b in zip(results["eager"][2], results["compiled"][2])),
        )  # fmt: skip
        return row
    x = torch.randn(B, T, d, generator=g, device=cfg.device, dtype=dtype)
    layouts = _layouts(B * T, cfg.n_docs, cfg.layouts, seed=2) if case == "documents" else [None]
    layouts = [None if c is None else c.to(cfg.device) for c in layouts]

    def step(m: torch.nn.Module, i: int) -> torch.Tensor:
        cu = layouts[i % len(layouts)]
        xi = x.detach().requires_grad_()
        y = m(xi) if cu is None else m(xi, cu_doc_lens=cu)
        y.float().square().mean().backward()
        return y.detach()

    t0 = time.perf_counter()
    step(compiled, 0)
    if cuda:
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    diffs = [
        float((step(compiled, i).float() - step(eager, i).float()).abs().max()) for i in range(len(layouts))
    ]
    row["eager_ms"] = _time(lambda i: step(eager, i), cfg.iters, cuda)
    row["compiled_ms"] = _time(lambda i: step(compiled, i), cfg.iters, cuda)
    row.update(unit="ms forward+backward", frames=counter.frame_count, max_abs_diff=max(diffs))
    if case == "documents":
        row["layouts"] = len(layouts)
    if cuda:
        row["top_kernels"] = _top_kernels(lambda: step(compiled, 0))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, aot_eager")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases", nargs="*", default=None, help="module/case names, e.g. attention/documents")
    cfg = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not cfg.smoke
    cfg.device = "cuda" if cuda else "cpu"
    cfg.dtype = "bfloat16" if cuda else "float32"
    cfg.backend = "inductor" if cuda else "aot_eager"
    cfg.batch, cfg.seq_len, cfg.d_model, cfg.n_heads = (2, 8192, 2048, 16) if cuda else (2, 32, 64, 4)
    cfg.n_docs, cfg.layouts, cfg.iters, cfg.decode_steps = (8, 4, 10, 16) if cuda else (3, 3, 3, 5)
    env = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "backend": cfg.backend,
        "dtype": cfg.dtype,
        "timing": "back-to-back CUDA events, one sync per series" if cuda else "perf_counter per run",
    }
    rows = []
    for kind, case in CASES:
        if cfg.cases and f"{kind}/{case}" not in cfg.cases:
            continue
        try:
            row = run_case(kind, case, cfg)
        except Exception as e:  # a case that fails to compile is a result
            row = {"module": kind, "case": case, "error": f"{type(e).__name__}: {e}"[:400]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'module':11s} {'case':10s} {'eager':>9s} {'compiled':>9s} {'first s':>8s} frames")
    for r in rows:
        if "error" in r:
            print(f"{r['module']:11s} {r['case']:10s} ERROR {r['error'][:80]}")
        else:
            print(
                f"{r['module']:11s} {r['case']:10s} {r['eager_ms']:9.2f} {r['compiled_ms']:9.2f} "
                f"{r['first_call_s']:8.1f} {r['frames']}"
            )
    if cfg.out:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps({"env": env, "results": rows}, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
