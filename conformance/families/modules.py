"""``module`` family: ``Attention``, ``FusedAttention`` and ``NormalizedAttention`` end to end.

Per case: build the module on the backend under test, load random weights (rounded to each
parameter's dtype), run ``x [B, T, d_model]`` forward and backward, and judge the output, ``dx`` and
every parameter gradient against ``reference.modules`` (forward, NumPy float64) and
``reference.twins`` (gradients, float64 autograd), with a plain-PyTorch module forward in the case
dtype as the low-precision baseline. Documents add the isolation check (other documents' ``out``
and ``dx`` bit-identical); every case gets the poisoned re-run. ``kvcache_generate`` prefills a
left-padded prompt and decodes through the module's ``KVCacheManager``
(``reference.modules.attention_forward_cached``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import reference.modules as ref_mod
import reference.twins as twins
from reference.attention import allowed_mask
from reference.kv_cache import KVCache
from reference.rope import document_positions

from .. import baseline
from .. import tolerances as tol
from ..checks import CheckResult, Segment, check_isolation, fail, judge_softmax, nan_poison, ok
from ..results import RunContext, Stored
from ..subjects import Subject
from .softmax import draw_documents, draw_window, randn

if TYPE_CHECKING:
    from ..cases import Case

Tensors = dict[str, torch.Tensor]


@dataclass
class Setup:
    """One module configuration: constructor kwargs (``olmo_attn``) and reference options."""

    kind: str  # "attention" | "fused" | "normalized"
    ctor: dict[str, Any]
    ref: dict[str, Any]
    B: int
    T: int
    d_model: int
    cu: list[int] | None = None
    generate: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _rope_objects(name: str, rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    """(RoPEConfig, reference rope dict) for a rope variant."""
    from olmo_attn.rope import (
        ABFRoPEScalingConfig,
        PIRoPEScalingConfig,
        RoPEConfig,
        StepwiseRoPEScalingConfig,
        YaRNRoPEScalingConfig,
    )

    theta = int(rng.choice([10_000, 500_000]))
    if name == "rope_complex":
        return RoPEConfig(name="complex", theta=theta), {"name": "complex", "theta": theta}
    if name == "rope_partial":
        return RoPEConfig(theta=theta, partial_rotary_factor=0.5), {
            "name": "default",
            "theta": theta,
            "partial_rotary_factor": 0.5,
        }
    if name == "fused_rope":
        return RoPEConfig(name="fused", theta=theta), {"name": "fused", "theta": theta}
    scalings = {
        "rope_abf": (
            ABFRoPEScalingConfig(attention_rescale_factor=1.5, new_theta=20_000),
            {"type": "abf", "attention_rescale_factor": 1.5, "new_theta": 20_000},
        ),
        "rope_pi": (PIRoPEScalingConfig(factor=2.0), {"type": "pi", "factor": 2.0}),
        "rope_stepwise": (
            StepwiseRoPEScalingConfig(factor=8.0, old_context_len=16),
            {"type": "stepwise", "factor": 8.0, "old_context_len": 16},
        ),
        "rope_yarn": (
            YaRNRoPEScalingConfig(factor=4.0, old_context_len=16),
            {"type": "yarn", "factor": 4.0, "old_context_len": 16},
        ),
    }
    if name in scalings:
        cfg, ref = scalings[name]
        return RoPEConfig(theta=theta, scaling=cfg), {"name": "default", "theta": theta, "scaling": ref}
    return RoPEConfig(theta=theta), {"name": "default", "theta": theta}


def _norm_objects(kind: str) -> tuple[Any, dict[str, Any]]:
    from olmo_attn.norm import LayerNormConfig

    if kind == "l2_norm":
        return LayerNormConfig(name="l2_norm"), {"name": "l2_norm"}
    return LayerNormConfig(name=kind, eps=1e-5), {"name": kind, "eps": 1e-5}


def make_setup(case: Case) -> Setup:
    """The module configuration of a ``module`` case, drawn from its seed."""
    from olmo_attn.attention import GateConfig

    rng = case.rng()
    full = case.size == "full"
    v = case.variant
    H = int(rng.choice([4, 8] if full else [2, 4]))
    # GPU kernels (flash-attn 3 in particular) take a few head dims only: 64 there, small on CPU
    D = 64 if case.device == "cuda" else int(rng.choice([16, 32] if full else [8, 16]))
    d_model = H * D if rng.random() < 0.7 or v.startswith(("fused", "normalized")) else H * D + 8
    B = int(rng.integers(1, 3))
    T = int(rng.choice([65, 130, 257] if full else [9, 17, 33]))
    ctor: dict[str, Any] = {"d_model": d_model, "n_heads": H}
    ref: dict[str, Any] = {"n_heads": H}
    if d_model != H * D and v not in ("fused", "normalized"):
        ctor["head_dim"] = D
        ref["head_dim"] = D
    kind = "fused" if v.startswith("fused") else "normalized" if v.startswith("normalized") else "attention"
    cu = None
    if v in ("gqa", "everything", "kvcache_generate"):
        ctor["n_kv_heads"] = ref["n_kv_heads"] = H // 2
    if v == "mqa":
        ctor["n_kv_heads"] = ref["n_kv_heads"] = 1
    if v == "bias_free":
        ctor["bias"] = False
    if v == "softmax_scale":
        ctor["softmax_scale"] = ref["softmax_scale"] = 0.3
    if v in ("gate_headwise", "gate_documents"):
        ctor["gate"], ref["gate"] = GateConfig(granularity="headwise"), "headwise"
    if v in ("gate_elementwise", "everything"):
        ctor["gate"], ref["gate"] = GateConfig(granularity="elementwise"), "elementwise"
    if v == "gate_half_sigmoid":
        ctor["gate"] = GateConfig(granularity="headwise", full_precision=False)
        ref["gate"] = {"granularity": "headwise", "full_precision": False}
    if v.startswith("rope") or v in ("everything", "fused_rope", "normalized_rope", "kvcache_generate"):
        ctor["rope"], ref["rope"] = _rope_objects(v, rng)
    if v.startswith("qk_norm") or v == "everything":
        kind_n = {"qk_norm_layer": "default", "qk_norm_qwen": "qwen_rms", "qk_norm_l2": "l2_norm"}.get(
            v, "rms"
        )
        ctor["qk_norm"], ref["qk_norm"] = _norm_objects(kind_n)
        if v == "qk_norm_per_head":
            ctor["use_head_qk_norm"] = ref["use_head_qk_norm"] = True
    if kind == "normalized":
        ctor["qk_norm"], ref["qk_norm"] = _norm_objects("l2_norm")
    if v in ("clip_qkv", "everything"):
        ctor["clip_qkv"] = ref["clip_qkv"] = 0.5
    if v in ("window", "everything"):
        w = draw_window(rng, T)
        ctor["window_size"] = ref["window_size"] = w
    if v in ("gate_documents", "rope_documents", "fused_documents", "everything"):
        B = 2 if v == "gate_documents" else B
        cu = draw_documents(rng, B, T)
    info = {
        "B": B,
        "T": T,
        "d_model": d_model,
        "n_heads": H,
        "head_dim": D,
        "cu_doc_lens": cu,
        "window_size": ctor.get("window_size"),
    }
    return Setup(kind, ctor, ref, B, T, d_model, cu, generate=(v == "kvcache_generate"), info=info)


def place_clip(setup: Setup, weights: Tensors, x: torch.Tensor, dtype: torch.dtype) -> float | None:
    """Put ``clip_qkv`` in a gap of the projections' magnitudes, away from every value by more than the
    case dtype's rounding of the projections.

    ``clamp`` has a kink: a projection that rounds to the other side of the bound flips its
    gradient between 0 and O(1), which no error budget can bound (and which happens to any correct
    implementation, more often the larger the case). So the bound is placed among the largest
    magnitudes (a few values are still clipped: the feature is exercised) in a gap at least four
    times wider than the largest rounding error of the projections (two on each side). Returns the bound, or ``None``
    when no such gap exists (then nothing is clipped and ``info`` says so).
    """
    if "clip_qkv" not in setup.ref:
        return None
    names = ("w_qkv",) if setup.kind == "fused" else ("w_q", "w_k", "w_v")
    mags, errs = [], []
    for n in names:
        w, b = weights[f"{n}.weight"], weights.get(f"{n}.bias")
        exact = baseline.linear(x, w, b)
        rounded = baseline.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).double()
        mags.append(exact.abs().flatten())
        errs.append((rounded - exact).abs().max())
    band = 2 * float(torch.stack(errs).max()) + 1e-12  # the module's rounding may differ from ours
    top = torch.sort(torch.cat(mags), descending=True).values
    hi = max(8, top.numel() // 100)
    window = top[1 : hi + 1]  # at least two values stay clipped
    gaps = window[:-1] - window[1:]
    if gaps.numel() == 0 or float(gaps.max()) <= 2 * band:
        return None
    i = int(gaps.argmax())
    return float((window[i] + window[i + 1]) / 2)


def build_module(setup: Setup, subject: Subject, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The ``olmo_attn`` module on the backend under test (registered subjects are swapped in)."""
    from olmo_attn.attention import Attention, FusedAttention, NormalizedAttention

    cls = {"attention": Attention, "fused": FusedAttention, "normalized": NormalizedAttention}[setup.kind]
    module = cls(**setup.ctor, backend=subject.table_name, dtype=dtype, init_device=device)
    if not subject.shipped:
        module.backend = subject.build_backend(**module._backend_kwargs)
        module._backend_auto = False
    if subject.module_hook is not None:
        module = subject.module_hook(module)
    return module


