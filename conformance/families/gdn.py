"""``gdn`` family: Gated DeltaNet against ``reference.gated_deltanet`` with fla's relative-RMS budgets.

Variants: ``rule`` (the chunked gated delta rule: output, final state, ``dq, dk, dv, dg, dβ``),
``rule_gva`` (more value heads than q/k heads), ``rule_state`` (an initial state: ``dh0`` too),
``rule_varlen`` (documents via ``cu_seqlens``, with document isolation), ``layer`` and
``layer_varlen`` (the ``GatedDeltaNet`` module: output, ``dx`` and every parameter gradient) and
``decode`` (prefill, then one-token steps through a ``GDNCache``, against the full-sequence
reference). Implementations: ``torch`` (our PyTorch chunked kernel, CPU and CUDA), ``triton``
(our fused Triton kernels, CUDA) and ``fla``
(flash-linear-attention, CUDA, where :func:`olmo_attn.recurrent.fla.fla_kernel_usable` says so).
The low-precision baseline (reported with every verdict) is the token-by-token recurrence in the
case dtype.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import reference.gated_deltanet as ref_gdn
import reference.twins as twins

from .. import baseline
from ..checks import CheckResult, Segment, check_isolation, fail, judge_rel_rms, nan_poison, ok
from ..results import RunContext, SkipCase
from ..tolerances import gdn_budget
from .softmax import draw_documents, randn

if TYPE_CHECKING:
    from ..cases import Case

Tensors = dict[str, torch.Tensor]
LAYER_K = 2.0  # whole layers: max(fla budget, 2 x the low-precision baseline's relative RMS)


def _rule_fn(impl: str) -> Any:
    if impl == "fla":
        from olmo_attn.recurrent.fla import fla_chunk_gated_delta_rule

        return fla_chunk_gated_delta_rule
    from olmo_attn.recurrent import chunk_gated_delta_rule

    # "torch": our PyTorch kernel on every device; "triton": our fused Triton kernels (chunk 64)
    return functools.partial(chunk_gated_delta_rule, kernel=impl)


def _draw_rule(case: Case, gen: torch.Generator, rng: np.random.Generator) -> tuple[Tensors, dict[str, Any]]:
    full = case.size == "full"
    v = case.variant
    dtype = case.torch_dtype()
    H = int(rng.choice([2, 4] if full else [1, 2]))
    HV = 2 * H if v == "rule_gva" else H
    Dk = int(rng.choice([32, 64] if full else [8, 16]))
    Dv = int(rng.choice([32, 64] if full else [8, 24]))
    B = 1 if v == "rule_varlen" else int(rng.integers(1, 3))
    T = int(rng.choice([130, 257] if full else [17, 40, 70]))
    inputs = {
        "q": randn(gen, (B, T, H, Dk), dtype),
        "k": randn(gen, (B, T, H, Dk), dtype),
        "v": randn(gen, (B, T, HV, Dv), dtype),
        # log-decay in [-1, -0.01], write strength in (0, 2) (negative eigenvalues allowed)
        "g": (-torch.rand((B, T, HV), generator=gen, dtype=torch.float64) * 0.99 - 0.01).to(dtype).double(),
        "beta": (2 * torch.sigmoid(torch.randn((B, T, HV), generator=gen, dtype=torch.float64)))
        .to(dtype)
        .double(),
        "do": randn(gen, (B, T, HV, Dv), dtype),
    }
    info: dict[str, Any] = {"B": B, "T": T, "H": H, "HV": HV, "Dk": Dk, "Dv": Dv}
    n_seq = B
    if v == "rule_varlen":
        cu = draw_documents(rng, 1, T)
        cu = [c for i, c in enumerate(cu) if i == 0 or c != cu[i - 1]]  # no empty documents for GDN
        info["cu_seqlens"] = cu
        n_seq = len(cu) - 1
    if v == "rule_state":
        inputs["h0"] = randn(gen, (n_seq, HV, Dk, Dv), dtype) * 0.5
        inputs["dht"] = randn(gen, (n_seq, HV, Dk, Dv), dtype)
    info["chunk_size"] = int(rng.choice([16, 64]))
    return inputs, info


def _run_rule_impl(
    impl: str, inputs: Tensors, info: dict[str, Any], dtype: torch.dtype, device: str
) -> Tensors:
    fn = _rule_fn(impl)
    names = ["q", "k", "v", "g", "beta"] + (["h0"] if "h0" in inputs else [])
    leaves = {
        n: inputs[n].detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True) for n in names
    }
    if "h0" in leaves:  # the state is float32 (float64 for float64 runs) in every implementation
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        leaves["h0"] = inputs["h0"].detach().to(device=device, dtype=sdt, copy=True).requires_grad_(True)
    kw: dict[str, Any] = {"use_qk_l2norm": True, "output_final_state": True}
    if "cu_seqlens" in info:
        kw["cu_seqlens"] = torch.tensor(info["cu_seqlens"], dtype=torch.int32, device=device)
    if "h0" in leaves:
        kw["initial_state"] = leaves["h0"]
    if impl == "torch":
        kw["chunk_size"] = info["chunk_size"]
    elif impl == "triton":
        info["chunk_size"] = 64  # the Triton kernels' chunk (where fla's Hopper miscompiles were seen)
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], **kw)
    outs_for_grad = [o]
    grads_in = [inputs["do"].to(device=device, dtype=o.dtype)]
    if "dht" in inputs:
        outs_for_grad.append(final)
        grads_in.append(inputs["dht"].to(device=device, dtype=final.dtype))
    grads = torch.autograd.grad(outs_for_grad, [leaves[n] for n in names], grads_in)
    res = {"o": o.detach().cpu(), "final_state": final.detach().cpu()}
    for n, g in zip(names, grads):
        res["d" + n] = g.detach().cpu()
    return res


def _rule_reference(inputs: Tensors, info: dict[str, Any]) -> Tensors:
    names = ["q", "k", "v", "g", "beta"] + (["h0"] if "h0" in inputs else [])
    cu = info.get("cu_seqlens")
    o_np, fin_np = ref_gdn.gated_delta_rule(
        *(inputs[n].numpy() for n in ("q", "k", "v", "g", "beta")),
        initial_state=inputs["h0"].numpy() if "h0" in inputs else None,
        use_qk_l2norm=True,
        cu_seqlens=cu,
    )
    leaves = {n: inputs[n].clone().requires_grad_(True) for n in names}
    o, fin = twins.gated_delta_rule(
        *(leaves[n] for n in ("q", "k", "v", "g", "beta")),
        initial_state=leaves.get("h0"),
        use_qk_l2norm=True,
        cu_seqlens=cu,
    )
    outs, gin = [o], [inputs["do"]]
    if "dht" in inputs:
        outs.append(fin)
        gin.append(inputs["dht"])
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], gin)
    res = {"o": torch.from_numpy(o_np), "final_state": torch.from_numpy(fin_np)}
    for n, g in zip(names, grads):
        res["d" + n] = g
    return res


def _rule_low(inputs: Tensors, info: dict[str, Any], dtype: torch.dtype) -> Tensors:
    names = ["q", "k", "v", "g", "beta"] + (["h0"] if "h0" in inputs else [])
    leaves = {n: inputs[n].to(dtype).requires_grad_(True) for n in names}
    H, HV = inputs["q"].shape[2], inputs["v"].shape[2]
    q, k = (leaves[n].repeat_interleave(HV // H, dim=2) for n in ("q", "k"))
    o, fin = baseline.gated_delta_rule(
        q,
        k,
        leaves["v"],
        leaves["g"],
        leaves["beta"],
        initial_state=leaves.get("h0"),
        cu_seqlens=info.get("cu_seqlens"),
    )
    outs, gin = [o], [inputs["do"].to(dtype)]
    if "dht" in inputs:
        outs.append(fin)
        gin.append(inputs["dht"].to(dtype))
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], gin)
    res = {"o": o.detach(), "final_state": fin.detach()}
    for n, g in zip(names, grads):
        res["d" + n] = g
    return res


_GATE_PARAMS = ("d[A_log]", "d[dt_bias]", "d[w_a.weight]", "d[w_b.weight]")


def _gdn_budget_names(names: list[str], dtype: torch.dtype) -> dict[str, float]:
    """fla's budget per tensor: outputs/state 5e-3; dq, dk, dv, dx and projection gradients 8e-3;
    dβ, dg and the parameters that only feed β / the decay 2e-2 (bf16; scaled for fp32/fp64)."""
    out = {}
    for n in names:
        if n in ("o", "final_state"):
            key = n
        elif n in ("dbeta", "dg") or n in _GATE_PARAMS:
            key = "dbeta"
        else:
            key = "dq"
        out[n] = gdn_budget(key, dtype)
    return out


def run_rule(case: Case, impl: str) -> tuple[list[CheckResult], dict[str, Any]]:
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    dtype, device = case.torch_dtype(), case.device
    inputs, info = _draw_rule(case, gen, rng)
    outs = _run_rule_impl(impl, inputs, info, dtype, device)
    refs = _rule_reference(inputs, info)
    lows = _rule_low(inputs, info, dtype)
    checks = judge_rel_rms(outs, refs, _gdn_budget_names(list(refs), dtype), lows)
    if "cu_seqlens" in info:
        cu = info["cu_seqlens"]
        segs = [Segment(torch.arange(a, b), torch.arange(a, b)) for a, b in itertools.pairwise(cu)]

        def rerun(inp: Tensors) -> Tensors:
            return _run_rule_impl(impl, {**inputs, **inp}, info, dtype, device)

        checks.append(
            check_isolation(
                rerun,
                {n: inputs[n] for n in ("q", "k", "v", "do")},
                segs,
                len(segs) // 2,
                outs,
                torch.Generator().manual_seed(case.seed + 1),
                q_names=("q", "k", "v", "do"),
                k_names=(),
                q_outputs=("o", "dq", "dk", "dv"),
                k_outputs=(),
            )
        )
    checks.append(_poison(lambda: _run_rule_impl(impl, inputs, info, dtype, device), refs, lows, dtype))
    return checks, info


def _poison(
    run: Any, refs: Tensors, lows: Tensors, dtype: torch.dtype, k_low: float | None = None
) -> CheckResult:
    with nan_poison():
        outs = run()
    budgets = _gdn_budget_names(list(refs), dtype)
    bad = [c for c in judge_rel_rms(outs, refs, budgets, lows, k_low=k_low) if not c.passed]
    if bad:
        return fail("poison", "poison: with NaN-filled allocations: " + "; ".join(c.message for c in bad[:3]))
    return ok("poison", "poison: NaN-filled allocations change no verdict")


# ------------------------------------------------------------------------------------------ layer


def _layer_setup(case: Case, rng: np.random.Generator) -> dict[str, Any]:
    full = case.size == "full"
    H = int(rng.choice([2, 4] if full else [2]))
    Dk = int(rng.choice([32] if full else [8, 16]))
    return {
        "d_model": int(rng.choice([64, 128] if full else [24, 32])),
        "n_heads": H,
        "n_v_heads": H * int(rng.choice([1, 2])),
        "head_dim": Dk,
        "expand_v": float(rng.choice([1.0, 2.0])),
        "allow_neg_eigval": bool(rng.random() < 0.7),
        "conv_size": int(rng.choice([2, 4])),
        "conv_bias": bool(rng.random() < 0.5),
        "B": 1 if case.variant == "layer_varlen" else int(rng.integers(1, 3)),
        "T": int(rng.choice([70, 130] if full else [13, 33])),
    }


def _layer_weights(module: torch.nn.Module, gen: torch.Generator) -> Tensors:
    weights = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "A_log":
                val = torch.log(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 4 + 0.5)
            elif name == "dt_bias":
                val = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 - 2.0
            elif name == "o_norm.weight":
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name.endswith(".bias"):
                val = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                val = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[-1])
            val = val.to(p.dtype)
            p.copy_(val)
            weights[name] = val.double()
    return weights


def _ref_kwargs(s: dict[str, Any]) -> dict[str, Any]:
    return {
        k: s[k] for k in ("n_heads", "n_v_heads", "head_dim", "expand_v", "allow_neg_eigval", "conv_size")
    }


def low_layer(s: dict[str, Any], w: Tensors, x: torch.Tensor, cu: list[int] | None) -> torch.Tensor:
    """The layer in plain PyTorch, in ``x.dtype`` (decay and state in the same dtype)."""
    B, T, _ = x.shape
    H, HV, Dk = s["n_heads"], s["n_v_heads"], s["head_dim"]
    Dv = int(Dk * s["expand_v"])

    def lin(name: str, a: torch.Tensor) -> torch.Tensor:
        return a @ w[f"{name}.weight"].t()

    starts = torch.zeros(T, dtype=torch.long)
    for a, b in zip((cu or [0, T])[:-1], (cu or [0, T])[1:]):
        starts[a:b] = a

    def conv(name: str, a: torch.Tensor) -> torch.Tensor:
        wt = w[f"{name}.weight"].reshape(a.shape[-1], -1)
        kc = wt.shape[1]
        t = torch.arange(T)
        y = torch.zeros_like(a)
        for i in range(kc):
            src = t - (kc - 1 - i)
            valid = (src >= starts)[None, :, None]
            y = y + torch.where(valid, a[:, src.clamp(min=0)], torch.zeros_like(a)) * wt[:, i]
        if f"{name}.bias" in w:
            y = y + w[f"{name}.bias"]
        return y * torch.sigmoid(y)

    beta = torch.sigmoid(lin("w_b", x)) * (2.0 if s["allow_neg_eigval"] else 1.0)
    g = -torch.exp(w["A_log"]) * torch.nn.functional.softplus(lin("w_a", x) + w["dt_bias"])
    q = conv("q_conv1d", lin("w_q", x)).reshape(B, T, H, Dk).repeat_interleave(HV // H, dim=2)
    k = conv("k_conv1d", lin("w_k", x)).reshape(B, T, H, Dk).repeat_interleave(HV // H, dim=2)
    v = conv("v_conv1d", lin("w_v", x)).reshape(B, T, HV, Dv)
    o, _ = baseline.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)
    z = lin("w_g", x).reshape(B, T, HV, Dv)
    y = o / torch.sqrt((o * o).mean(-1, keepdim=True) + 1e-5) * w["o_norm.weight"] * (z * torch.sigmoid(z))
    return lin("w_out", y.reshape(B, T, HV * Dv))


def _build_layer(s: dict[str, Any], impl: str, dtype: torch.dtype, device: str) -> Any:
    from olmo_attn.recurrent import GatedDeltaNet

    kw = {
        k: s[k]
        for k in (
            "d_model",
            "n_heads",
            "n_v_heads",
            "head_dim",
            "expand_v",
            "allow_neg_eigval",
            "conv_size",
            "conv_bias",
        )
    }
    return GatedDeltaNet(**kw, dtype=dtype, init_device=device, backend=impl)


def _run_layer(
    module: Any, x: torch.Tensor, dout: torch.Tensor, cu: list[int] | None, device: str, dtype: torch.dtype
) -> Tensors:
    params = dict(module.named_parameters())
    xi = x.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True)
    kw = {"cu_doc_lens": torch.tensor(cu, dtype=torch.int32, device=device)} if cu is not None else {}
    out = module(xi, **kw)
    grads = torch.autograd.grad(out, [xi, *params.values()], dout.to(device=device, dtype=out.dtype))
    res = {"o": out.detach().cpu(), "dx": grads[0].detach().cpu()}
    for n, g in zip(params, grads[1:]):
        res[f"d[{n}]"] = g.detach().cpu()
    return res


def run_layer(case: Case, impl: str) -> tuple[list[CheckResult], dict[str, Any]]:
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    dtype, device = case.torch_dtype(), case.device
    s = _layer_setup(case, rng)
    B, T = s["B"], s["T"]
    cu = None
    if case.variant == "layer_varlen":
        cu = draw_documents(rng, 1, T)
        cu = [c for i, c in enumerate(cu) if i == 0 or c != cu[i - 1]]
    module = _build_layer(s, impl, dtype, device)
    weights = _layer_weights(module, gen)
    x = randn(gen, (B, T, s["d_model"]), dtype)
    dout = randn(gen, (B, T, s["d_model"]), dtype)
    outs = _run_layer(module, x, dout, cu, device, dtype)
    rkw = _ref_kwargs(s)
    o_np = ref_gdn.gdn_layer_forward(
        {n: t.numpy() for n, t in weights.items()}, x.numpy(), **rkw, cu_doc_lens=cu
    )
    leaves = {n: t.clone().requires_grad_(True) for n, t in weights.items()}
    xl = x.clone().requires_grad_(True)
    o_t = twins.gdn_layer_forward(leaves, xl, **rkw, cu_doc_lens=cu)
    g = torch.autograd.grad(o_t, [xl, *leaves.values()], dout)
    refs: Tensors = {"o": torch.from_numpy(o_np), "dx": g[0]}
    refs.update({f"d[{n}]": gr for n, gr in zip(leaves, g[1:])})
    low_w = {n: weights[n].to(p.dtype).requires_grad_(True) for n, p in module.named_parameters()}
    xlow = x.to(dtype).requires_grad_(True)
    lo = low_layer(s, low_w, xlow, cu)
    lg = torch.autograd.grad(lo, [xlow, *low_w.values()], dout.to(dtype))
    lows: Tensors = {"o": lo.detach(), "dx": lg[0]}
    lows.update({f"d[{n}]": gr for n, gr in zip(low_w, lg[1:])})
    checks = judge_rel_rms(outs, refs, _gdn_budget_names(list(refs), dtype), lows, k_low=LAYER_K)
    if cu is not None:
        segs = [Segment(torch.arange(a, b), torch.arange(a, b)) for a, b in itertools.pairwise(cu)]

        def rerun(inp: Tensors) -> Tensors:
            r = _run_layer(module, inp["x"], inp["dout"], cu, device, dtype)
            return {"o": r["o"], "dx": r["dx"]}

        checks.append(
            check_isolation(
                rerun,
                {"x": x, "dout": dout},
                segs,
                len(segs) // 2,
                {"o": outs["o"], "dx": outs["dx"]},
                torch.Generator().manual_seed(case.seed + 1),
                q_names=("x", "dout"),
                k_names=(),
                q_outputs=("o", "dx"),
                k_outputs=(),
                trailing=1,
            )
        )
    checks.append(_poison(lambda: _run_layer(module, x, dout, cu, device, dtype), refs, lows, dtype, LAYER_K))
    return checks, dict(s, cu_doc_lens=cu)


def run_decode(case: Case, impl: str) -> tuple[list[CheckResult], dict[str, Any]]:
    """Prefill ``T0`` tokens, then one token at a time through a ``GDNCache``: every output equals the
    full-sequence reference at its position."""
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    dtype, device = case.torch_dtype(), case.device
    s = _layer_setup(case, rng)
    B, T = max(s["B"], 2), s["T"]
    t0 = T - 4
    module = _build_layer(s, impl, dtype, device)
    module.eval()
    weights = _layer_weights(module, gen)
    x = randn(gen, (B, T, s["d_model"]), dtype)
    cache = module.init_cache(
        B, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    outs = []
    with torch.no_grad():
        outs.append(module(x[:, :t0].to(device=device, dtype=dtype), cache=cache).cpu())
        for t in range(t0, T):
            outs.append(module(x[:, t : t + 1].to(device=device, dtype=dtype), cache=cache).cpu())
    out = torch.cat(outs, 1)
    ref = torch.from_numpy(
        ref_gdn.gdn_layer_forward({n: t.numpy() for n, t in weights.items()}, x.numpy(), **_ref_kwargs(s))
    )
    low_w = {n: weights[n].to(p.dtype) for n, p in module.named_parameters()}
    low = low_layer(s, low_w, x.to(dtype), None)
    checks = judge_rel_rms({"o": out}, {"o": ref}, _gdn_budget_names(["o"], dtype), {"o": low}, k_low=LAYER_K)
    if cache.seqlen != T:
        checks.append(fail("cache_seqlen", f"cache_seqlen: the cache counts {cache.seqlen} tokens after {T}"))
    return checks, dict(s, B=B, prompt=t0)


def run_gdn(case: Case, subject: Any, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    impl = case.backend
    try:
        import olmo_attn.recurrent  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "olmo_attn.recurrent":
            raise SkipCase(f"olmo_attn.recurrent is not part of this build ({e})") from e
        raise
    if case.variant.startswith("rule"):
        return run_rule(case, impl)
    if case.variant.startswith("layer"):
        return run_layer(case, impl)
    return run_decode(case, impl)
