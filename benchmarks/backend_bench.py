"""Per-backend attention speed, and the measured order that ``backend=None`` picks from.

Every available backend (``olmo_attn`` backend modules, as users call them) on three workloads:
causal, sliding window 4096, and packed documents with long-tailed lengths; Hq 32, Hkv 8, D 128,
T in {2k, 8k, 16k, 32k} with B = 32k / T rows; bf16; forward and forward+backward. CUDA events,
warm-up, median of >= 20 timed runs, inputs rotated between sets, random data. FLOPs count only the
(query, key) pairs the mask allows: forward 4·Hq·D·pairs, backward 2.5x forward. Each backend's
output is first compared with the torch backend's on the same inputs (``max_abs_diff_vs_torch``) so
a wrong kernel cannot win.

Beside each adapter, the library's own call on the same inputs is timed the same way (``raw_*``
fields; ``--no-raw`` skips it): ``flash_attn_func`` / ``flash_attn_varlen_func`` of flash-attn 2,
FA3 and flash-attn-4, Transformer Engine's ``DotProductAttention`` called directly, and for torch
``F.scaled_dot_product_attention`` (causal only: its windows and documents are our own
FlexAttention / blockwise code, there is no library call to compare with). ``adapter_overhead_*`` =
adapter time / raw time - 1; the target is <= 5 %.

    python benchmarks/backend_bench.py                              # GPU, writes benchmarks/results/
    python benchmarks/backend_bench.py --write-preference           # ... and olmo_attn/backends/preference.json
    python benchmarks/backend_bench.py --smoke --out /tmp/b.json    # CPU, tiny shapes (CI / a quick check)

Results: JSON (``--out``; default ``benchmarks/results/<gpu>-<date>-backends.json``) with an
environment fingerprint, every case (times, TFLOP/s, peak memory, errors) and the derived
preference; a Markdown table on stdout (and in ``--markdown``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from olmo_attn.backends import capabilities as caps  # noqa: E402
from olmo_attn.backends import registry  # noqa: E402
from olmo_attn.backends.base import AttentionBackendName  # noqa: E402
from olmo_attn.hardware import info_for, package_status  # noqa: E402
from olmo_attn.ops.containment import fault_containment  # noqa: E402

MASKS = ("causal", "sliding_window", "documents")


@dataclass
class BenchConfig:
    """One benchmark run's settings."""

    device: str = "cuda"
    dtype: str = "bfloat16"
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    seq_lens: tuple[int, ...] = (2048, 8192, 16384, 32768)
    tokens: int = 32768  # B = max(1, tokens // T)
    window: int = 4096
    masks: tuple[str, ...] = MASKS
    backends: tuple[str, ...] = ()  # empty: every backend available on the device
    iters: int = 20
    warmup: int = 5
    input_sets: int = 2  # rotated between timed runs
    mean_doc_len: int = 512  # documents: log-normal lengths around this, a long tail
    seed: int = 0
    smoke: bool = False
    raw: bool = True  # also time the library's own call on the same inputs
    # fault containment (olmo_attn.fault_containment): "off", "on", or "both" (each backend twice,
    # the contained run labelled "<backend>+contain")
    contain_faults: str = "off"


@dataclass
class CaseResult:
    """One (backend, mask, T) measurement; times in ms, ``None`` where the case did not run."""

    backend: str
    mask: str
    seq_len: int
    batch: int
    n_docs: int | None = None
    pairs: int = 0
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    peak_mem_gib: float | None = None
    max_abs_diff_vs_torch: float | None = None
    fwd_times_ms: list[float] = field(default_factory=list)
    fwd_bwd_times_ms: list[float] = field(default_factory=list)
    error: str | None = None
    # the library's own call on the same inputs (None: not measured, see raw_note)
    raw_fwd_ms: float | None = None
    raw_fwd_bwd_ms: float | None = None
    raw_max_abs_diff: float | None = None  # |adapter out - raw out|: the same computation
    adapter_overhead_fwd: float | None = None  # adapter / raw - 1
    adapter_overhead_fwd_bwd: float | None = None
    raw_note: str | None = None


