"""Whole-module speed: ``olmo_attn.Attention`` vs OLMo-core 3.0.0's ``Attention`` in the same run.

Forward+backward of the full module (q/k/v projections, QK RMS-norm, RoPE, attention, output
projection) at B 2, T 8192, d_model 4096, Hq 32, Hkv 8 (D 128), parameters fp32 under bf16
autocast, for full causal attention and a 4096 sliding window (workload 6 of docs/benchmarks.md). Both
modules get the same weights (OLMo-core's ``state_dict`` loaded into ours: same keys) and the same
inputs; their outputs are compared first. Ours runs with ``backend=None`` (the measured automatic
choice, recorded in the results) and, by default, with every other backend available here forced;
OLMo-core runs its torch backend (the only one it has on a machine without flash-attn 2/3/TE,
and the one it documents for Hopper: its flash_4 is Blackwell-only).

    python benchmarks/module_bench.py                              # GPU
    python benchmarks/module_bench.py --smoke --out /tmp/m.json    # CPU, tiny shapes, float32

Timing: CUDA events, warm-up, median of >= 20 runs; tokens/s = B*T / median time; the ratio is
ours / OLMo-core. OLMo-core imports ``cached_path``, whose cloud imports fail on the lent GPU
machines; when ``import olmo_core`` fails this script retries with ``scripts/peer`` (a stand-in
``cached_path``) first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import olmo_attn  # noqa: E402
from olmo_attn.backends import capabilities as caps  # noqa: E402
from olmo_attn.hardware import info_for, package_status  # noqa: E402

PEER_STUB = ROOT / "scripts" / "peer"


@dataclass
class ModuleBenchConfig:
    device: str = "cuda"
    batch: int = 2
    seq_len: int = 8192
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 8
    windows: tuple[int | None, ...] = (None, 4096)
    autocast: str | None = "bfloat16"  # activations dtype under autocast; None: plain fp32
    ours: tuple[str, ...] = ("auto", "all")  # "auto" = backend=None; "all" = every other available backend
    iters: int = 20
    warmup: int = 5
    seed: int = 0


def import_olmo_core() -> Any:
    """``olmo_core.nn.attention`` and friends; retries with the ``cached_path`` stand-in."""
    try:
        return _olmo_core_modules()
    except Exception as first:
        for name in [m for m in sys.modules if m.split(".")[0] in ("olmo_core", "cached_path")]:
            del sys.modules[name]
        sys.path.insert(0, str(PEER_STUB))
        print(
            f"import olmo_core failed ({type(first).__name__}: {first}); retrying with {PEER_STUB}",
            flush=True,
        )
        return _olmo_core_modules()


def _olmo_core_modules() -> Any:
    attention = importlib.import_module("olmo_core.nn.attention")
    rope = importlib.import_module("olmo_core.nn.rope")
    layer_norm = importlib.import_module("olmo_core.nn.layer_norm")
    return attention, rope, layer_norm


def build_modules(
    cfg: ModuleBenchConfig, window: int | None, ours_backend: str | None
) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """OLMo-core's module (torch backend) and ours with the same weights; our backend's name."""
    oc_attention, oc_rope, oc_ln = import_olmo_core()
    common = {
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "window_size": window,
        "init_device": cfg.device,
    }
    torch.manual_seed(cfg.seed)
    theirs = oc_attention.Attention(
        rope=oc_rope.RoPEConfig(),
        qk_norm=oc_ln.LayerNormConfig(name=oc_ln.LayerNormType.rms),
        backend=oc_attention.AttentionBackendName.torch,
        **common,
    )
    ours = olmo_attn.Attention(
        rope=olmo_attn.RoPEConfig(),
        qk_norm=olmo_attn.LayerNormConfig(name=olmo_attn.LayerNormType.rms),
        backend=ours_backend,
        **common,
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same keys and shapes as OLMo-core
    return theirs, ours, str(ours.backend.name)


def _autocast(cfg: ModuleBenchConfig) -> Any:
    if cfg.autocast is None:
        return torch.autocast(torch.device(cfg.device).type, enabled=False)
    return torch.autocast(torch.device(cfg.device).type, dtype=getattr(torch, cfg.autocast))


def time_module(
    module: torch.nn.Module, xs: list[torch.Tensor], douts: list[torch.Tensor], cfg: ModuleBenchConfig
) -> list[float]:
    """Milliseconds of forward+backward (inputs rotated, parameter grads reset every run)."""
    cuda = torch.device(cfg.device).type == "cuda"

    def step(i: int) -> None:
        module.zero_grad(set_to_none=True)
        x = xs[i % len(xs)]
        x.grad = None
        with _autocast(cfg):
            out = module(x)
        out.backward(douts[i % len(douts)])

    for i in range(cfg.warmup):
        step(i)
    times = []
    if cuda:
        torch.cuda.synchronize()
    for i in range(cfg.iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(cfg: ModuleBenchConfig) -> dict[str, Any]:
    dev = info_for(cfg.device)
    tokens = cfg.batch * cfg.seq_len
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.seq_len, cfg.d_model)
    xs = [torch.randn(shape, generator=g, device=cfg.device).requires_grad_() for _ in range(2)]
    act_dtype = getattr(torch, cfg.autocast) if cfg.autocast else torch.float32
    douts = [torch.randn(shape, generator=g, device=cfg.device, dtype=act_dtype) for _ in range(2)]
    head_dim = cfg.d_model // cfg.n_heads
    rows: list[dict[str, Any]] = []
    for window in cfg.windows:
        variants: list[str | None] = []
        for spec in cfg.ours:
            if spec == "auto":
                variants.append(None)
            elif spec == "all":
                variants += [
                    n
                    for n in caps.TABLE
                    if caps.unavailable_reason(n, cfg.device) is None
                    and act_dtype in caps.TABLE[n].dtypes
                    and head_dim <= caps.TABLE[n].head_dim_max
                ]
            else:
                variants.append(spec)
        variants = list(dict.fromkeys(variants))
        theirs_ms: float | None = None
        measured: set[str] = set()  # our backends already timed for this window
        for variant in variants:
            if variant is not None and variant in measured:
                continue  # "all" lists the backend that "auto" already chose
            row: dict[str, Any] = {"window": window, "ours_backend_requested": variant or "auto"}
            try:
                theirs, ours, chosen = build_modules(cfg, window, variant)
                row["ours_backend"] = chosen
                measured.add(chosen)
                with torch.no_grad(), _autocast(cfg):
                    a, b = theirs(xs[0]), ours(xs[0])
                row["max_abs_diff_vs_olmo_core"] = float((a.float() - b.float()).abs().max())
                row["ref_max_abs"] = float(a.float().abs().max())
                del a, b
                if theirs_ms is None:
                    t = time_module(theirs, xs, douts, cfg)
                    theirs_ms = statistics.median(t)
                del theirs
                ours_t = time_module(ours, xs, douts, cfg)
                ours_ms = statistics.median(ours_t)
                row.update(
                    olmo_core_ms=theirs_ms,
                    ours_ms=ours_ms,
                    olmo_core_tokens_per_s=tokens / (theirs_ms * 1e-3),
                    ours_tokens_per_s=tokens / (ours_ms * 1e-3),
                    speedup=theirs_ms / ours_ms,
                    ours_times_ms=ours_t,
                )
                print(
                    f"window={window} ours[{chosen}] {ours_ms:.2f} ms ({row['ours_tokens_per_s'] / 1e3:.0f}k tok/s) "
                    f"vs OLMo-core[torch] {theirs_ms:.2f} ms ({row['olmo_core_tokens_per_s'] / 1e3:.0f}k tok/s): "
                    f"x{row['speedup']:.2f}; max|diff| {row['max_abs_diff_vs_olmo_core']:.3g}",
                    flush=True,
                )
            except Exception as e:  # record and go on: one backend failing is a result
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"window={window} ours[{variant or 'auto'}]: {row['error']}", flush=True)
            finally:
                if torch.device(cfg.device).type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    oc_version = package_status("olmo_core", "ai2-olmo-core").version
    return {
        "schema": "olmo-attn/module-bench/1",
        "env": {
            "device": dev.name,
            "arch": dev.arch,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "olmo_core": oc_version,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "config": asdict(cfg),
        "results": rows,
    }


def markdown_table(report: dict[str, Any]) -> str:
    cfg, env = report["config"], report["env"]
    lines = [
        f"{env['device']} ({env['arch']}), torch {env['torch']}, OLMo-core {env['olmo_core']}: Attention forward+backward, "
        f"B{cfg['batch']} T{cfg['seq_len']} d_model {cfg['d_model']} Hq{cfg['n_heads']} Hkv{cfg['n_kv_heads']}, "
        f"RoPE + QK RMS-norm, autocast {cfg['autocast']}",
        "",
        "| window | ours (backend) | ours ms | ours tok/s | OLMo-core (torch) ms | OLMo-core tok/s | ours / OLMo-core |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        w = r["window"] or "full"
        if "error" in r:
            lines.append(f"| {w} | {r['ours_backend_requested']} | error: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {w} | {r['ours_backend']} ({r['ours_backend_requested']}) | {r['ours_ms']:.2f} | "
            f"{r['ours_tokens_per_s'] / 1e3:.0f}k | {r['olmo_core_ms']:.2f} | {r['olmo_core_tokens_per_s'] / 1e3:.0f}k | "
            f"x{r['speedup']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ours", default="auto,all", help="comma list: auto (backend=None), all, or backend names"
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32, 5 runs")
    args = p.parse_args(argv)
    ours = tuple(x for x in args.ours.split(",") if x)
    if args.smoke:
        cfg = ModuleBenchConfig(
            device="cpu", batch=2, seq_len=64, d_model=64, n_heads=4, n_kv_heads=2, windows=(None, 16),
            autocast=None, ours=ours, iters=5, warmup=2,
        )  # fmt: skip
    else:
        if not torch.cuda.is_available():
            raise SystemExit("module_bench: no CUDA device here; run with --smoke for the CPU check")
        cfg = ModuleBenchConfig(ours=ours, iters=max(20, args.iters), warmup=args.warmup)
    report = run(cfg)
    table = markdown_table(report)
    print(table)
    env = report["env"]
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"{env['device'].lower().replace(' ', '-')}-{env['date'][:10]}-module.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return report


if __name__ == "__main__":
    main()
