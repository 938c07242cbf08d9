"""First-call GPU smoke test of the flash_4 adapter (run it before the conformance suite).

On a CUDA machine with flash-attn-4 importable (scripts/fa4/README.md), checks the
``flash_4`` backend and its LSE kernel, forward and backward, against the float64 reference
(``reference.twins``, on the CPU) with the conformance error budget (docs/judging.md) —
``max|out - ref| <= 2 * max|low - ref| + atol``, ``low`` being the same math in the case's dtype,
``atol = 2 * max|(ref + 0.3 - 0.3) - ref|`` in that dtype — and reports the torch backend on the
same inputs beside it (judged the same way) plus the pairwise flash_4 / torch difference.

Cases: causal GQA (bf16 and fp16), MQA with D 64, custom scale, sliding window, packed documents,
documents + window, separate query/key documents with ``local_k_slice`` (llama3 layout), packed QKV,
KV-cache prefill with left padding + decode steps, the LSE kernel in a two-rank ring emulation
(causal diagonal blocks, a full off-diagonal block, LSE merge, backward from the merged out / lse),
the varlen kernel with a window, rows without keys (no NaN, lse -inf), deterministic backward
(bit-identical twice).

    python3 scripts/fa4/gpu_check.py --out $OUT/fa4_gpu_check.json
    python3 scripts/fa4/gpu_check.py --only kernel,KV      # a subset (names contain a substring)

Exit status 0 when every check passes, 1 otherwise; a table on stdout, details in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from olmo_attn.backends import capabilities as caps  # noqa: E402
from olmo_attn.backends.base import AttentionBackendName  # noqa: E402
from olmo_attn.hardware import info_for, package_status  # noqa: E402
from olmo_attn.kv_cache import KVCacheManager  # noqa: E402
from olmo_attn.ops.kernel import KernelCall  # noqa: E402
from reference import twins  # noqa: E402
from reference.attention import allowed_mask  # noqa: E402
from reference.kv_cache import kv_cache_attention  # noqa: E402

DEV = "cuda"
RESULTS: list[dict[str, Any]] = []


# ----- judging --------------------------------------------------------------------------------------
def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def _atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    r = ref.detach().to(DEV, dtype)
    return 2.0 * float(((r + 0.3 - 0.3).double() - r.double()).abs().max())


def budget(out: torch.Tensor, low: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """The conformance budget (docs/judging.md): err <= 2 * low_err + atol; NaN/Inf anywhere fails."""
    err, low_err = _max_abs(out, ref), _max_abs(low, ref)
    thr = 2.0 * low_err + _atol(ref, dtype)
    finite = bool(torch.isfinite(out.detach()).all())
    return {"err": err, "low_err": low_err, "threshold": thr, "ok": finite and err <= thr}


def record(name: str, ok: bool, info: bool = False, **details: Any) -> None:
    """One check's verdict; ``info=True`` rows are reported but do not decide the exit status."""
    RESULTS.append({"check": name, "ok": bool(ok), "info": info, **details})
    tag = ("pass" if ok else "fail") if info else ("PASS" if ok else "FAIL")
    print(f"{tag}  {name}  {json.dumps(details, default=str)[:300]}", flush=True)


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as e:
                record(name, False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])

        run.__name__ = fn.__name__
        run.check_name = name  # type: ignore[attr-defined]
        CHECKS.append(run)
        return run

    return wrap


CHECKS: list[Callable[[], None]] = []


