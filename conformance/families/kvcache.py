"""``kvcache`` family: prefill (optionally left-padded) and decode steps through a ``KVCacheManager``.

Per case: a prompt of ``T0`` tokens, then a few decode steps (1 or 2 tokens each), all against
``reference.kv_cache.KVCache.step`` (float64). Checks: every step's output within the budget (the
low-precision baseline attends over the same cache in the case dtype); the cache contents after
every step equal the reference cache bit for bit (new entries written at ``[seqlen, seqlen + T_new)``,
never below a row's left padding, nothing else touched); and ``cache_poison``: the same run with
every cache slot NaN-filled beforehand — slots that no query may see (below a row's left padding,
past the used length) must not reach any output.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reference.attention import allowed_mask
from reference.kv_cache import KVCache

from .. import baseline
from ..checks import CheckResult, bit_identical, fail, judge_softmax, ok
from ..results import RunContext
from ..subjects import Subject
from .softmax import draw_heads, draw_window, randn

if TYPE_CHECKING:
    from ..cases import Case


def _steps(rng: np.random.Generator, full: bool) -> tuple[int, list[int]]:
    t0 = int(rng.choice([63, 129, 200] if full else [5, 12, 31]))
    steps = [1] * int(rng.integers(2, 4)) + ([2] if rng.random() < 0.5 else [])
    return t0, steps


def run_kvcache(case: Case, subject: Subject, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    from olmo_attn.kv_cache import KVCacheManager

    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    full = case.size == "full"
    dtype, device, variant = case.torch_dtype(), case.device, case.variant
    p = case.param
    Hq, Hkv = draw_heads(rng, p["gqa"], full)
    D = int(p["head_dim"])
    B = int(rng.integers(1, 4))
    t0, steps = _steps(rng, full)
    total = t0 + sum(steps)
    capacity = total + int(rng.choice([0, 3]))
    w = draw_window(rng, total) if variant == "window" else None
    window = (w - 1, 0) if w is not None else (-1, -1)
    leftpad = [0] * B
    if variant == "leftpad":
        leftpad = [int(rng.integers(0, t0)) for _ in range(B)]
        leftpad[int(rng.integers(0, B))] = 0
        if B > 1:
            leftpad[(leftpad.index(0) + 1) % B] = t0 - 1  # one row with a single real prompt token
    info: dict[str, Any] = {
        "B": B,
        "Hq": Hq,
        "Hkv": Hkv,
        "D": D,
        "prompt": t0,
        "steps": steps,
        "capacity": capacity,
        "window_size": w,
        "leftpad": leftpad,
    }
    q = randn(gen, (B, total, Hq, D), dtype)
    k = randn(gen, (B, total, Hkv, D), dtype)
    v = randn(gen, (B, total, Hkv, D), dtype)
    chunks = [(0, t0)]
    pos = t0
    for n in steps:
        chunks.append((pos, pos + n))
        pos += n

    # reference: functional cache, float64
    ref_cache = KVCache.empty(B, capacity, Hkv, D)
    ref_outs, ref_caches = [], []
    for i, (a, b) in enumerate(chunks):
        out, _, ref_cache = ref_cache.step(
            q[:, a:b].numpy(),
            k[:, a:b].numpy(),
            v[:, a:b].numpy(),
            cache_leftpad=np.asarray(leftpad) if i == 0 else None,
            window=window,
        )
        ref_outs.append(torch.from_numpy(out))
        ref_caches.append(
            (torch.from_numpy(ref_cache.k_cache.copy()), torch.from_numpy(ref_cache.v_cache.copy()))
        )
    ref_out = torch.cat(ref_outs, 1)

    # low-precision baseline: the same cache semantics in the case dtype
    low_outs = []
    kc = torch.zeros(B, capacity, Hkv, D, dtype=dtype)
    vc = torch.zeros_like(kc)
    lp = torch.tensor(leftpad)
    for a, b in chunks:
        write = (torch.arange(a, b)[None, :] >= lp[:, None])[..., None, None]
        kc[:, a:b] = torch.where(write, k[:, a:b].to(dtype), kc[:, a:b])
        vc[:, a:b] = torch.where(write, v[:, a:b].to(dtype), vc[:, a:b])
        allowed = torch.from_numpy(allowed_mask(b - a, b, causal=True, window=window))[None]
        allowed = allowed & (torch.arange(b)[None, None, :] >= lp[:, None, None])
        o, _ = baseline.attention(q[:, a:b].to(dtype), kc[:, :b], vc[:, :b], allowed)
        low_outs.append(o)
    low_out = torch.cat(low_outs, 1)

    backend = subject.build_backend(
        head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=None, dropout_p=0.0, window_size=window
    )
    backend.eval()

    def generate(poisoned: bool) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        manager = KVCacheManager(B, capacity, Hkv, D, device=device, dtype=dtype)
        if poisoned:
            manager.k_cache.fill_(math.nan)
            manager.v_cache.fill_(math.nan)
        manager.record_leftpad(torch.tensor(leftpad, dtype=torch.int32, device=device))
        outs, caches = [], []
        with torch.no_grad():
            for a, b in chunks:
                qs, ks, vs = (t[:, a:b].to(device=device, dtype=dtype) for t in (q, k, v))
                outs.append(backend((qs, ks, vs), kv_cache_manager=manager).cpu())
                manager.update_seqlen(b - a)
                caches.append(
                    (manager.k_cache.detach().cpu().clone(), manager.v_cache.detach().cpu().clone())
                )
        return torch.cat(outs, 1), caches

    out, caches = generate(poisoned=False)
    checks = judge_softmax({"out": out}, {"out": ref_out}, {"out": low_out}, dtype)
    checks.append(_cache_check(caches, ref_caches))
    poisoned_out, _ = generate(poisoned=True)
    verdicts = judge_softmax(
        {"out": poisoned_out}, {"out": ref_out}, {"out": low_out}, dtype, mean_check=False
    )
    bad = [c for c in verdicts if not c.passed]
    checks.append(
        fail(
            "cache_poison",
            "cache_poison: NaN in cache slots that no query may see (before a row's left "
            "padding or past the used length) reached the output: " + "; ".join(c.message for c in bad),
        )
        if bad
        else ok("cache_poison", "cache_poison: NaN-filled invisible cache slots change nothing")
    )
    return checks, info


def _cache_check(
    caches: list[tuple[torch.Tensor, torch.Tensor]], ref_caches: list[tuple[torch.Tensor, torch.Tensor]]
) -> CheckResult:
    for step, ((k, v), (rk, rv)) in enumerate(zip(caches, ref_caches)):
        for name, a, b in (("k_cache", k, rk), ("v_cache", v, rv)):
            same, msg = bit_identical(name, a.double(), b)
            if not same:
                return fail("cache_write", f"cache_write: after step {step}: {msg}")
    return ok(
        "cache_write", f"cache_write: {len(caches)} steps, cache contents bit-identical to the reference"
    )