def _std(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) of a random parameter value."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name in ("sq", "sk"):
        return 0.0, 0.0
    if name.endswith(".bias"):
        return 0.0, 0.1
    return 0.0, 1.0 / math.sqrt(shape[-1])


def load_random_weights(
    module: torch.nn.Module, gen: torch.Generator, d_model: int
) -> dict[str, torch.Tensor]:
    """Random parameters (each rounded to its own dtype), loaded into ``module``; returns float64 copies."""
    weights = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            mean, std = _std(name, p.shape)
            if name in ("sq", "sk"):
                val = (1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)) / math.sqrt(
                    d_model
                )
            else:
                val = mean + std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            val = val.to(p.dtype)
            p.copy_(val)
            weights[name] = val.to(torch.float64)
    return weights


# ------------------------------------------------------------------------------------------ low


def _low_norm(x: torch.Tensor, cfg: dict[str, Any], w: Tensors, prefix: str) -> torch.Tensor:
    """Norm in float32 or wider (QK-norm's default ``full_precision``), cast back."""
    comp = torch.promote_types(x.dtype, torch.float32)
    weight = w.get(f"{prefix}.weight")
    bias = w.get(f"{prefix}.bias")
    y = baseline.norm(
        x.to(comp),
        cfg["name"],
        None if weight is None else weight.to(comp),
        None if bias is None else bias.to(comp),
        cfg.get("eps", 1e-5),
    )
    return y.to(x.dtype)