# ----- reference and low-precision baseline ------------------------------------------------------------
def low_attention(q, k, v, *, scale, causal=True, window=(-1, -1), cu_q=None, cu_k=None) -> torch.Tensor:
    """Plain PyTorch attention in the inputs' dtype on the GPU (the dtype-only error baseline)."""
    Tq, Tk = q.shape[1], k.shape[1]
    allowed = torch.from_numpy(
        allowed_mask(
            Tq, Tk, causal=causal, window=window,
            cu_seqlens_q=None if cu_q is None else cu_q.cpu().numpy(),
            cu_seqlens_k=None if cu_k is None else cu_k.cpu().numpy(),
        )
    ).to(q.device)  # fmt: skip
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def grads_of(fn: Callable[..., torch.Tensor], q, k, v, dout) -> tuple[torch.Tensor, ...]:
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def inputs(B, Tq, Hq, Hkv, D, dtype, seed, Tk=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    q = torch.randn(B, Tq, Hq, D, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, D, generator=g, device=DEV, dtype=dtype)
    dout = torch.randn(B, Tq, Hq, D, generator=g, device=DEV, dtype=dtype)
    return q, k, v, dout


def compare_module(
    name: str,
    *,
    dtype=torch.bfloat16,
    B=2,
    T=512,
    Hq=8,
    Hkv=2,
    D=128,
    window=(-1, -1),
    scale=None,
    cu=None,
    cu_k=None,
    Tk=None,
    local_k_slice=None,
    packed=False,
) -> None:
    """flash_4 and torch backends vs the float64 reference, forward and backward."""
    q, k, v, dout = inputs(B, T, Hq, Hkv, D, dtype, seed=zlib.crc32(name.encode()), Tk=Tk)
    eff_scale = scale if scale is not None else 1 / math.sqrt(D)
    kw: dict[str, Any] = {}
    if cu is not None:
        kw = {"cu_doc_lens": cu} if cu_k is None else {"cu_doc_lens_q": cu, "cu_doc_lens_k": cu_k}
        if local_k_slice is not None:
            kw["local_k_slice"] = local_k_slice

    def flat(x):
        return x.reshape(1, -1, *x.shape[2:])

    def key_part(x):
        f = flat(x)
        return f[:, local_k_slice] if local_k_slice is not None else f

    # float64 reference on the CPU (documents: one flattened sequence)
    c = lambda x: x.detach().double().cpu()
    cu_np = None if cu is None else cu.cpu().numpy()
    cuk_np = cu_np if cu_k is None else cu_k.cpu().numpy()

    def ref_fn(q_, k_, v_):
        if cu is None:
            return twins.attention(q_, k_, v_, scale=eff_scale, causal=True, window=window)[0]
        out = twins.attention(
            flat(q_), key_part(k_), key_part(v_), scale=eff_scale, causal=True, window=window,
            cu_seqlens_q=cu_np, cu_seqlens_k=cuk_np,
        )[0]  # fmt: skip
        return out.reshape(q_.shape)

    ref = grads_of(ref_fn, c(q), c(k), c(v), c(dout))

    def low_fn(q_, k_, v_):
        if cu is None:
            return low_attention(q_, k_, v_, scale=eff_scale, window=window)
        out = low_attention(
            flat(q_), key_part(k_), key_part(v_), scale=eff_scale, window=window, cu_q=cu,
            cu_k=cu if cu_k is None else cu_k,
        )  # fmt: skip
        return out.reshape(q_.shape)

    low = grads_of(low_fn, q, k, v, dout)
    outs = {}
    for backend_name in ("flash_4", "torch"):
        backend = AttentionBackendName(backend_name).build(
            head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=scale, window_size=window
        )
        if packed:
            fn = lambda q_, k_, v_, b=backend: b(torch.stack([q_, k_, v_], dim=2), **kw)
        else:
            fn = lambda q_, k_, v_, b=backend: b((q_, k_, v_), **kw)
        got = grads_of(fn, q, k, v, dout)
        outs[backend_name] = got
        verdicts = {
            n: budget(g, lo, r, dtype) for n, g, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref)
        }
        record(
            f"{name} [{backend_name}]",
            all(x["ok"] for x in verdicts.values()),
            info=backend_name != "flash_4",  # the torch backend is reported beside flash_4, not gated here
            **{
                n: {k2: round(v2, 6) if isinstance(v2, float) else v2 for k2, v2 in x.items()}
                for n, x in verdicts.items()
            },
        )
    pair = {n: _max_abs(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), outs["flash_4"], outs["torch"])}
    RESULTS.append({"check": f"{name} [flash_4 vs torch]", "ok": True, "info": True, "max_abs_diff": pair})


