"""Render the README's benchmark and conformance tables from the committed result files.

    python benchmarks/readme_tables.py            # print the Markdown
    python benchmarks/readme_tables.py --update   # rewrite README.md between the table markers

Reads ``benchmarks/results/*.json`` and ``conformance/reports/*.json``; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPORTS = ROOT / "conformance" / "reports"
BEGIN, END = "<!-- tables:begin (benchmarks/readme_tables.py) -->", "<!-- tables:end -->"


def _load(pattern: str) -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))]


def _gpu(env: dict) -> str:
    return env.get("gpu") or env.get("device_name") or env.get("device") or "?"


def torch_backend() -> list[str]:
    out = []
    for path, d in _load("*-torch_backend.json"):
        cfg, env = d["config"], d["env"]
        out += [
            f"**torch backend vs cuDNN SDPA** — {_gpu(env)}, torch {env.get('torch')}, "
            f"B{cfg['B']} T{cfg['T']} Hq{cfg['Hq']} Hkv{cfg['Hkv']} D{cfg['D']} bf16, window {cfg['window']}, "
            f"{cfg.get('n_documents')} packed documents (longest {cfg.get('doc_lengths_max')}) "
            f"([`{path.name}`](benchmarks/results/{path.name})). FLOPs count only unmasked pairs.",
            "",
            "| workload | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in d["results"]:
            out.append(
                f"| {r['workload']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | "
                f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops']:.0f} |"
            )
        out.append("")
    return out


def backends() -> list[str]:
    out = []
    for path, d in _load("*-backends.json"):
        env, res = d["env"], d["results"]
        ok = [r for r in res if r.get("fwd_ms") is not None and r.get("fwd_bwd_ms") is not None]
        names = sorted({r["backend"] for r in ok}, key=lambda n: (n != "torch", n))
        out += [
            f"**Every available backend** — {_gpu(env)}, bf16, Hq32 Hkv8 D128, B·T = 32k tokens; "
            f"cells are fwd / fwd+bwd ms (fwd+bwd TFLOP/s) ([`{path.name}`](benchmarks/results/{path.name})).",
            "",
            "| mask | T | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        rows: dict[tuple, dict[str, str]] = {}
        for r in ok:
            rows.setdefault((r["mask"], r["seq_len"]), {})[r["backend"]] = (
                f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f} ({r['fwd_bwd_tflops']:.0f})"
            )
        for (mask, T), cells in rows.items():
            out.append(f"| {mask} | {T} | " + " | ".join(cells.get(n, "—") for n in names) + " |")
        pref = d.get("preference") or {}
        if pref:
            out += [
                "",
                "Measured order in this run (`backend=None` follows `olmo_attn/backends/preference.json`, and only among backends verified on the architecture): "
                + "; ".join(
                    f"{arch} {kind}: {' > '.join(order)}"
                    for arch, kinds in pref.items()
                    if isinstance(kinds, dict)
                    for kind, order in kinds.items()
                    if isinstance(order, list)
                )
                + ".",
            ]
        out.append("")
    return out


def module() -> list[str]:
    out = []
    for path, d in _load("*-module.json"):
        env, cfg = d["env"], d["config"]
        out += [
            f"**Whole `Attention` module vs OLMo-core 3.0.0** (its torch backend, the only one it can run there) — "
            f"{_gpu(env)}; B{cfg['batch']} T{cfg['seq_len']} d_model {cfg['d_model']} "
            f"Hq{cfg['n_heads']} Hkv{cfg['n_kv_heads']}, RoPE + QK RMS-norm, bf16 autocast, "
            f"forward+backward ([`{path.name}`](benchmarks/results/{path.name})). `(auto)`: what `backend=None` "
            "chose at measurement time (flash_4 was not yet verified; it now is on sm_90, so `backend=None` picks the "
            "flash_4 rows' code path there).",
            "",
            "| window | ours (backend) | ours ms | ours tok/s | OLMo-core ms | OLMo-core tok/s | speed-up | max abs diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in d["results"]:
            if "ours_ms" not in r:
                continue
            win = r["window"] or "full"
            be = r["ours_backend"] + (" (auto)" if r["ours_backend_requested"] == "auto" else "")
            out.append(
                f"| {win} | {be} | {r['ours_ms']:.2f} | {r['ours_tokens_per_s'] / 1e3:.0f}k | "
                f"{r['olmo_core_ms']:.2f} | {r['olmo_core_tokens_per_s'] / 1e3:.0f}k | ×{r['speedup']:.2f} | "
                f"{r['max_abs_diff_vs_olmo_core']:.2g} |"
            )
        out.append("")
    return out


def gdn() -> list[str]:
    out = []
    for path, d in _load("*-gdn.json"):
        env = d["env"]
        out += [
            f"**Gated DeltaNet** — {_gpu(env)}, bf16, B2 T8192 H16 Dk128 Dv256 "
            f"([`{path.name}`](benchmarks/results/{path.name})); causal softmax attention at the same shape for scale.",
            "",
            "| subject | fwd ms | fwd+bwd ms |",
            "|---|---|---|",
        ]
        rows: dict[str, dict[str, str]] = {}
        for r in d["speed"]:
            val = (
                f"{r['median_ms']:.2f}"
                if "median_ms" in r
                else str(r.get("skipped", r.get("error", "—")))[:60]
            )
            rows.setdefault(r["subject"], {})[r["pass"]] = val
        for subject, cells in rows.items():
            out.append(f"| {subject} | {cells.get('fwd', '—')} | {cells.get('fwd+bwd', '—')} |")
        out += ["", "| decode step (batch 64, state 128 MB) | µs | GB/s | % of HBM |", "|---|---|---|---|"]
        for r in d["decode"]:
            if "GB_per_s" in r:
                out.append(
                    f"| {r['subject']} | {r['median_ms'] * 1e3:.0f} | {r['GB_per_s']:.0f} | "
                    f"{100 * r['GB_per_s'] / r['hbm_peak_GB_per_s']:.0f}% |"
                )
        out.append("")
    return out


def _timing(env: dict) -> str:
    return env.get("timing") or "a sync after every run (host launch work counted)"


def gdn_triton() -> list[str]:
    """Our fused Triton Gated DeltaNet kernels next to fla's forward and cuDNN attention, the whole
    layer next to attention, and a profiler split of kernel time and launch gaps."""
    out: list[str] = []
    for path, d in _load("*-gdn-speed.json")[-2:]:  # the two latest runs
        env = d["env"]
        rows: dict[str, dict[str, str]] = {}
        first: dict[str, str] = {}
        for r in d.get("triton_speed", []):
            shape = r.get("shape", "?")
            if r.get("pass") == "first call":
                first[shape] = f"{r['first_fwd_s']:.1f} s / {r['first_fwd_bwd_s']:.1f} s"
                continue
            if "median_ms" not in r:
                continue
            cell = f"{r['median_ms']:.2f}" + (f" ({r['peak_mb']:.0f} MB)" if r.get("peak_mb") else "")
            rows.setdefault(shape, {})[f"{r['subject']} {r['pass']}"] = cell
        if not rows:
            continue
        cols = [
            "ours:triton fwd",
            "ours:triton fwd[train]",
            "ours:triton fwd+bwd",
            "fla fwd",
            "sdpa[cudnn] fwd",
            "sdpa[cudnn] fwd+bwd",
        ]
        out += [
            f"**Gated DeltaNet, our Triton kernels** — {_gpu(env)}, Triton {env.get('triton')}, fla {env.get('fla')}, "
            f"bf16; ms (peak MB above the inputs); timing: {_timing(env)} "
            f"([`{path.name}`](benchmarks/results/{path.name})). fla's backward refuses this GPU + Triton; "
            "`sdpa[cudnn]` is causal softmax attention at the same shape, for scale; `fwd` runs without grad, "
            "`fwd[train]` with it (keeping what the backward reads).",
            "",
            "| shape | " + " | ".join(cols) + " | ours first call (fwd / fwd+bwd, compile) |",
            "|---|" + "---|" * (len(cols) + 1),
        ]
        for shape, cells in rows.items():
            out.append(
                f"| {shape} | "
                + " | ".join(cells.get(c, "—") for c in cols)
                + f" | {first.get(shape, '—')} |"
            )
        out.append("")
    for path, d in _load("*-gdn-layer.json") + _load("*-gdn-speed.json"):
        layer = [r for r in d.get("layer", []) if "median_ms" in r]
        if not layer:
            continue
        r0 = layer[0]
        out += [
            f"**Whole layers** — B{r0['B']} T{r0['T']} d_model {r0['d_model']}, {r0['n_heads']} heads of "
            f"{r0['head_dim']}, bf16; timing: {_timing(d['env'])} ([`{path.name}`](benchmarks/results/{path.name})).",
            "",
            "| layer | pass | ms | tokens/s |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {r['subject']} | {r['pass']} | {r['median_ms']:.2f} | {r['tokens_per_s'] / 1e6:.2f} M |"
            for r in layer
        ]
        out.append("")
    for path, d in _load("*-gdn-profile.json"):
        out += [
            f"**Where our kernels' time goes** (torch.profiler, back-to-back runs; "
            f"[`{path.name}`](benchmarks/results/{path.name})): "
            + "; ".join(
                f"{label} {v['wall_ms']:.2f} ms wall, {v['kernel_ms']:.2f} ms in kernels"
                + (f", {v['host_ms']:.2f} ms of host time per call " if "host_ms" in v else " ")
                + f"(largest: {', '.join(f'{k[0].lstrip(chr(95))} {k[1]:.2f}' for k in v['kernels'][:3])})"
                for label, v in d.items()
            )
            + ".",
            "",
        ]
    return out


def context_parallel() -> list[str]:
    """Ring (zig-zag, llama3) and Ulysses on 2+ GPUs, every backend measured, side by side."""
    runs = _load("*-cp-*.json")
    if not runs:
        return []
    env, cfg = runs[0][1]["environment"], runs[0][1]["config"]
    names = [d["config"]["backend"] for _, d in runs]
    links = ", ".join(f"[`{p.name}`](benchmarks/results/{p.name})" for p, _ in runs)
    out = [
        f"**Context parallelism** — {env.get('gpu', '?')} ×{env['world_size']} over NCCL {env.get('nccl', '')}, "
        f"{cfg['dtype']}, Hq{cfg['n_heads']} Hkv{cfg['n_kv_heads']} D{cfg['head_dim']}, forward+backward ({links}). "
        "**% of ideal** = one GPU running the whole W·T problem alone (same backend, same mask, measured in the same "
        "run) ÷ (W × the CP time of the slowest rank); documents: log-normal lengths around "
        f"{cfg['mean_doc_len']} tokens.",
        "",
        "| strategy | documents | tokens/GPU | "
        + " | ".join(f"{n}: % ideal fwd / fwd+bwd | {n} fwd+bwd ms" for n in names)
        + " |",
        "|---|---|---|" + "---|---|" * len(names),
    ]
    keyed = [
        {(r["strategy"], r["documents"], r["tokens_per_gpu"]): r for r in d["throughput"]} for _, d in runs
    ]
    for key in sorted(
        set().union(*keyed), key=lambda k: (k[2], k[1], ("zig_zag", "llama3", "ulysses").index(k[0]))
    ):
        cells = []
        for rows in keyed:
            r = rows.get(key)
            cells.append(
                f"{r['pct_ideal_fwd']:.0f}% / {r['pct_ideal_fwd_bwd']:.0f}% | {r['fwd_bwd_ms']:.2f}"
                if r
                else "— | —"
            )
        docs = (
            f"yes ({keyed[0][key]['n_docs']})" if key[1] and key in keyed[0] else ("yes" if key[1] else "no")
        )
        out.append(f"| {key[0]} | {docs} | {key[2]} | " + " | ".join(cells) + " |")
    checks = []
    for name, (_, d) in zip(names, runs, strict=True):
        ok = sum(c["passed"] for c in d["correctness"])
        checks.append(f"{name} {ok}/{len(d['correctness'])}")
    out += [
        "",
        "Correctness in the same runs (gathered out, dq, dk, dv vs float64 within the CONFORMANCE budget, every "
        "strategy with and without documents): " + ", ".join(checks) + ".",
        "",
    ]
    return out


def conformance() -> list[str]:
    out = [
        "| report | device | cases | passed | failed | skipped | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(REPORTS.glob("*.json")):
        d = json.loads(p.read_text())
        fp, c = d["fingerprint"], d["counts"]
        dev = f"{fp.get('device_name', '?')} ({fp.get('arch', '?')})"
        md = p.with_suffix(".md").name
        wall = d.get("duration_s")
        out.append(
            f"| [`{md}`](conformance/reports/{md}) | {dev} | {c['total']} | {c['passed']} | {c['failed']} | "
            f"{c['skipped']} | {f'{wall:.0f}' if isinstance(wall, (int, float)) else '—'} |"
        )
    return [*out, ""]


def compiled() -> list[str]:
    """``benchmarks/compile_bench.py``: compiled vs eager per module and case."""
    out = []
    for path, d in _load("*-compile.json"):
        env = d["env"]
        out += [
            f"**`torch.compile` vs eager** — {env['device']}, torch {env['torch']}, {env['dtype']}, forward+backward "
            f"({env.get('timing', '')}); frames: graphs Dynamo made (1 = no graph break) "
            f"([`{path.name}`](benchmarks/results/{path.name})).",
            "",
            "| module | case | eager ms | compiled ms | first call s | frames | top kernel |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["results"]:
            if r.get("error"):
                first = r["error"].splitlines()[0][:90]
                out.append(f"| {r['module']} | {r['case']} | error: {first} | | | | |")
                continue
            top = (r.get("top_kernels") or ["—"])[0][:60]
            out.append(
                f"| {r['module']} | {r['case']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                f"{r['first_call_s']:.1f} | {r['frames']} | `{top}` |"
            )
        out.append("")
    return out


def capabilities() -> list[str]:
    """The backend × feature matrix, straight from the one capability table."""
    import sys

    sys.path.insert(0, str(ROOT))
    from olmo_attn.backends.capabilities import TABLE, Feature

    feats = list(Feature)
    out = [
        "| backend | runs on | dtypes | head dim | verified on hardware | "
        + " | ".join(f.value for f in feats)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(feats),
    ]
    for name, spec in TABLE.items():
        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in spec.dtypes))
        marks = " | ".join("✓" if f in spec.features else "—" for f in feats)
        verified = spec.verified_text()
        out.append(
            f"| {name} | {spec.arch_text()} | {dtypes} | {spec.head_dim_text()} | {verified} | {marks} |"
        )
    return [*out, ""]


def render() -> str:
    parts = [
        "### Capability table",
        "",
        *capabilities(),
        "### Conformance reports",
        "",
        *conformance(),
        "### Speed",
        "",
        *torch_backend(),
        *backends(),
        *module(),
        *compiled(),
        *context_parallel(),
        *gdn(),
        *gdn_triton(),
    ]
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite README.md between the markers")
    args = ap.parse_args()
    text = render()
    if not args.update:
        print(text)
        return
    readme = ROOT / "README.md"
    body = readme.read_text()
    new, n = re.subn(re.escape(BEGIN) + r".*?" + re.escape(END), BEGIN + "\n" + text + END, body, flags=re.S)
    if n != 1:
        raise SystemExit(f"README.md needs exactly one {BEGIN} ... {END} block")
    readme.write_text(new)


if __name__ == "__main__":
    main()