# ----- workloads ----------------------------------------------------------------------------------------
def document_lengths(T: int, rng: np.random.Generator, mean_len: int) -> list[int]:
    """Split ``T`` tokens into documents with long-tailed lengths (log-normal: many short, few long)."""
    sigma = 1.25
    mu = math.log(mean_len) - sigma**2 / 2  # E[len] = mean_len
    lengths: list[int] = []
    left = T
    while left > 0:
        n = int(min(max(8, round(rng.lognormal(mu, sigma))), left))
        lengths.append(n)
        left -= n
    return lengths


def cu_doc_lens(B: int, T: int, seed: int, mean_len: int) -> tuple[torch.Tensor, int, int]:
    """``cu_doc_lens`` over the flattened batch (documents never cross a row), max length, count."""
    rng = np.random.default_rng(seed)
    lengths = [n for _ in range(B) for n in document_lengths(T, rng, mean_len)]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return cu, max(lengths), len(lengths)


def allowed_pairs(mask: str, B: int, T: int, window: int, doc_lens: list[int] | None = None) -> int:
    """Number of (query, key) pairs the mask allows (causal inside every row / document)."""
    if mask == "causal":
        return B * T * (T + 1) // 2
    if mask == "sliding_window":
        w = min(window, T)
        return B * (w * (w + 1) // 2 + (T - w) * w)
    if mask == "documents":
        assert doc_lens is not None
        return sum(n * (n + 1) // 2 for n in doc_lens)
    raise ValueError(f"mask={mask!r} is not one of {MASKS}")


# ----- timing -----------------------------------------------------------------------------------------
def time_runs(fn: Callable[[int], None], *, iters: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds of ``fn(i)`` for ``iters`` runs after ``warmup``.

    On CUDA: a pair of events around every run, all runs issued back to back and one
    synchronisation at the end, so the host's per-call work (argument checks, Python) overlaps the
    previous run's kernels as it does in a training step. (Synchronising after every run would
    count that host work as GPU time: an H200 run showed +13-18 % on the flash_3 adapter's
    document forward against the raw call that way, against +1-6 % for forward+backward.)
    """
    for i in range(warmup):
        fn(i)
    if not cuda:
        times: list[float] = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def fingerprint(device: str) -> dict[str, Any]:
    """GPU, driver, CUDA, torch and every optional backend's version (or why it is missing)."""
    dev = info_for(device)
    env: dict[str, Any] = {
        "device": dev.name,
        "arch": dev.arch,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timing": "back-to-back CUDA events, one sync per series",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backends": {},
    }
    if dev.type == "cuda":
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    for name, spec in caps.TABLE.items():
        status = package_status(spec.module, spec.distribution) if spec.module else None
        env["backends"][name] = {
            "version": (status.version if status else None) if status is not None else torch.__version__,
            "unavailable": caps.unavailable_reason(name, device),
            "verified_on_hardware": spec.verified_on_hardware,
        }
    return env


# ----- the libraries' own calls -------------------------------------------------------------------------
RawFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def raw_call(name: str, cfg: BenchConfig, mask: str, kwargs: dict[str, Any]) -> tuple[RawFn | None, str]:
    """The library's own call for backend ``name`` on one workload, and what it is.

    ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, Hq, D]``, the mask and scale the adapter
    is built with (causal; window ``(window - 1, 0)``; documents as ``cu_seqlens`` over the
    flattened batch). ``None`` when there is no library call to compare with.
    """
    scale = cfg.head_dim**-0.5
    window = (cfg.window - 1, 0) if mask == "sliding_window" else (-1, -1)
    docs = mask == "documents"
    cu, mx = kwargs.get("cu_doc_lens"), int(kwargs.get("max_doc_len") or 0)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:])

    def first(r: Any) -> torch.Tensor:
        return r[0] if isinstance(r, (tuple, list)) else r

    if name == "torch":
        if mask != "causal":
            return None, "no library call: windows and documents run our FlexAttention / blockwise code"
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        order.append(SDPBackend.MATH)

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(order, set_priority=True) if q.is_cuda else _nullcontext():
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
                    enable_gqa=q.shape[2] != k.shape[2],
                )  # fmt: skip
            return o.transpose(1, 2)

        return sdpa, "F.scaled_dot_product_attention(enable_gqa, cuDNN first)"
    if name in ("flash_2", "flash_3", "flash_4"):
        import importlib

        mod_name = {"flash_2": "flash_attn", "flash_4": "flash_attn.cute"}.get(name)
        if name == "flash_3":
            from olmo_attn.backends.flash3 import fa3_interface

            lib = fa3_interface()
        else:
            lib = importlib.import_module(str(mod_name))
        win: Any = window
        if name == "flash_4":
            win = (None, None) if window[0] < 0 else (window[0], 0)
        if not docs:
            return (
                lambda q, k, v: first(
                    lib.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=win)
                ),
                f"{lib.__name__}.flash_attn_func",
            )
        if name == "flash_4":
            return (
                lambda q, k, v: first(
                    lib.flash_attn_varlen_func(
                        flat(q), flat(k), flat(v), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                        max_seqlen_k=mx, softmax_scale=scale, causal=True, window_size=win,
                    )
                ).view(q.shape),
                f"{lib.__name__}.flash_attn_varlen_func",
            )  # fmt: skip
        return (
            lambda q, k, v: first(
                lib.flash_attn_varlen_func(
                    flat(q),
                    flat(k),
                    flat(v),
                    cu,
                    cu,
                    mx,
                    mx,
                    softmax_scale=scale,
                    causal=True,
                    window_size=win,
                )
            ).view(q.shape),
            f"{lib.__name__}.flash_attn_varlen_func",
        )
    if name == "te":
        import transformer_engine.pytorch as te

        attn = te.DotProductAttention(
            cfg.n_heads, cfg.head_dim, num_gqa_groups=cfg.n_kv_heads, attention_dropout=0.0,
            attn_mask_type="causal", window_size=(window[0], 0), qkv_format="bshd", softmax_scale=scale,
        )  # fmt: skip
        if not docs:
            return lambda q, k, v: attn(q, k, v).view(q.shape), "DotProductAttention bshd"
        return (
            lambda q, k, v: attn(
                flat(q), flat(k), flat(v), qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=mx,
                max_seqlen_kv=mx, attn_mask_type="padding_causal", window_size=(window[0], 0),
            ).view(q.shape),
            "DotProductAttention thd",
        )  # fmt: skip
    return None, f"no raw call known for backend {name!r}"


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def time_pair(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    sets: list[tuple[torch.Tensor, ...]],
    cfg: BenchConfig,
    cuda: bool,
) -> tuple[list[float], list[float]]:
    """Forward-only and forward+backward times (ms) of ``fn`` on the rotated input sets (leaves)."""

    def fwd(i: int) -> None:
        q, k, v, _ = sets[i % len(sets)]
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd(i: int) -> None:
        q, k, v, dout = sets[i % len(sets)]
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    return (
        time_runs(fwd, iters=cfg.iters, warmup=cfg.warmup, cuda=cuda),
        time_runs(fwd_bwd, iters=cfg.iters, warmup=cfg.warmup, cuda=cuda),
    )