# ----- module-level cases ------------------------------------------------------------------------------
@check("causal GQA bf16")
def _causal_bf16() -> None:
    compare_module("causal GQA bf16")


@check("causal GQA fp16")
def _causal_fp16() -> None:
    compare_module("causal GQA fp16", dtype=torch.float16)


@check("MQA D64 custom scale")
def _mqa() -> None:
    compare_module("MQA D64 custom scale", Hq=8, Hkv=1, D=64, scale=0.05)


@check("sliding window 128")
def _window() -> None:
    compare_module("sliding window 128", window=(127, 0))


def _docs(B: int, T: int) -> torch.Tensor:
    lengths = [5, 100, 1, 250, 156, 300, 212]  # crosses the row boundary at 512
    assert sum(lengths) == B * T
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=DEV)


@check("packed documents")
def _documents() -> None:
    compare_module("packed documents", cu=_docs(2, 512))


@check("documents + window 64")
def _documents_window() -> None:
    compare_module("documents + window 64", cu=_docs(2, 512), window=(63, 0))


@check("query/key documents with local_k_slice (llama3)")
def _documents_qk() -> None:
    # 256 local queries; keys = 512 gathered tokens of which this rank needs rows 128..512
    cu_q = torch.tensor([0, 40, 256], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 168, 384], dtype=torch.int32, device=DEV)  # segments end with their queries
    compare_module(
        "query/key documents with local_k_slice (llama3)", B=1, T=256, Tk=512, cu=cu_q, cu_k=cu_k,
        local_k_slice=slice(128, 512),
    )  # fmt: skip


@check("packed QKV (MHA)")
def _packed() -> None:
    compare_module("packed QKV (MHA)", Hq=4, Hkv=4)