def _low_rope(
    q: torch.Tensor, k: torch.Tensor, rope: dict[str, Any], pos: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE at positions ``pos [B, T]`` computed in float32 or wider (``full_precision``), cast back."""
    cfg = dict(rope)
    variant = cfg.pop("name", "default")
    comp = torch.promote_types(q.dtype, torch.float32)
    (sq_, cq), (sk_, ck) = baseline.rope_tables(
        pos,
        pos,
        q.shape[-1],
        variant=variant,
        theta=cfg.get("theta", 500_000),
        scaling=cfg.get("scaling"),
        partial_rotary_factor=cfg.get("partial_rotary_factor", 1.0),
        dtype=comp,
        device=q.device,
    )
    rot = baseline.rotate_complex if variant == "complex" else baseline.rotate_half
    return rot(q.to(comp), sq_, cq).to(q.dtype), rot(k.to(comp), sk_, ck).to(k.dtype)


def low_forward(
    setup: Setup, w: Tensors, x: torch.Tensor, *, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch math of the module in ``x.dtype`` (``w``: parameters in their dtypes)."""
    opts = setup.ref
    B, T, _ = x.shape
    H = opts["n_heads"]
    if setup.kind == "fused":
        D = setup.d_model // H
        qkv = baseline.linear(x, w["w_qkv.weight"], w.get("w_qkv.bias")).view(B, T, 3, H, D)
        if "clip_qkv" in opts:
            qkv = qkv.clamp(-opts["clip_qkv"], opts["clip_qkv"])
        q, k, v = qkv.unbind(2)
        Hkv = H
    else:
        D = opts.get("head_dim") or setup.d_model // H
        Hkv = opts.get("n_kv_heads") or H
        q = baseline.linear(x, w["w_q.weight"], w.get("w_q.bias"))
        k = baseline.linear(x, w["w_k.weight"], w.get("w_k.bias"))
        v = baseline.linear(x, w["w_v.weight"], w.get("w_v.bias"))
        if "clip_qkv" in opts:
            q, k, v = (t.clamp(-opts["clip_qkv"], opts["clip_qkv"]) for t in (q, k, v))
        norm_cfg = opts.get("qk_norm")
        per_head = opts.get("use_head_qk_norm", False)
        if norm_cfg is not None and not per_head:
            q, k = _low_norm(q, norm_cfg, w, "q_norm"), _low_norm(k, norm_cfg, w, "k_norm")
        if setup.kind == "normalized":
            q = q * (w["sq"].to(q.dtype) * math.sqrt(setup.d_model))
            k = k * (w["sk"].to(k.dtype) * math.sqrt(setup.d_model))
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if norm_cfg is not None and per_head:
            q, k = _low_norm(q, norm_cfg, w, "q_norm"), _low_norm(k, norm_cfg, w, "k_norm")
    if "rope" in opts:
        pos = (
            document_positions(setup.cu, B * T).reshape(B, T)
            if setup.cu is not None
            else np.broadcast_to(np.arange(T), (B, T))
        )
        q, k = _low_rope(q, k, opts["rope"], pos)
    w_size = opts.get("window_size")
    window = (w_size - 1, 0) if w_size is not None else (-1, -1)
    scale = math.sqrt(D) if setup.kind == "normalized" else opts.get("softmax_scale")
    if setup.cu is not None:
        allowed = torch.from_numpy(
            allowed_mask(B * T, B * T, causal=True, window=window, cu_seqlens_q=setup.cu)
        )[None]
        att, _ = baseline.attention(
            q.reshape(1, B * T, H, D),
            k.reshape(1, B * T, Hkv, D),
            v.reshape(1, B * T, Hkv, D),
            allowed,
            scale=scale,
        )
        att = att.reshape(B, T, H, D)
    else:
        allowed = torch.from_numpy(allowed_mask(T, T, causal=True, window=window))[None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        att, _ = baseline.attention(q, k, v, allowed, scale=scale)
    gate = opts.get("gate")
    if gate is not None:
        gcfg = {"granularity": gate} if isinstance(gate, str) else dict(gate)
        logits = baseline.linear(x, w["w_g.weight"], w.get("w_g.bias"))
        if gcfg.get("full_precision", True):
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        g = torch.sigmoid(logits).to(att.dtype)
        att = att * g[..., None] if gcfg["granularity"] == "headwise" else att * g.view(B, T, H, D)
    return baseline.linear(att.reshape(B, T, -1), w["w_out.weight"], w.get("w_out.bias"))


# ------------------------------------------------------------------------------------------ ref


def _ref_fns(kind: str) -> tuple[Any, Any]:
    return {
        "attention": (ref_mod.attention_forward, twins.attention_forward),
        "fused": (ref_mod.fused_attention_forward, twins.fused_attention_forward),
        "normalized": (ref_mod.normalized_attention_forward, twins.normalized_attention_forward),
    }[kind]


def reference_outputs(setup: Setup, weights: Tensors, x: torch.Tensor, dout: torch.Tensor) -> Tensors:
    """``out`` (NumPy reference) and ``dx`` / parameter gradients (float64 twin)."""
    np_fn, twin_fn = _ref_fns(setup.kind)
    kw = dict(setup.ref)
    if setup.cu is not None:
        kw["cu_doc_lens"] = setup.cu
    out = np_fn({n: t.numpy() for n, t in weights.items()}, x.numpy(), **kw)
    leaves = {n: t.clone().requires_grad_(True) for n, t in weights.items()}
    xl = x.clone().requires_grad_(True)
    o = twin_fn(leaves, xl, **kw)
    names = list(leaves)
    grads = torch.autograd.grad(o, [xl] + [leaves[n] for n in names], dout, allow_unused=True)
    refs: Tensors = {"out": torch.from_numpy(np.asarray(out)), "dx": grads[0]}
    for n, g in zip(names, grads[1:]):
        refs[f"d[{n}]"] = g if g is not None else torch.zeros_like(weights[n])
    return refs


# ------------------------------------------------------------------------------------------ run


def _run_module(
    module: torch.nn.Module,
    x: torch.Tensor,
    dout: torch.Tensor,
    fwd_kw: dict[str, Any],
    device: str,
    dtype: torch.dtype,
) -> Tensors:
    params = dict(module.named_parameters())
    xi = x.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True)
    out = module(xi, **fwd_kw)
    grads = torch.autograd.grad(
        out, [xi, *list(params.values())], dout.to(device=device, dtype=out.dtype), allow_unused=True
    )
    res: Tensors = {"out": out.detach().cpu(), "dx": grads[0].detach().cpu()}
    for (n, p), g in zip(params.items(), grads[1:]):
        res[f"d[{n}]"] = g.detach().cpu() if g is not None else torch.zeros_like(p).cpu()
    return res


@contextlib.contextmanager
def _recording_rope(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[list[tuple[Any, ...]]]:
    """Record the first call of ``module.rope`` (half dtypes only): ``(forward, args, kwargs, output)``
    with the tensor arguments copied before the call (the fused RoPE rotates in place)."""
    calls: list[tuple[Any, ...]] = []
    rope = getattr(module, "rope", None)
    if rope is None or dtype not in tol.HALF_DTYPES:
        yield calls
        return
    forward = rope.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        if calls:
            return forward(*args, **kwargs)
        copies = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        out = forward(*args, **kwargs)
        got = out if isinstance(out, (tuple, list)) else (out,)
        calls.append((forward, copies, kwargs, tuple(t.detach().clone() for t in got)))
        return out

    rope.forward = recording
    try:
        yield calls
    finally:
        rope.forward = forward


def _rope_rounded_checks(calls: list[tuple[Any, ...]], dtype: torch.dtype) -> list[CheckResult]:
    """``rope.rounded_fp32``: the module's RoPE on half-precision q/k against the same RoPE evaluated in
    float64 on the same values, rounded (the rotation is promised in float32, rounded once: a rotation
    kept in bf16 / fp16 costs several roundings, and whole-module budgets cannot see it)."""
    if not calls:
        return []
    forward, args, kwargs, got = calls[0]
    wide = tuple(
        a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    with torch.no_grad():
        exact = forward(*wide, **kwargs)
    exact = exact if isinstance(exact, (tuple, list)) else (exact,)
    out = []
    for name, a, b in zip(("q", "k"), got, exact):
        label = "rope" if len(got) == 1 else f"rope.{name}"
        v = tol.rounded_fp32_budget(label, a.cpu(), b.cpu(), dtype, k=tol.ROUNDED_K_ELEMENTWISE)
        out.append(CheckResult(v.name, v.passed, v.message, v.err, v.baseline_err, v.threshold))
    return out


def run_module(case: Case, subject: Subject, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    setup = make_setup(case)
    if setup.generate:
        return _run_generate(case, subject, setup)
    dtype, device = case.torch_dtype(), case.device
    gen = torch.Generator().manual_seed(case.seed)
    module = build_module(setup, subject, dtype, device)
    module.train()
    weights = load_random_weights(module, gen, setup.d_model)
    x = randn(gen, (setup.B, setup.T, setup.d_model), dtype)
    dout = randn(gen, (setup.B, setup.T, setup.d_model), dtype)
    if "clip_qkv" in setup.ref:
        clip = place_clip(setup, weights, x, dtype)
        bound = clip if clip is not None else 1e30  # no safe gap: nothing is clipped
        setup.ref["clip_qkv"] = module.clip_qkv = bound
        setup.info["clip_qkv"] = clip if clip is not None else "inactive (no gap away from rounding)"
    fwd_kw: dict[str, Any] = {}
    if setup.cu is not None:
        fwd_kw = {
            "cu_doc_lens": torch.tensor(setup.cu, dtype=torch.int32, device=device),
            "max_doc_len": max(b - a for a, b in zip(setup.cu[:-1], setup.cu[1:])),
        }
    with _recording_rope(module, dtype) as rope_calls:
        outs = _run_module(module, x, dout, fwd_kw, device, dtype)
    refs = reference_outputs(setup, weights, x, dout)
    # low: plain math on the same parameter values, each in its module dtype
    low_w = {n: weights[n].to(p.dtype).requires_grad_(True) for n, p in module.named_parameters()}
    xl = x.to(dtype).requires_grad_(True)
    low_out = low_forward(setup, low_w, xl)
    names = list(low_w)
    lg = torch.autograd.grad(
        low_out, [xl] + [low_w[n] for n in names], dout.to(low_out.dtype), allow_unused=True
    )
    lows: Tensors = {"out": low_out.detach(), "dx": lg[0]}
    for n, g in zip(names, lg[1:]):
        lows[f"d[{n}]"] = g if g is not None else torch.zeros_like(low_w[n])
    checks = judge_softmax(outs, refs, lows, dtype)
    checks += _rope_rounded_checks(rope_calls, dtype)
    ctx.remember(case, Stored(outs, refs, lows, dtype))
    if setup.cu is not None:
        segs = [Segment(torch.arange(a, b), torch.arange(a, b)) for a, b in zip(setup.cu[:-1], setup.cu[1:])]
        nonempty = [i for i, s in enumerate(segs) if s.q.numel()]
        which = nonempty[len(nonempty) // 2]

        def rerun(inp: Tensors) -> Tensors:
            return _run_module(module, inp["x"], inp["dout"], fwd_kw, device, dtype)

        checks.append(
            check_isolation(
                rerun,
                {"x": x, "dout": dout},
                segs,
                which,
                outs,
                torch.Generator().manual_seed(case.seed + 1),
                q_names=("x", "dout"),
                k_names=(),
                q_outputs=("out", "dx"),
                k_outputs=(),
                trailing=1,
            )
        )
    checks.append(_module_poison(module, x, dout, fwd_kw, device, dtype, refs, lows))
    return checks, setup.info


def _module_poison(module, x, dout, fwd_kw, device, dtype, refs: Tensors, lows: Tensors) -> CheckResult:
    with contextlib.suppress(Exception):
        _run_module(module, torch.full_like(x, math.nan), dout, fwd_kw, device, dtype)
    with nan_poison():
        outs = _run_module(module, x, dout, fwd_kw, device, dtype)
    bad = [c for c in judge_softmax(outs, refs, lows, dtype, mean_check=False) if not c.passed]
    if bad:
        return fail(
            "poison",
            "poison: after a NaN-input warm-up and with NaN-filled allocations: "
            + "; ".join(c.message for c in bad[:3]),
        )
    return ok("poison", "poison: NaN warm-up and NaN-filled allocations change no verdict")


def _run_generate(case: Case, subject: Subject, setup: Setup) -> tuple[list[CheckResult], dict[str, Any]]:
    """Left-padded prefill, then decode steps, through the module's KV cache."""
    dtype, device = case.torch_dtype(), case.device
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    B, T = max(setup.B, 2), setup.T
    t0 = T - 3
    leftpad = [int(rng.integers(0, t0)) for _ in range(B)]
    leftpad[0] = 0
    module = build_module(setup, subject, dtype, device)
    module.eval()
    weights = load_random_weights(module, gen, setup.d_model)
    x = randn(gen, (B, T, setup.d_model), dtype)
    module.init_kv_cache_manager(B, T + 2)
    chunks = [(0, t0)] + [(t, t + 1) for t in range(t0, T)]
    outs = []
    with torch.no_grad():
        for i, (a, b) in enumerate(chunks):
            kw = {"cache_leftpad": torch.tensor(leftpad, dtype=torch.int32, device=device)} if i == 0 else {}
            outs.append(module(x[:, a:b].to(device=device, dtype=dtype), **kw).cpu())
    out = torch.cat(outs, 1)
    # reference: the same steps through reference.modules.attention_forward_cached
    w_np = {n: t.numpy() for n, t in weights.items()}
    cache = KVCache.empty(
        B,
        T + 2,
        setup.ref.get("n_kv_heads") or setup.ref["n_heads"],
        setup.ref.get("head_dim") or setup.d_model // setup.ref["n_heads"],
    )
    ref_outs = []
    for i, (a, b) in enumerate(chunks):
        o, cache = ref_mod.attention_forward_cached(
            w_np, x[:, a:b].numpy(), cache, **setup.ref, cache_leftpad=np.asarray(leftpad) if i == 0 else None
        )
        ref_outs.append(torch.from_numpy(o))
    ref = torch.cat(ref_outs, 1)
    low_w = {n: weights[n].to(p.dtype) for n, p in module.named_parameters()}
    key_valid = torch.arange(T)[None, :] >= torch.tensor(leftpad)[:, None]
    gsetup = Setup(setup.kind, setup.ctor, setup.ref, B, T, setup.d_model)
    low = low_forward(gsetup, low_w, x.to(dtype), key_valid=key_valid)
    checks = judge_softmax({"out": out}, {"out": ref}, {"out": low.detach()}, dtype)
    info = dict(setup.info, B=B, prompt=t0, leftpad=leftpad)
    return checks, info