# ----- one case -----------------------------------------------------------------------------------------
def _inputs(cfg: BenchConfig, B: int, T: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    shape_q = (B, T, cfg.n_heads, cfg.head_dim)
    shape_kv = (B, T, cfg.n_kv_heads, cfg.head_dim)
    q = torch.randn(shape_q, generator=g, device=cfg.device, dtype=dtype)
    k = torch.randn(shape_kv, generator=g, device=cfg.device, dtype=dtype)
    v = torch.randn(shape_kv, generator=g, device=cfg.device, dtype=dtype)
    dout = torch.randn(shape_q, generator=g, device=cfg.device, dtype=dtype)
    return q, k, v, dout


CONTAIN = "+contain"  # backend-name suffix: the same backend with fault containment on


def run_case(
    cfg: BenchConfig, name: str, mask: str, T: int, reference_out: dict[tuple[str, int], torch.Tensor]
) -> CaseResult:
    """Time backend ``name`` (``"<backend>+contain"``: with fault containment on) on one workload;
    record an error instead of raising."""
    if name.endswith(CONTAIN):
        with fault_containment(True):
            return _run_case(replace(cfg, raw=False), name, mask, T, reference_out)
    with fault_containment(False):
        return _run_case(cfg, name, mask, T, reference_out)


def _run_case(
    cfg: BenchConfig, name: str, mask: str, T: int, reference_out: dict[tuple[str, int], torch.Tensor]
) -> CaseResult:
    dtype = getattr(torch, cfg.dtype)
    cuda = torch.device(cfg.device).type == "cuda"
    B = max(1, cfg.tokens // T)
    res = CaseResult(backend=name, mask=mask, seq_len=T, batch=B)
    kwargs: dict[str, Any] = {}
    doc_lens = None
    if mask == "documents":
        cu, max_len, n_docs = cu_doc_lens(B, T, cfg.seed + T, cfg.mean_doc_len)
        kwargs = {"cu_doc_lens": cu.to(cfg.device), "max_doc_len": max_len}
        doc_lens = np.diff(cu.numpy()).tolist()
        res.n_docs = n_docs
    res.pairs = allowed_pairs(mask, B, T, cfg.window, doc_lens)
    fwd_flops = 4 * cfg.n_heads * cfg.head_dim * res.pairs
    try:
        backend = AttentionBackendName(name.removesuffix(CONTAIN)).build(
            head_dim=cfg.head_dim,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            window_size=(cfg.window - 1, 0) if mask == "sliding_window" else (-1, -1),
        )
        sets = [_inputs(cfg, B, T, cfg.seed + 1000 * i, dtype) for i in range(cfg.input_sets)]
        with torch.no_grad():
            out0 = backend(tuple(sets[0][:3]), **kwargs)
        key = (mask, T)
        if name == "torch":
            reference_out[key] = out0
        elif key in reference_out:
            res.max_abs_diff_vs_torch = float((out0.float() - reference_out[key].float()).abs().max())
        del out0

        for q, k, v, _ in sets:  # leaves; the forward-only runs use no_grad
            q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

        def adapter(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return backend((q, k, v), **kwargs)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res.fwd_times_ms, res.fwd_bwd_times_ms = time_pair(adapter, sets, cfg, cuda)
        if cuda:
            res.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        res.fwd_ms = statistics.median(res.fwd_times_ms)
        res.fwd_bwd_ms = statistics.median(res.fwd_bwd_times_ms)
        res.fwd_tflops = fwd_flops / (res.fwd_ms * 1e-3) / 1e12
        res.fwd_bwd_tflops = 3.5 * fwd_flops / (res.fwd_bwd_ms * 1e-3) / 1e12
    except Exception as e:  # a backend that cannot run a case is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"[:500]
    if res.error is None and cfg.raw:
        _measure_raw(cfg, name, mask, kwargs, sets, adapter, res, cuda)
    if cuda:
        torch.cuda.empty_cache()
    return res


def _measure_raw(
    cfg: BenchConfig,
    name: str,
    mask: str,
    kwargs: dict[str, Any],
    sets: list[tuple[torch.Tensor, ...]],
    adapter: RawFn,
    res: CaseResult,
    cuda: bool,
) -> None:
    """Time the library's own call beside the adapter (into ``res.raw_*``); never raises."""
    try:
        fn, note = raw_call(name, cfg, mask, kwargs)
        res.raw_note = note
        if fn is None:
            return
        q, k, v, _ = sets[0]
        with torch.no_grad():
            res.raw_max_abs_diff = float((fn(q, k, v).float() - adapter(q, k, v).float()).abs().max())
        fwd_t, fwd_bwd_t = time_pair(fn, sets, cfg, cuda)
        res.raw_fwd_ms, res.raw_fwd_bwd_ms = statistics.median(fwd_t), statistics.median(fwd_bwd_t)
        assert res.fwd_ms is not None and res.fwd_bwd_ms is not None
        res.adapter_overhead_fwd = res.fwd_ms / res.raw_fwd_ms - 1.0
        res.adapter_overhead_fwd_bwd = res.fwd_bwd_ms / res.raw_fwd_bwd_ms - 1.0
    except Exception as e:  # the raw call is informational: record why it did not run
        res.raw_note = f"raw call failed: {type(e).__name__}: {e}"[:500]


# ----- the run ------------------------------------------------------------------------------------------
def run(cfg: BenchConfig, checkpoint: Path | None = None) -> dict[str, Any]:
    """Every (mask, T, backend) case; ``checkpoint``: rewrite this JSON after each case (a run cut
    short by a time limit still leaves its measurements, ``"partial": true``)."""
    torch.manual_seed(cfg.seed)
    names = list(cfg.backends) or [n for n in caps.TABLE if caps.unavailable_reason(n, cfg.device) is None]
    names = ["torch", *[n for n in names if n != "torch"]]  # torch first: the agreement baseline
    if cfg.contain_faults == "on":
        names = [f"{n}{CONTAIN}" for n in names]
    elif cfg.contain_faults == "both":
        names = [m for n in names for m in (n, f"{n}{CONTAIN}")]
    skipped = {
        n: caps.unavailable_reason(n, cfg.device)
        for n in caps.TABLE
        if n not in names and caps.unavailable_reason(n, cfg.device)
    }
    results: list[CaseResult] = []
    reference_out: dict[tuple[str, int], torch.Tensor] = {}
    for mask in cfg.masks:
        for T in cfg.seq_lens:
            reference_out.clear()
            for name in names:
                r = run_case(cfg, name, mask, T, reference_out)
                results.append(r)
                status = r.error or (
                    f"fwd {r.fwd_ms:.3f} ms ({r.fwd_tflops:.3g} TFLOP/s), fwd+bwd {r.fwd_bwd_ms:.3f} ms "
                    f"({r.fwd_bwd_tflops:.3g} TFLOP/s), max|diff vs torch| {r.max_abs_diff_vs_torch}"
                )
                if r.raw_fwd_bwd_ms is not None:
                    status += (
                        f"; raw {r.raw_fwd_ms:.3f} / {r.raw_fwd_bwd_ms:.3f} ms, adapter overhead "
                        f"{100 * (r.adapter_overhead_fwd or 0):+.1f}% / {100 * (r.adapter_overhead_fwd_bwd or 0):+.1f}%"
                    )
                print(f"[{name:>8}] {mask:<15} T={T:<6} B={r.batch:<3} {status}", flush=True)
                if checkpoint is not None:
                    part = _report(cfg, results, skipped)
                    checkpoint.write_text(json.dumps({**part, "partial": True}, indent=1) + "\n")
    return _report(cfg, results, skipped)


def _report(cfg: BenchConfig, results: list[CaseResult], skipped: dict[str, str | None]) -> dict[str, Any]:
    arch = info_for(cfg.device).arch
    records = [asdict(r) for r in results]
    return {
        "schema": "olmo-attn/backend-bench/1",
        "env": fingerprint(cfg.device),
        "config": asdict(cfg),
        "skipped_backends": skipped,
        "results": records,
        "preference": {arch: registry.derive_preferences(records)},
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (mask, T), one column per backend: fwd / fwd+bwd ms and TFLOP/s."""
    rows = report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    env = report["env"]
    lines = [
        f"{env['device']} ({env['arch']}), torch {env['torch']}, {report['config']['dtype']}, "
        f"Hq {report['config']['n_heads']} Hkv {report['config']['n_kv_heads']} D {report['config']['head_dim']}; "
        "cells: forward / forward+backward ms (TFLOP/s)",
        "",
        "| mask | T | B | " + " | ".join(backends) + " |",
        "|---|---|---|" + "---|" * len(backends),
    ]
    cases = list(dict.fromkeys((r["mask"], r["seq_len"]) for r in rows))
    for mask, T in cases:
        cells = []
        batch = next(r["batch"] for r in rows if r["mask"] == mask and r["seq_len"] == T)
        for b in backends:
            r = next((x for x in rows if x["backend"] == b and x["mask"] == mask and x["seq_len"] == T), None)
            if r is None or r["error"]:
                cells.append("—" if r is None else "error")
            else:
                cells.append(
                    f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f} ({r['fwd_tflops']:.3g} / {r['fwd_bwd_tflops']:.3g})"
                )
        lines.append(f"| {mask} | {T} | {batch} | " + " | ".join(cells) + " |")
    raw_rows = [r for r in rows if r.get("raw_fwd_bwd_ms") is not None]
    if raw_rows:
        lines += [
            "",
            "Adapter vs the library's own call on the same inputs: forward / forward+backward ms, "
            "adapter overhead (target <= 5 %)",
            "",
            "| backend | mask | T | adapter | raw | overhead | raw call |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in raw_rows:
            lines.append(
                f"| {r['backend']} | {r['mask']} | {r['seq_len']} | {r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f} | "
                f"{r['raw_fwd_ms']:.2f} / {r['raw_fwd_bwd_ms']:.2f} | {100 * r['adapter_overhead_fwd']:+.1f}% / "
                f"{100 * r['adapter_overhead_fwd_bwd']:+.1f}% | {r['raw_note']} |"
            )
    notes = sorted(
        {(r["backend"], r["raw_note"]) for r in rows if r.get("raw_note") and r.get("raw_fwd_ms") is None}
    )
    for b, note in notes:
        lines.append(f"- {b}: raw call not timed ({note})")
    lines.append("")
    for arch, prefs in report["preference"].items():
        for kind, order in prefs.items():
            lines.append(f"- preference {arch} {kind}: {' > '.join(order)}")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="", help="comma list (default: every backend available here)")
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--seq-lens", default="2048,8192,16384,32768")
    p.add_argument("--tokens", type=int, default=32768, help="B = max(1, tokens // T)")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/...)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument(
        "--write-preference",
        nargs="?",
        const=str(registry.PREFERENCE_FILE),
        default=None,
        metavar="PATH",
        help="derive the per-arch order from this run and write it (default path: the package's preference.json)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, float32, 3 runs: checks the script"
    )
    p.add_argument(
        "--contain-faults",
        choices=["off", "on", "both"],
        default="off",
        help="fault containment (olmo_attn.fault_containment) off, on, or both side by side "
        "('<backend>+contain' rows): its cost",
    )
    p.add_argument(
        "--no-raw",
        dest="raw",
        action="store_false",
        help="do not time the libraries' own calls beside the adapters",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    split = lambda s: tuple(x for x in s.split(",") if x)
    if args.smoke:
        return BenchConfig(
            device="cpu",
            dtype="float32",
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            seq_lens=(64, 128),
            tokens=256,
            window=32,
            masks=split(args.masks),
            backends=split(args.backends),
            iters=3,
            warmup=1,
            mean_doc_len=24,
            smoke=True,
            raw=args.raw,
            contain_faults=args.contain_faults,
        )
    if not torch.cuda.is_available():
        raise SystemExit("backend_bench: no CUDA device here; run with --smoke for the CPU check")
    return BenchConfig(
        dtype=args.dtype,
        seq_lens=tuple(int(t) for t in split(args.seq_lens)),
        tokens=args.tokens,
        window=args.window,
        masks=split(args.masks),
        backends=split(args.backends),
        iters=max(20, args.iters),
        warmup=args.warmup,
        raw=args.raw,
        contain_faults=args.contain_faults,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.write_preference is not None and args.contain_faults != "off":
        raise SystemExit("--write-preference measures the backends as shipped: leave --contain-faults off")
    cfg = config_from_args(args)
    unknown = [m for m in cfg.masks if m not in MASKS]
    if unknown:
        raise SystemExit(f"--masks: unknown {unknown}; choose from {list(MASKS)}")
    env0 = fingerprint(cfg.device)
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"{_slug(env0['device'])}-{env0['date'][:10]}-backends.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(cfg, checkpoint=out)
    table = markdown_table(report)
    print(table)
    env = report["env"]
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.write_preference is not None:
        arch = env["arch"]
        source = (
            f"benchmarks/backend_bench.py on {env['device']} ({arch}), {env['date'][:10]}, torch {env['torch']}: "
            f"{cfg.dtype} Hq{cfg.n_heads} Hkv{cfg.n_kv_heads} D{cfg.head_dim}, T {list(cfg.seq_lens)}, "
            f"B = {cfg.tokens}/T, window {cfg.window}; order by forward+backward time ({out.name})"
        )
        path = registry.write_preferences(
            arch, report["preference"][arch], source=source, path=args.write_preference
        )
        print(f"preference for {arch}: {report['preference'][arch]} -> {path}")
    return report


if __name__ == "__main__":
    main()