@check("KV cache: left-padded prefill + decode")
def _kv_cache() -> None:
    B, S, Hq, Hkv, D, T0 = 3, 64, 8, 2, 128, 20
    leftpad = torch.tensor([0, 7, 3], dtype=torch.int32)
    backend = AttentionBackendName.flash_4.build(
        head_dim=D, n_heads=Hq, n_kv_heads=Hkv, window_size=(15, 0)
    ).eval()
    torch_backend = AttentionBackendName.torch.build(
        head_dim=D, n_heads=Hq, n_kv_heads=Hkv, window_size=(15, 0)
    )
    caches = {}
    for name in ("flash_4", "torch"):
        caches[name] = KVCacheManager(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
        caches[name].record_leftpad(leftpad.to(DEV))
    k_ref = np.zeros((B, S, Hkv, D))
    v_ref = np.zeros((B, S, Hkv, D))
    pos, worst, worst_pair = 0, 0.0, 0.0
    ok = True
    for step, T in enumerate([T0, 1, 1, 3]):
        q, k, v, _ = inputs(B, T, Hq, Hkv, D, torch.bfloat16, seed=100 + step)
        with torch.no_grad():
            out = backend((q, k, v), kv_cache_manager=caches["flash_4"])
            out_t = torch_backend((q, k, v), kv_cache_manager=caches["torch"])
        for m in caches.values():
            m.update_seqlen(T)
        ref, _, k_ref, v_ref = kv_cache_attention(
            q.float().cpu().numpy(), k.float().cpu().numpy(), v.float().cpu().numpy(), k_ref, v_ref,
            cache_seqlens=pos, cache_leftpad=leftpad.numpy(), window=(15, 0),
        )  # fmt: skip
        valid = torch.from_numpy((pos + np.arange(T))[None, :] >= leftpad.numpy()[:, None])[..., None, None]
        err = float(((out.double().cpu() - torch.from_numpy(ref)) * valid).abs().max())
        worst = max(worst, err)
        worst_pair = max(worst_pair, float(((out.double() - out_t.double()).cpu() * valid).abs().max()))
        ok = ok and err < 3e-2 and bool(torch.isfinite(out).all())
        pos += T
    record("KV cache: left-padded prefill + decode", ok, max_err_vs_ref=worst, max_diff_vs_torch=worst_pair)


# ----- the LSE kernel --------------------------------------------------------------------------------
def _merge(o1, l1, o2, l2):
    """Stable LSE merge: ``o [B, T, H, D]``, ``l [B, H, T]``."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    tot = w1 + w2
    lse = torch.where(tot > 0, m + torch.log(tot), torch.full_like(m, -math.inf))
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    f1 = (w1 / safe).transpose(1, 2)[..., None]
    f2 = (w2 / safe).transpose(1, 2)[..., None]
    return o1.float() * f1 + o2.float() * f2, lse


@check("kernel: two-rank ring emulation (fwd + bwd)")
def _kernel_ring() -> None:
    B, T, Hq, Hkv, D = 2, 512, 8, 2, 128
    q, k, v, dout = inputs(B, T, Hq, Hkv, D, torch.bfloat16, seed=7)
    kern = AttentionBackendName.flash_4.build(head_dim=D, n_heads=Hq, n_kv_heads=Hkv).kernel()
    scale = 1 / math.sqrt(D)
    h = T // 2
    q0, q1, k0, k1, v0, v1 = q[:, :h], q[:, h:], k[:, :h], k[:, h:], v[:, :h], v[:, h:]
    diag = KernelCall(scale=scale, causal=True)
    full = KernelCall(scale=scale, causal=False)
    o00, l00 = kern.forward(q0, k0, v0, diag)
    o10, l10 = kern.forward(q1, k0, v0, full)
    o11, l11 = kern.forward(q1, k1, v1, diag)
    o1, l1 = _merge(o10, l10, o11, l11)
    out = torch.cat([o00.float(), o1], 1)
    lse = torch.cat([l00, l1], 2)
    d0, d1 = dout[:, :h], dout[:, h:]
    dq0, dk0a, dv0a = kern.backward(d0, q0, k0, v0, o00, l00, diag)
    dq1a, dk0b, dv0b = kern.backward(d1, q1, k0, v0, o1, l1, full)
    dq1b, dk1, dv1 = kern.backward(d1, q1, k1, v1, o1, l1, diag)
    got = (
        out,
        torch.cat([dq0, dq1a + dq1b], 1),
        torch.cat([dk0a + dk0b, dk1], 1),
        torch.cat([dv0a + dv0b, dv1], 1),
    )
    c = lambda x: x.detach().double().cpu()
    ref = grads_of(lambda a, b, e: twins.attention(a, b, e, scale=scale)[0], c(q), c(k), c(v), c(dout))
    _, ref_lse = twins.attention(c(q), c(k), c(v), scale=scale)
    low = grads_of(lambda a, b, e: low_attention(a, b, e, scale=scale), q, k, v, dout)
    verdicts = {
        n: budget(g, lo, r, torch.bfloat16) for n, g, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref)
    }
    lse_err = _max_abs(lse, ref_lse)
    record(
        "kernel: two-rank ring emulation (fwd + bwd)",
        all(x["ok"] for x in verdicts.values()) and lse_err < 1e-2,
        lse_err=lse_err,
        **{n: x for n, x in verdicts.items()},
    )


@check("kernel: varlen + window, lse")
def _kernel_varlen() -> None:
    T, Hq, Hkv, D = 600, 8, 2, 128
    q, k, v, dout = (x[0] for x in inputs(1, T, Hq, Hkv, D, torch.bfloat16, seed=9))
    cu = torch.tensor([0, 17, 300, 301, 600], dtype=torch.int32, device=DEV)
    host = tuple(cu.tolist())
    call = KernelCall(
        scale=0.1, causal=True, window=(31, 0), cu_seqlens_q=cu, cu_seqlens_k=cu, cu_seqlens_q_host=host,
        cu_seqlens_k_host=host,
    )  # fmt: skip
    kern = AttentionBackendName.flash_4.build(head_dim=D, n_heads=Hq, n_kv_heads=Hkv).kernel()
    out, lse = kern.forward(q, k, v, call)
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, call)
    c = lambda x: x.detach().double().cpu()
    cu_np = cu.cpu().numpy()

    def ref_fn(a, b, e):
        return twins.attention(a, b, e, scale=0.1, window=(31, 0), cu_seqlens_q=cu_np, cu_seqlens_k=cu_np)[0]

    ref = grads_of(ref_fn, c(q), c(k), c(v), c(dout))
    _, ref_lse = twins.attention(
        c(q), c(k), c(v), scale=0.1, window=(31, 0), cu_seqlens_q=cu_np, cu_seqlens_k=cu_np
    )

    def low_fn(a, b, e):
        return low_attention(a[None], b[None], e[None], scale=0.1, window=(31, 0), cu_q=cu, cu_k=cu)[0]

    low = grads_of(low_fn, q, k, v, dout)
    verdicts = {
        n: budget(g, lo, r, torch.bfloat16)
        for n, g, lo, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), low, ref)
    }
    lse_err = _max_abs(lse, ref_lse)
    record(
        "kernel: varlen + window, lse",
        all(x["ok"] for x in verdicts.values()) and lse_err < 1e-2 and lse.shape == (Hq, T),
        lse_err=lse_err,
        **verdicts,
    )


@check("kernel: rows without keys -> out 0, lse -inf, finite grads")
def _kernel_empty_rows() -> None:
    q, k, v, dout = inputs(1, 256, 8, 2, 128, torch.bfloat16, seed=11, Tk=128)
    kern = AttentionBackendName.flash_4.build(head_dim=128, n_heads=8, n_kv_heads=2).kernel()
    call = KernelCall(scale=1 / math.sqrt(128), causal=True)  # bottom-right: the first 128 rows see nothing
    out, lse = kern.forward(q, k, v, call)
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, call)
    ok = (
        bool(torch.isneginf(lse[..., :128]).all())
        and bool((out[:, :128] == 0).all())
        and all(bool(torch.isfinite(g).all()) for g in (dq, dk, dv))
        and bool((dq[:, :128] == 0).all())
    )
    record("kernel: rows without keys -> out 0, lse -inf, finite grads", ok)


@check("deterministic backward is bit-identical")
def _deterministic() -> None:
    q, k, v, dout = inputs(2, 1024, 8, 2, 128, torch.bfloat16, seed=13)
    backend = AttentionBackendName.flash_4.build(head_dim=128, n_heads=8, n_kv_heads=2, window_size=(255, 0))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [grads_of(lambda a, b, e: backend((a, b, e)), q, k, v, dout) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    record("deterministic backward is bit-identical", same)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON with every check's numbers")
    p.add_argument(
        "--only", default="", help="comma list of substrings: run only the checks whose name has one"
    )
    args = p.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    dev = info_for(DEV)
    reason = caps.unavailable_reason("flash_4", DEV)
    status = package_status("flash_attn.cute", "flash-attn-4")
    header = {
        "device": dev.name,
        "arch": dev.arch,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flash_attn_4": status.version,
        "flash_4_unavailable": reason,
    }
    print(json.dumps(header), flush=True)
    if reason is not None:
        record("flash_4 available", False, reason=reason)
    else:
        for fn in CHECKS:
            if not wanted or any(w in fn.check_name for w in wanted):  # type: ignore[attr-defined]
                fn()
    checks = [r for r in RESULTS if not r.get("info")]
    failed = [r["check"] for r in checks if not r["ok"]]
    print(
        f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
        + (f"; FAILED: {failed}" if failed else "")
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": header, "results": RESULTS}, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
