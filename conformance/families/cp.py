"""``cp`` family: context parallelism in W worker processes (gloo on CPU, NCCL on GPUs).

Each case launches W ranks with :func:`conformance.distributed.run_distributed` (fresh ``FileStore``
rendezvous, one deadline per case, the whole group killed when a rank fails or hangs, every rank's
output tail attached to the failure). The ranks shard global inputs with the case's load balancer,
run attention with ``apply_cp`` (ring zig-zag, ring llama3 or Ulysses), run the backward pass,
all-gather and un-shard outputs and gradients; the parent judges the gathered result against the
float64 reference (the error budget of docs/judging.md, low-precision baseline in the case dtype) and against the
same backend in one process ("cp_vs_single", the same budget).

Variants: ``{style}_{balancer}_{mask}`` (kernel level; masks ``causal``, ``window``, ``documents``,
``window_documents``; llama3 without documents shards the sequence as one document, the layout
OLMo-core's llama3 balancer requires), ``module_{style}_{balancer}`` (``Attention`` with per-document
RoPE rows sharded by ``olmo_attn.cp.shard_batch``; output, ``dx`` and parameter gradients) and
``gdn_ulysses`` (Gated DeltaNet under Ulysses; fla's CP budget against one process).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import reference.modules as ref_mod
import reference.twins as twins

from ..checks import CheckResult, fail, judge_rel_rms, judge_softmax
from ..results import RunContext, SkipCase
from ..subjects import Subject
from ..tolerances import gdn_budget
from .gdn import LAYER_K, low_layer
from .softmax import _dense_problem, _flat_doc_problem, draw_documents, draw_window, lowprec, randn, reference

if TYPE_CHECKING:
    from ..cases import Case

CP_TIMEOUT_S = 120.0  # one case (start-up included); a batch gets BATCH_BASE_S + BATCH_PER_CASE_S each
BATCH_BASE_S = 60.0
BATCH_PER_CASE_S = 20.0


def _backend_factory(subject: Subject) -> Any:
    """A picklable factory for the ranks (shipped backends by name)."""
    if subject.shipped:
        return ("table", subject.table_name)
    try:
        pickle.dumps(subject.backend_factory)
    except Exception as e:
        raise SkipCase(
            f"registered backend '{subject.name}' has a backend_factory that cannot be pickled ({e}); "
            "context-parallel cases run it in worker processes"
        ) from e
    return ("factory", subject.backend_factory)


def _build_backend(factory: Any, **kw: Any) -> Any:
    kind, obj = factory
    if kind == "table":
        from olmo_attn.backends.base import AttentionBackendName

        return AttentionBackendName(obj).build(**kw)
    return obj(**kw)


def _style(style: str, balancer: str) -> dict[str, Any]:
    from olmo_attn.cp.styles import RingContextParallelStyle, UlyssesContextParallelStyle

    if style == "ulysses":
        return {"uly": UlyssesContextParallelStyle()}
    return {"ring": RingContextParallelStyle(balancer)}


def _gather(local: torch.Tensor, lb: Any, group: Any, cu: list[int] | None, length: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    parts = [p.cpu() for p in parts]
    if cu is None:
        return lb.unshard(parts, seq_dim=1, length=length)
    return lb.unshard_by_document(parts, seq_dim=1, cu_doc_lens=torch.tensor(cu))


# ------------------------------------------------------------------------------------------ rank bodies


def attention_rank(spec: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """One rank of a kernel-level CP case: shard, attend with ``apply_cp``, backward, gather."""
    import torch.distributed as dist

    from conformance.distributed import cp_mesh, device
    from olmo_attn.cp.load_balancers import RingAttentionLoadBalancerType

    mesh = cp_mesh()
    group = mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = device()
    dtype = spec["dtype"]
    q, k, v, dout = (spec[n].to(device=dev, dtype=dtype) for n in ("q", "k", "v", "dout"))
    lb = RingAttentionLoadBalancerType(spec["balancer"]).build_for(cp_rank=rank, cp_world_size=world)
    cu = spec["cu"]
    if cu is None:
        shards = lb.batch_shard(inputs=[q, k, v, dout], seq_dims=[1] * 4, pad_values=[0.0] * 4)
        meta: dict[str, Any] = {}
    else:
        shards, meta = lb.batch_shard_by_document(
            inputs=[q, k, v, dout], seq_dims=[1] * 4, cu_doc_lens=torch.tensor(cu), pad_values=[0.0] * 4
        )
        meta = {
            n: (t.to(device=dev, dtype=torch.int32) if isinstance(t, torch.Tensor) else t)
            for n, t in meta.items()
        }
    ql, kl, vl, dl = shards
    leaves = [t.detach().clone().requires_grad_(True) for t in (ql, kl, vl)]
    be = _build_backend(
        spec["factory"],
        head_dim=q.shape[-1],
        n_heads=q.shape[2],
        n_kv_heads=k.shape[2],
        window_size=spec["window"],
    )
    be.apply_cp(mesh, **_style(spec["style"], spec["balancer"]))
    out = be(tuple(leaves), **meta)
    dq, dk, dv = torch.autograd.grad(out, leaves, dl)
    T = q.shape[1]
    result = {
        n: _gather(t.detach(), lb, group, cu, T)
        for n, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))
    }
    return result if rank == 0 else None


def module_rank(spec: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """One rank of a module-level CP case: ``Attention`` with RoPE and documents."""
    import torch.distributed as dist

    from conformance.distributed import cp_mesh, device
    from olmo_attn.cp import RingAttentionLoadBalancerType, gather_sequence, shard_batch

    mesh = cp_mesh()
    group = mesh.get_group()
    rank = dist.get_rank(group)
    dev = device()
    module = _module(spec, dev)
    module.apply_cp(mesh, **_style(spec["style"], spec["balancer"]))
    lb = RingAttentionLoadBalancerType(spec["balancer"]).build(mesh)
    cu = torch.tensor(spec["cu"])
    x, dout = (spec[n].to(device=dev, dtype=spec["dtype"]) for n in ("x", "dout"))
    batch = shard_batch(
        lb, inputs=[x, dout], seq_dims=[1, 1], pad_values=[0.0, 0.0], cu_doc_lens=cu, rope=module.rope
    )
    xl = batch.inputs[0].detach().clone().requires_grad_(True)
    out = module(xl, **batch.kwargs_for())
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(out, [xl, *params.values()], batch.inputs[1])
    kw = dict(balancer=lb, seq_dim=1, group=group, cu_doc_lens=cu)
    result = {"out": gather_sequence(out.detach(), **kw).cpu(), "dx": gather_sequence(grads[0], **kw).cpu()}
    for n, g in zip(params, grads[1:]):  # parameters are replicated: their gradients add up
        g = g.detach().clone()
        dist.all_reduce(g, group=group)
        result[f"d[{n}]"] = g.cpu()
    return result if rank == 0 else None


def gdn_rank(spec: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """One rank of Gated DeltaNet under Ulysses (contiguous shards)."""
    import torch.distributed as dist

    from conformance.distributed import cp_mesh, device
    from olmo_attn.cp.styles import UlyssesContextParallelStyle

    mesh = cp_mesh()
    group = mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = device()
    module = _gdn_module(spec, dev)
    module.apply_cp(mesh, uly=UlyssesContextParallelStyle())
    x, dout = (spec[n].to(device=dev, dtype=spec["dtype"]) for n in ("x", "dout"))
    T = x.shape[1]
    n = T // world
    xl = x[:, rank * n : (rank + 1) * n].clone().requires_grad_(True)
    cu = torch.tensor(spec["cu"], dtype=torch.int32, device=dev) if spec["cu"] is not None else None
    out = module(xl, cu_doc_lens=cu)
    (dx,) = torch.autograd.grad(out, [xl], dout[:, rank * n : (rank + 1) * n])
    res = {}
    for name, t in (("o", out), ("dx", dx)):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        res[name] = torch.cat([p.cpu() for p in parts], dim=1)
    return res if rank == 0 else None


# ------------------------------------------------------------------------------------------ builders


def _module(spec: dict[str, Any], device: Any) -> torch.nn.Module:
    from olmo_attn import Attention
    from olmo_attn.rope import RoPEConfig

    kind, obj = spec["factory"]
    m = Attention(
        d_model=spec["d_model"],
        n_heads=spec["H"],
        n_kv_heads=spec["Hkv"],
        rope=RoPEConfig(theta=10_000),
        backend=obj if kind == "table" else "torch",
        window_size=spec["window_size"],
        dtype=spec["dtype"],
        init_device=str(device),
    )
    if kind != "table":
        m.backend = obj(**m._backend_kwargs)
        m._backend_auto = False
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(spec["weights"][n].to(p.dtype))
    return m


def _gdn_module(spec: dict[str, Any], device: Any) -> torch.nn.Module:
    from olmo_attn.recurrent import GatedDeltaNet

    m = GatedDeltaNet(
        d_model=spec["d_model"],
        n_heads=spec["H"],
        dtype=spec["dtype"],
        init_device=str(device),
        backend="torch",
    )
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(spec["weights"][n].to(p.dtype))
    return m


# ------------------------------------------------------------------------------------------ parent


def _launch(case: Case, body: Any, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    from conformance.distributed import run_distributed

    world = int(case.param["world"])
    backend = "gloo" if case.device == "cpu" else "nccl"
    results = run_distributed(body, world, backend=backend, timeout_s=CP_TIMEOUT_S, args=(spec,))
    return results[0]


def _single(factory: Any, spec: dict[str, Any], meta: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    dtype = spec["dtype"]
    q, k, v, dout = (spec[n].to(device=device, dtype=dtype) for n in ("q", "k", "v", "dout"))
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    be = _build_backend(
        factory, head_dim=q.shape[-1], n_heads=q.shape[2], n_kv_heads=k.shape[2], window_size=spec["window"]
    )
    out = be(tuple(leaves), **meta)
    grads = torch.autograd.grad(out, leaves, dout)
    return {n: t.detach().cpu() for n, t in zip(("out", "dq", "dk", "dv"), (out, *grads))}


# Ulysses masks whose cases replicate kv heads (n_kv_heads not a multiple of the world size, so the
# heads are copied to fill the ranks and their gradients merged); the other masks never do. Every
# --quick matrix runs both kinds (the replicas' merge is a code path of its own).
ULYSSES_REPLICATED_MASKS = ("causal", "documents")


def _cp_heads(
    rng: np.random.Generator, world: int, style: str, replicate: bool | None = None
) -> tuple[int, int]:
    """``(Hq, Hkv)``; for Ulysses, ``replicate`` True / False forces ``Hkv % world != 0`` / ``== 0``
    (``None``: either)."""
    Hq = int(rng.choice([world, 2 * world]))
    Hkv = int(rng.choice([h for h in (1, 2, Hq) if Hq % h == 0]))
    if style == "ulysses":
        pool = [h for h in (1, 2, world, Hq) if Hq % h == 0]
        if replicate is not None:
            pool = [h for h in pool if (h % world != 0) == replicate]
        Hkv = int(rng.choice(sorted(set(pool))))
    return Hq, Hkv


CaseGen = Generator[tuple[Any, dict[str, Any]], Any, tuple[list[CheckResult], dict[str, Any]]]


def run_attention_case(case: Case, subject: Subject) -> CaseGen:
    style, rest = case.variant.split("_", 1)
    balancer = "ulysses" if style == "ulysses" else ("zig_zag" if rest.startswith("zig_zag") else "llama3")
    mask = rest[len(balancer) + 1 :] if style == "ring" else rest[len("ulysses") + 1 :]
    factory = _backend_factory(subject)
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    world = int(case.param["world"])
    dtype = case.torch_dtype()
    full = case.size == "full"
    Hq, Hkv = _cp_heads(rng, world, style, replicate=mask in ULYSSES_REPLICATED_MASKS)
    D = int(rng.choice([32, 64] if full else [8, 16])) if case.device == "cpu" else int(rng.choice([64, 128]))
    T = world * int(rng.integers(6, 40 if full else 12)) + int(
        rng.integers(0, 2 * world)
    )  # often not divisible
    docs = "documents" in mask or balancer == "llama3"
    B = 1 if docs else int(rng.integers(1, 3))
    w = draw_window(rng, T) if "window" in mask else None
    window = (w - 1, 0) if w is not None else (-1, -1)
    cu = (draw_documents(rng, 1, T) if "documents" in mask else [0, T]) if docs else None
    inputs = {
        n: randn(gen, shape, dtype)
        for n, shape in (
            ("q", (B, T, Hq, D)),
            ("k", (B, T, Hkv, D)),
            ("v", (B, T, Hkv, D)),
            ("dout", (B, T, Hq, D)),
        )
    }
    spec = {
        **inputs,
        "dtype": dtype,
        "cu": cu,
        "window": window,
        "style": style,
        "balancer": balancer,
        "factory": factory,
    }
    info = {
        "world": world,
        "B": B,
        "T": T,
        "Hq": Hq,
        "Hkv": Hkv,
        "D": D,
        "window_size": w,
        "cu_doc_lens": cu,
        "style": style,
        "balancer": balancer,
    }
    if style == "ulysses":
        from olmo_attn.cp.ulysses import kv_replication_factor

        info["kv_replicas"] = kv_replication_factor(Hq, Hkv, world)
    got = yield (attention_rank, spec)
    if cu is None:
        problem = _dense_problem(dtype, inputs, causal=True, window=window)
        meta: dict[str, Any] = {}
    else:
        problem = _flat_doc_problem(
            dtype, inputs, cu_q=cu, cu_k=cu, local_k_slice=None, causal=True, window=window
        )
        meta = {"cu_doc_lens": torch.tensor(cu, dtype=torch.int32, device=case.device)}
    refs = reference(problem, with_lse=False)
    lows = lowprec(problem, with_lse=False)
    checks = judge_softmax(got, refs, lows, dtype)
    single = _single(factory, spec, meta, case.device)
    checks += judge_softmax(got, single, lows, dtype, mean_check=False, prefix="cp_vs_single.")
    return checks, info


def run_module_case(case: Case, subject: Subject) -> CaseGen:
    style = case.variant.split("_")[1]
    balancer = case.variant.split("_", 2)[2]
    factory = _backend_factory(subject)
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    world = int(case.param["world"])
    dtype = case.torch_dtype()
    H, Hkv = _cp_heads(rng, world, style)
    D = int(rng.choice([8, 16])) if case.device == "cpu" else 64
    d_model = H * D
    T = world * int(rng.integers(6, 12)) + int(rng.integers(0, 2 * world))
    cu = draw_documents(rng, 1, T)
    w = draw_window(rng, T) if rng.random() < 0.5 else None
    weights = _random_attention_weights(gen, d_model, H, Hkv, D)
    x = randn(gen, (1, T, d_model), dtype)
    dout = randn(gen, (1, T, d_model), dtype)
    spec = {
        "x": x,
        "dout": dout,
        "dtype": dtype,
        "cu": cu,
        "style": style,
        "balancer": balancer,
        "factory": factory,
        "d_model": d_model,
        "H": H,
        "Hkv": Hkv,
        "window_size": w,
        "weights": {n: t.to(dtype) for n, t in weights.items()},
    }
    got = yield (module_rank, spec)
    wd = {n: t.to(dtype).double() for n, t in weights.items()}
    opts = {"n_heads": H, "n_kv_heads": Hkv, "rope": {"name": "default", "theta": 10_000}, "window_size": w}
    ref_out = torch.from_numpy(
        ref_mod.attention_forward({n: t.numpy() for n, t in wd.items()}, x.numpy(), **opts, cu_doc_lens=cu)
    )
    leaves = {n: t.clone().requires_grad_(True) for n, t in wd.items()}
    xl = x.clone().requires_grad_(True)
    o = twins.attention_forward(leaves, xl, **opts, cu_doc_lens=cu)
    g = torch.autograd.grad(o, [xl, *leaves.values()], dout)
    refs = {"out": ref_out, "dx": g[0], **{f"d[{n}]": t for n, t in zip(leaves, g[1:])}}
    # low: the module's plain math in the case dtype (conformance.families.modules)
    from .modules import Setup, low_forward

    setup = Setup("attention", {}, {**opts, "rope": {"name": "default", "theta": 10_000}}, 1, T, d_model, cu)
    low_w = {n: t.to(dtype).requires_grad_(True) for n, t in wd.items()}
    xlow = x.to(dtype).requires_grad_(True)
    lo = low_forward(setup, low_w, xlow)
    lg = torch.autograd.grad(lo, [xlow, *low_w.values()], dout.to(dtype))
    lows = {"out": lo.detach(), "dx": lg[0], **{f"d[{n}]": t for n, t in zip(low_w, lg[1:])}}
    checks = judge_softmax(got, refs, lows, dtype)
    info = {
        "world": world,
        "T": T,
        "H": H,
        "Hkv": Hkv,
        "D": D,
        "cu_doc_lens": cu,
        "window_size": w,
        "style": style,
        "balancer": balancer,
    }
    return checks, info


def _random_attention_weights(
    gen: torch.Generator, d_model: int, H: int, Hkv: int, D: int
) -> dict[str, torch.Tensor]:
    shapes = {
        "w_q.weight": (H * D, d_model),
        "w_q.bias": (H * D,),
        "w_k.weight": (Hkv * D, d_model),
        "w_k.bias": (Hkv * D,),
        "w_v.weight": (Hkv * D, d_model),
        "w_v.bias": (Hkv * D,),
        "w_out.weight": (d_model, H * D),
        "w_out.bias": (d_model,),
    }
    return {
        n: torch.randn(s, generator=gen, dtype=torch.float64)
        * (0.1 if n.endswith("bias") else 1 / math.sqrt(s[-1]))
        for n, s in shapes.items()
    }


def run_gdn_case(case: Case) -> CaseGen:
    import reference.gated_deltanet as ref_gdn
    from olmo_attn.recurrent import GatedDeltaNet

    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    world = int(case.param["world"])
    dtype = case.torch_dtype()
    H, d_model = 2 * world, 16 * world
    B = int(rng.integers(1, 3))
    T = world * int(rng.integers(4, 10))
    cu = None
    if rng.random() < 0.5:
        B = 1
        cu = draw_documents(rng, 1, T)
        cu = [c for i, c in enumerate(cu) if i == 0 or c != cu[i - 1]]
    probe = GatedDeltaNet(d_model=d_model, n_heads=H, dtype=torch.float64, backend="torch")
    weights = {}
    for n, p in probe.named_parameters():
        if n == "A_log":
            weights[n] = torch.log(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 4 + 0.5)
        elif n == "dt_bias":
            weights[n] = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 - 2.0
        elif n == "o_norm.weight":
            weights[n] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        else:
            weights[n] = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[-1])
        weights[n] = weights[n].to(dtype).double()
    x = randn(gen, (B, T, d_model), dtype)
    dout = randn(gen, (B, T, d_model), dtype)
    spec = {"x": x, "dout": dout, "dtype": dtype, "cu": cu, "d_model": d_model, "H": H, "weights": weights}
    got = yield (gdn_rank, spec)
    single = _gdn_module(spec, case.device)
    xs = x.to(device=case.device, dtype=dtype).requires_grad_(True)
    o = single(xs, cu_doc_lens=torch.tensor(cu, dtype=torch.int32, device=case.device) if cu else None)
    (dx,) = torch.autograd.grad(o, [xs], dout.to(device=case.device, dtype=dtype))
    single_out = {"o": o.detach().cpu(), "dx": dx.cpu()}
    ref = torch.from_numpy(
        ref_gdn.gdn_layer_forward(
            {n: t.numpy() for n, t in weights.items()}, x.numpy(), n_heads=H, cu_doc_lens=cu
        )
    )
    cp_budget = gdn_budget("cp", dtype)
    checks = judge_rel_rms(got, single_out, {"o": cp_budget, "dx": cp_budget})
    checks = [
        CheckResult(
            "cp_vs_single." + c.name,
            c.passed,
            "cp_vs_single." + c.message,
            c.err,
            c.baseline_err,
            c.threshold,
        )
        for c in checks
    ]
    # a whole layer in the case dtype: max(fla's kernel budget, LAYER_K x the plain-PyTorch layer's error)
    layer = {
        "n_heads": H,
        "n_v_heads": probe.n_v_heads,
        "head_dim": probe.w_q.weight.shape[0] // H,
        "expand_v": probe.expand_v,
        "allow_neg_eigval": probe.allow_neg_eigval,
    }
    low = low_layer(layer, {n: t.to(dtype) for n, t in weights.items()}, x.to(dtype), cu)
    checks += judge_rel_rms(
        {"o": got["o"]}, {"o": ref}, {"o": gdn_budget("o", dtype)}, {"o": low}, k_low=LAYER_K
    )
    return checks, {"world": world, "B": B, "T": T, "H": H, "d_model": d_model, "cu_doc_lens": cu}


def case_generator(case: Case, subject: Subject | None) -> CaseGen:
    """The case as a generator: it yields ``(rank_body, spec)`` once, receives rank 0's result and
    returns ``(checks, info)`` — so several cases can share one launch (:func:`run_cp_batch`)."""
    if case.variant == "gdn_ulysses":
        return run_gdn_case(case)
    if subject is None:
        raise ValueError(f"case {case.id} needs its backend")
    if case.variant.startswith("module_"):
        return run_module_case(case, subject)
    return run_attention_case(case, subject)


def _finish(gen: CaseGen, result: Any) -> tuple[list[CheckResult], dict[str, Any]]:
    try:
        gen.send(result)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("a CP case generator yielded twice")


def _failure(case: Case, e: Exception) -> tuple[list[CheckResult], dict[str, Any]]:
    from conformance.distributed import DistributedRunError

    if isinstance(e, DistributedRunError):
        name = "timeout" if "timed out" in e.summary else "distributed"
        return [fail(name, f"{name}: {e}")], {"world": case.param.get("world")}
    raise e


def run_cp(case: Case, subject: Subject | None, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    """One case, one launch."""
    gen = case_generator(case, subject)
    body, spec = next(gen)
    try:
        result = _launch(case, body, spec)
    except Exception as e:
        gen.close()
        return _failure(case, e)
    return _finish(gen, result)


def batch_rank(items: list[tuple[Any, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """One rank of a batch: every case in turn; a case that raises reports its error. Rank 0 returns
    every case's result, the other ranks only their errors (``("ok", None)`` otherwise). A case that
    raises on some ranks only leaves the others in a collective (until the process group's timeout,
    or until gloo notices the peer left): :func:`run_cp_batch` then reruns that case and the later
    ones one by one, so the error reported is the failing rank's own."""
    import traceback

    from conformance.distributed import rank

    out: list[tuple[str, Any]] = []
    for body, spec in items:
        try:
            out.append(("ok", body(spec)))
        except Exception as e:
            out.append(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    if rank() == 0:
        return out
    return [(status, value if status == "error" else None) for status, value in out]


def run_cp_batch(
    cases: list[Case], subjects: list[Subject | None]
) -> list[tuple[list[CheckResult], dict[str, Any]] | BaseException]:
    """Several CP cases of one tier and world size in one launch (start-up and rendezvous paid once).

    Returns, per case, ``(checks, info)`` or the exception that stopped it (``SkipCase`` included).
    If the launch itself fails (a rank died or hung), every case is rerun in a launch of its own so
    that the failure is attributed to the right case. If a case raised on any rank, the ranks may no
    longer agree on which collective comes next (and the error seen may be a peer's follow-on): that
    case and every later one are rerun in launches of their own, where the runner names the rank at
    fault and its own exception.
    """
    from conformance.distributed import run_distributed

    out: list[Any] = [None] * len(cases)
    gens: dict[int, CaseGen] = {}
    items = []
    for i, (case, subject) in enumerate(zip(cases, subjects)):
        try:
            gen = case_generator(case, subject)
            items.append(next(gen))
            gens[i] = gen
        except KeyboardInterrupt:  # SIGINT / SIGTERM of the run: not this case's fault
            raise
        except BaseException as e:
            out[i] = e
    if not gens:
        return out
    first = cases[next(iter(gens))]
    world = int(first.param["world"])
    backend = "gloo" if first.device == "cpu" else "nccl"
    try:
        per_rank = run_distributed(
            batch_rank,
            world,
            backend=backend,
            timeout_s=BATCH_BASE_S + BATCH_PER_CASE_S * len(items),
            args=(items,),
        )
    except Exception:
        per_rank = None
    if per_rank is None:
        first_bad = 0
        results: list[tuple[str, Any]] = []
    else:
        results = per_rank[0]
        bad = [j for j in range(len(results)) if any(rk[j][0] != "ok" for rk in per_rank)]
        first_bad = bad[0] if bad else len(results)
    order = list(gens.items())
    for i, gen in order[first_bad:]:
        gen.close()
        try:
            out[i] = run_cp(cases[i], subjects[i], RunContext())
        except KeyboardInterrupt:  # SIGINT / SIGTERM of the run: not this case's fault
            raise
        except BaseException as e:
            out[i] = e
    for (i, gen), (_status, value) in zip(order[:first_bad], results):  # ok on every rank
        try:
            out[i] = _finish(gen, value)
        except KeyboardInterrupt:  # SIGINT / SIGTERM of the run: not this case's fault
            raise
        except BaseException as e:
            out[i] = e
    return out
