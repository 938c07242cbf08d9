"""Shared helpers of the context-parallel tests (imported by the test files and by the ranks).

* :class:`DenseTestKernel`: a deliberately simple ``AttentionKernel`` (explicit ``[Tq, Tk]`` mask
  from ``reference.attention.allowed_mask``, float64 math, textbook flash-style backward), so ring
  attention can be checked independently of the torch backend's kernels.
* :func:`run_cases`: the per-rank body of the distributed tests: for each case spec, build global
  inputs from a seed, shard them, run CP attention forward + backward, gather the shards on rank 0
  and compare with the float64 reference (``reference.twins``), the single-process torch backend and
  a plain low-precision baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reference.attention import allowed_mask

# ---------------------------------------------------------------------------------------------- kernel


class DenseTestKernel:
    """``AttentionKernel`` with an explicit mask and float64 math (tests only)."""

    name = "dense-test"

    @staticmethod
    def _prep(q, k, v, call):
        varlen = call.cu_seqlens_q is not None
        if varlen:
            q, k, v = q[None], k[None], v[None]
        _, Tq, Hq, _ = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        mask = allowed_mask(
            Tq,
            Tk,
            causal=call.causal,
            window=call.window,
            cu_seqlens_q=None if not varlen else list(call.cu_seqlens_q_host or call.cu_seqlens_q.tolist()),
            cu_seqlens_k=None if not varlen else list(call.cu_seqlens_k_host or call.cu_seqlens_k.tolist()),
        )
        mask = torch.from_numpy(mask).to(q.device)[None, None]  # [1, 1, Tq, Tk]
        G = Hq // Hkv
        qd = q.double().transpose(1, 2)  # [B, Hq, Tq, D]
        kd = k.double().repeat_interleave(G, dim=2).transpose(1, 2)
        vd = v.double().repeat_interleave(G, dim=2).transpose(1, 2)
        return varlen, mask, qd, kd, vd, G

    def forward(self, q, k, v, call):
        varlen, mask, qd, kd, vd, _ = self._prep(q, k, v, call)
        s = call.scale * qd @ kd.transpose(-1, -2)
        s = s.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
        p = torch.where(mask, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
        out = (p @ vd).transpose(1, 2).to(q.dtype)  # [B, Tq, Hq, D]
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        return (out[0], lse[0]) if varlen else (out, lse)

    def backward(self, dout, q, k, v, out, lse, call):
        varlen, mask, qd, kd, vd, G = self._prep(q, k, v, call)
        if varlen:
            dout, out, lse = dout[None], out[None], lse[None]
        do = dout.double().transpose(1, 2)  # [B, Hq, Tq, D]
        o = out.double().transpose(1, 2)
        lse = lse.double()
        s = call.scale * qd @ kd.transpose(-1, -2)
        p = torch.where(mask & torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), 0.0)
        dv = p.transpose(-1, -2) @ do  # [B, Hq, Tk, D]
        dp = do @ vd.transpose(-1, -2)
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        dq = call.scale * ds @ kd
        dk = call.scale * ds.transpose(-1, -2) @ qd
        B, Hq, Tk, D = dk.shape

        def fold(x):  # sum the query heads of each kv group: [B, Hq, Tk, D] -> [B, Tk, Hkv, D]
            return x.view(B, Hq // G, G, Tk, D).sum(2).transpose(1, 2)

        dq = dq.transpose(1, 2).to(q.dtype)
        dk, dv = fold(dk).to(k.dtype), fold(dv).to(v.dtype)
        if varlen:
            return dq[0], dk[0], dv[0]
        return dq, dk, dv


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One distributed attention case (global shapes; the world size comes from the group)."""

    strategy: str  # "zig_zag", "llama3", "ulysses"
    B: int = 1
    T: int = 40  # global tokens per row (the packed length with documents)
    Hq: int = 4
    Hkv: int = 2
    D: int = 8
    doc_lens: list[int] | None = None
    window: int | None = None  # user-facing window w -> (w - 1, 0)
    dtype: str = "float64"
    kernel: str = "torch"  # "torch" (backend.kernel()) or "dense" (DenseTestKernel, functional API)
    head_stride: int = 1
    length_multiple: int | None = None
    packed: bool = False  # packed qkv input (MHA only)
    seed: int = 0
    name: str = field(default="")

    def label(self) -> str:
        if self.name:
            return self.name
        docs = f"docs{len(self.doc_lens)}" if self.doc_lens else "causal"
        win = f"-w{self.window}" if self.window else ""
        return (
            f"{self.strategy}-{docs}{win}-B{self.B}T{self.T}-H{self.Hq}kv{self.Hkv}-{self.dtype}-"
            f"{self.kernel}-hs{self.head_stride}{'-packed' if self.packed else ''}"
        )


def _window_tuple(w: int | None) -> tuple[int, int]:
    return (-1, -1) if w is None else (w - 1, 0)


def _global_inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    dt = getattr(torch, case.dtype)
    shape_q = (case.B, case.T, case.Hq, case.D)
    shape_k = (case.B, case.T, case.Hkv, case.D)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64)
    k = torch.randn(shape_k, generator=g, dtype=torch.float64)
    v = torch.randn(shape_k, generator=g, dtype=torch.float64)
    dout = torch.randn(shape_q, generator=g, dtype=torch.float64)
    return q.to(dt), k.to(dt), v.to(dt), dout.to(dt)


def _cu(case: Case) -> list[int] | None:
    if case.doc_lens is None:
        return None
    assert case.B == 1 and sum(case.doc_lens) == case.T, case
    return [0, *np.cumsum(case.doc_lens).tolist()]


def reference_result(case: Case, q, k, v, dout) -> dict[str, torch.Tensor]:
    """float64 ground truth (``reference.twins.sdpa``) with autograd gradients."""
    from reference import twins

    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    cu = _cu(case)
    out, _ = twins.sdpa(
        *leaves,
        window=_window_tuple(case.window),
        cu_doc_lens=np.asarray(cu) if cu is not None else None,
        causal=True,
    )
    out.backward(dout.double())
    return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def low_precision_result(case: Case, q, k, v, dout) -> dict[str, torch.Tensor]:
    """Plain PyTorch math in the case dtype (explicit mask): the error the dtype alone causes."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ql, kl, vl = leaves
    cu = _cu(case)
    mask = torch.from_numpy(
        allowed_mask(
            case.T, case.T, causal=True, window=_window_tuple(case.window), cu_seqlens_q=cu, cu_seqlens_k=cu
        )
    )
    G = case.Hq // case.Hkv
    kr = kl.repeat_interleave(G, dim=2).transpose(1, 2)
    vr = vl.repeat_interleave(G, dim=2).transpose(1, 2)
    s = (ql.transpose(1, 2) @ kr.transpose(-1, -2)) / math.sqrt(case.D)
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1)
    out = (p @ vr).transpose(1, 2)
    out.backward(dout)
    return {"out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}


def single_process_result(case: Case, q, k, v, dout) -> dict[str, torch.Tensor]:
    """The torch backend without context parallelism."""
    from olmo_attn.backends.torch_backend import TorchAttentionBackend

    be = TorchAttentionBackend(
        head_dim=case.D, n_heads=case.Hq, n_kv_heads=case.Hkv, window_size=_window_tuple(case.window)
    )
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    cu = _cu(case)
    kwargs = {} if cu is None else {"cu_doc_lens": torch.tensor(cu, dtype=torch.int32)}
    out = be(tuple(leaves), **kwargs)
    out.backward(dout)
    return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def _balancer(case: Case, rank: int, world: int):
    from olmo_attn.cp.load_balancers import RingAttentionLoadBalancerType

    # llama3 without documents runs on contiguous shards: the Ulysses layout
    name = "ulysses" if (case.strategy == "llama3" and case.doc_lens is None) else case.strategy
    return RingAttentionLoadBalancerType(name).build_for(cp_rank=rank, cp_world_size=world)


def cp_result(case: Case, q, k, v, dout, mesh) -> dict[str, torch.Tensor]:
    """Shard, run CP attention forward + backward, gather on every rank and unshard (padding removed)."""
    from conformance.distributed import device
    from olmo_attn.backends.torch_backend import TorchAttentionBackend
    from olmo_attn.cp import ring as ring_mod
    from olmo_attn.cp.styles import RingContextParallelStyle, UlyssesContextParallelStyle

    group = mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = device()  # cuda:<rank> under NCCL: the CP run happens there, the judging on the CPU
    q, k, v, dout = (t.to(dev) for t in (q, k, v, dout))
    lb = _balancer(case, rank, world)
    cu = _cu(case)
    window = _window_tuple(case.window)
    if cu is None:
        shards = lb.batch_shard(inputs=[q, k, v, dout], seq_dims=[1] * 4, pad_values=[0.0] * 4)
        meta: dict[str, Any] = {}
    else:
        shards, meta = lb.batch_shard_by_document(
            inputs=[q, k, v, dout],
            seq_dims=[1] * 4,
            cu_doc_lens=torch.tensor(cu),
            pad_values=[0.0] * 4,
            length_multiple=case.length_multiple,
        )
        meta = {
            key: (val.to(device=dev, dtype=torch.int32) if isinstance(val, torch.Tensor) else val)
            for key, val in meta.items()
        }
    ql, kl, vl, dl = shards
    leaves = [t.detach().clone().requires_grad_(True) for t in (ql, kl, vl)]
    if case.kernel == "dense":
        kern = DenseTestKernel()
        if case.strategy == "zig_zag":
            out = ring_mod.zigzag_ring_attention(
                *leaves, group=group, kernel=kern, window=window, cu_doc_lens=meta.get("cu_doc_lens")
            )
        else:
            out = ring_mod.llama3_ring_attention(
                *leaves,
                group=group,
                kernel=kern,
                window=window,
                cu_doc_lens_q=meta.get("cu_doc_lens_q"),
                cu_doc_lens_k=meta.get("cu_doc_lens_k"),
                local_k_slice=meta.get("local_k_slice"),
                head_stride=case.head_stride,
            )
    else:
        be = TorchAttentionBackend(head_dim=case.D, n_heads=case.Hq, n_kv_heads=case.Hkv, window_size=window)
        if case.strategy == "ulysses":
            be.apply_cp(mesh, uly=UlyssesContextParallelStyle())
        else:
            be.apply_cp(mesh, ring=RingContextParallelStyle(case.strategy, case.head_stride))
        if case.packed:  # packed [B, T, 3, H, D] input (FusedAttention's layout)
            packed = torch.stack([ql, kl, vl], dim=2).detach().requires_grad_(True)
            out = be(packed, **meta)
        else:
            out = be(tuple(leaves), **meta)
    assert out.shape == ql.shape, (out.shape, ql.shape)
    out.backward(dl)
    if case.packed:
        leaves = [packed[:, :, i] for i in range(3)]
        grads = [packed.grad[:, :, i] for i in range(3)]
    else:
        grads = [t.grad for t in leaves]
    local = {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    result = {}
    for name, t in local.items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        parts = [p.cpu() for p in parts]
        if cu is None:
            result[name] = lb.unshard(parts, seq_dim=1, length=case.T)
        else:
            result[name] = lb.unshard_by_document(
                parts, seq_dim=1, cu_doc_lens=torch.tensor(cu), length_multiple=case.length_multiple
            )
    return result


def run_cases(cases: list[Case]) -> list[dict[str, Any]] | None:
    """Rank body: every rank runs every case; rank 0 returns the errors, the others ``None``."""
    from conformance.distributed import cp_mesh

    mesh = cp_mesh()
    rank = dist.get_rank()
    reports = []
    for case in cases:
        q, k, v, dout = _global_inputs(case)
        got = cp_result(case, q, k, v, dout, mesh)
        if rank != 0:
            continue
        ref = reference_result(case, q, k, v, dout)
        single = single_process_result(case, q, k, v, dout)
        low = low_precision_result(case, q, k, v, dout)
        report: dict[str, Any] = {"case": case.label(), "dtype": case.dtype, "tensors": {}}
        for name in ("out", "dq", "dk", "dv"):
            g = got[name].double()
            report["tensors"][name] = {
                "finite": bool(torch.isfinite(got[name]).all()),
                "err_ref": float((g - ref[name]).abs().max()),
                "err_single": float((g - single[name].double()).abs().max()),
                "err_low": float((low[name].double() - ref[name]).abs().max()),
                "atol": _measured_atol(ref[name], getattr(torch, case.dtype)),
                "scale": float(ref[name].abs().max()),
            }
        reports.append(report)
    return reports if rank == 0 else None


def _measured_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    r = ref.to(dtype)
    return 2.0 * float(((r + 0.3) - 0.3 - r).abs().max())


def check_reports(reports: list[dict[str, Any]]) -> list[str]:
    """Failure messages: float64 within 1e-10 of the reference; lower precisions within the error
    budget ``2 · max|low − ref| + atol``; never NaN/Inf."""
    failures = []
    for rep in reports:
        for name, t in rep["tensors"].items():
            if not t["finite"]:
                failures.append(f"{rep['case']} {name}: NaN/Inf")
                continue
            if rep["dtype"] == "float64":
                bound = 1e-10 * max(1.0, t["scale"])
            else:
                bound = 2.0 * t["err_low"] + t["atol"]
            if t["err_ref"] > bound:
                failures.append(f"{rep['case']} {name}: max|cp - ref| = {t['err_ref']:.3e} > {bound:.3e}")
    return failures


# ---------------------------------------------------------------------------------------------- module level


@dataclass
class ModuleCase:
    """``Attention`` + RoPE (+ documents, window, GQA) under CP, against the single-process module."""

    strategy: str
    T: int = 40
    Hq: int = 4
    Hkv: int = 2
    D: int = 8
    doc_lens: list[int] | None = None
    window: int | None = None
    rope: str | None = "default"  # "default", "complex" or None
    dtype: str = "float64"
    length_multiple: int | None = None
    seed: int = 0

    def label(self) -> str:
        docs = f"docs{len(self.doc_lens)}" if self.doc_lens else "causal"
        win = f"-w{self.window}" if self.window else ""
        return f"module-{self.strategy}-{docs}{win}-H{self.Hq}kv{self.Hkv}-rope_{self.rope}-{self.dtype}"


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def module_result(case: ModuleCase, mesh) -> dict[str, Any] | None:
    """Rank body for one module case; rank 0 returns the errors."""
    import copy

    from olmo_attn import Attention, RoPEConfig
    from olmo_attn.cp import (
        RingAttentionLoadBalancerType,
        RingContextParallelStyle,
        UlyssesContextParallelStyle,
        gather_sequence,
        shard_batch,
    )
    from reference import twins

    group = mesh.get_group()
    rank = dist.get_rank(group)
    dt = getattr(torch, case.dtype)
    torch.manual_seed(case.seed)
    att = Attention(
        d_model=case.Hq * case.D,
        n_heads=case.Hq,
        n_kv_heads=case.Hkv,
        rope=RoPEConfig(name=case.rope, theta=10_000) if case.rope else None,
        backend="torch",
        window_size=case.window,
        dtype=dt,
    )
    single = copy.deepcopy(att)
    g = torch.Generator().manual_seed(case.seed + 1)
    x = torch.randn(1, case.T, case.Hq * case.D, generator=g, dtype=torch.float64).to(dt)
    gy = torch.randn(1, case.T, case.Hq * case.D, generator=g, dtype=torch.float64).to(dt)
    cu = _cu(Case(case.strategy, T=case.T, doc_lens=case.doc_lens))
    cu_t = torch.tensor(cu) if cu is not None else None

    # single process, the same RoPE tables (OLMo-core positions: per document with cu_doc_lens)
    x1 = x.clone().requires_grad_(True)
    kwargs: dict[str, Any] = {}
    tables: dict[str, torch.Tensor] = {}
    if case.rope:
        bufs = single.rope.get_buffers(case.T, x.device)
        tables = {
            n: getattr(bufs, n) for n in ("pos_sin", "pos_cos", "freqs_cis") if getattr(bufs, n) is not None
        }
        if cu is None or case.rope == "default":
            kwargs.update(tables)
    if cu_t is not None:
        kwargs["cu_doc_lens"] = cu_t.to(torch.int32)
        if case.rope == "complex":  # complex RoPE has no per-document positions: pass them as rows
            from olmo_attn.rope import document_position_ids

            kwargs["freqs_cis"] = tables["freqs_cis"][document_position_ids(cu_t, case.T)]
    y1 = single(x1, **kwargs)
    y1.backward(gy)
    g1 = {"dx": x1.grad, **_grads(single)}

    # context parallel (on cuda:<rank> under NCCL; judged on the CPU)
    from conformance.distributed import device

    dev = device()
    if dev.type != "cpu":
        att = att.to(dev)
    x, gy = x.to(dev), gy.to(dev)
    if case.strategy == "ulysses":
        att.apply_cp(mesh, uly=UlyssesContextParallelStyle())
    else:
        att.apply_cp(mesh, ring=RingContextParallelStyle(case.strategy))
    lb = RingAttentionLoadBalancerType(case.strategy).build(mesh)
    batch = shard_batch(
        lb,
        inputs=[x, gy],
        seq_dims=[1, 1],
        pad_values=[0.0, 0.0],
        cu_doc_lens=cu_t,
        rope=att.rope,
        length_multiple=case.length_multiple,
    )
    x_l = batch.inputs[0].clone().requires_grad_(True)
    y_l = att(x_l, **batch.kwargs_for())
    (y_l * batch.inputs[1]).sum().backward()
    gather_kw = dict(
        balancer=lb, seq_dim=1, group=group, cu_doc_lens=cu_t, length_multiple=case.length_multiple
    )
    if cu_t is None:
        gather_kw["length"] = case.T
    y_cp = gather_sequence(y_l.detach(), **gather_kw).cpu()
    grads = {"dx": gather_sequence(x_l.grad, **gather_kw).cpu()}
    for name, p in att.named_parameters():  # parameters are replicated: sum the ranks' shares
        gp = p.grad.detach().clone()
        dist.all_reduce(gp, group=group)
        grads[name] = gp.cpu()
    x = x.cpu()
    if rank != 0:
        return None
    weights = {n: p.detach().double() for n, p in single.state_dict().items()}
    y_ref = twins.attention_forward(
        weights,
        x.double(),
        n_heads=case.Hq,
        n_kv_heads=case.Hkv,
        rope={"name": case.rope, "theta": 10_000} if case.rope else None,
        window_size=case.window,
        cu_doc_lens=np.asarray(cu) if cu is not None else None,
        **({n: t.double() for n, t in kwargs.items() if n in ("pos_sin", "pos_cos")}),
        **({"freqs_cis": kwargs["freqs_cis"]} if "freqs_cis" in kwargs else {}),
    )
    report: dict[str, Any] = {"case": case.label(), "dtype": case.dtype, "tensors": {}}
    pairs = {"out": (y_cp, y1.detach()), **{n: (grads[n], g1[n]) for n in g1}}
    for name, (a, b) in pairs.items():
        report["tensors"][name] = {
            "finite": bool(torch.isfinite(a).all()),
            "err_single": float((a.double() - b.double()).abs().max()),
            "scale": float(b.abs().max()),
        }
    report["tensors"]["out"]["err_ref"] = float((y_cp.double() - y_ref).abs().max())
    return report


# ---------------------------------------------------------------------------------------------- all-to-all


def all_to_all_checks() -> list[str]:
    """Every rank: cp2hp / hp2cp values against ``reference.cp_layouts``, round trips, batched and
    packed variants, autograd (the backward is the inverse exchange) and divisibility errors.
    Returns failure messages (empty when all pass)."""
    from olmo_attn.cp import (
        CPDivisibilityError,
        all_to_all_cp2hp,
        all_to_all_hp2cp,
        all_to_all_single_cp2hp,
        all_to_all_single_cp2hp_qkvpacked,
        all_to_all_single_hp2cp,
        all_to_all_single_hp2cp_qkvpacked,
    )
    from reference import cp_layouts

    rank, W = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    fails: list[str] = []

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            fails.append(f"rank {rank}: {msg}")

    from conformance.distributed import device

    dev = device()

    def per_rank(shape, seed):  # every rank's input (generated everywhere), on this rank's device
        return [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + r)).to(dev) for r in range(W)
        ]

    for shape in ((2, 3, 2 * W, 5), (2, 3, 2 * W)):
        xs = per_rank(shape, 100)
        out = all_to_all_single_cp2hp(xs[rank], group)
        ref = cp_layouts.cp2hp([x.cpu().numpy() for x in xs])[rank]
        expect(out.shape == ref.shape and np.array_equal(out.cpu().numpy(), ref), f"cp2hp {shape} values")
        back = all_to_all_single_hp2cp(out, group)
        expect(torch.equal(back, xs[rank]), f"hp2cp(cp2hp(x)) == x for {shape}")
        hs = per_rank((shape[0], 3 * W, *shape[2:]), 200)
        out = all_to_all_single_hp2cp(hs[rank], group)
        ref = cp_layouts.hp2cp([h.cpu().numpy() for h in hs])[rank]
        expect(np.array_equal(out.cpu().numpy(), ref), f"hp2cp {shape} values")
    # batched: one collective, tensors of different shapes
    a, b = per_rank((1, 4, 2 * W, 3), 300)[rank], per_rank((1, 4, W, 6), 400)[rank]
    ba, bb = all_to_all_cp2hp([a, b], group)
    expect(torch.equal(ba, all_to_all_single_cp2hp(a, group)), "batched cp2hp == single (a)")
    expect(torch.equal(bb, all_to_all_single_cp2hp(b, group)), "batched cp2hp == single (b)")
    ra, rb = all_to_all_hp2cp([ba, bb], group)
    expect(torch.equal(ra, a) and torch.equal(rb, b), "batched round trip")
    expect(all_to_all_cp2hp([], group) == [], "empty list")
    # packed qkv
    p = per_rank((2, 3, 3, 2 * W, 4), 500)[rank]
    ph = all_to_all_single_cp2hp_qkvpacked(p, group)
    expect(ph.shape == (2, 3 * W, 3, 2, 4), f"packed cp2hp shape {tuple(ph.shape)}")
    for i in range(3):
        expect(
            torch.equal(ph[:, :, i], all_to_all_single_cp2hp(p[:, :, i].contiguous(), group)),
            f"packed slot {i}",
        )
    expect(torch.equal(all_to_all_single_hp2cp_qkvpacked(ph, group), p), "packed round trip")
    # autograd: d/dx <cp2hp(x), g> = hp2cp(g)
    x = per_rank((1, 3, 2 * W, 2), 600)[rank].double().requires_grad_(True)
    gr = torch.randn(
        1, 3 * W, 2, 2, generator=torch.Generator().manual_seed(700 + rank), dtype=torch.float64
    ).to(dev)
    (all_to_all_single_cp2hp(x, group) * gr).sum().backward()
    expect(torch.equal(x.grad, all_to_all_single_hp2cp(gr, group)), "cp2hp backward is hp2cp")
    # errors
    if W > 1:
        for fn, bad, what in (
            (all_to_all_single_cp2hp, torch.zeros(1, 2, W + 1, 2, device=dev), "heads"),
            (all_to_all_single_hp2cp, torch.zeros(1, W + 1, 2, 2, device=dev), "sequence"),
        ):
            try:
                fn(bad, group)
                fails.append(f"rank {rank}: no error for {what} not divisible by W")
            except CPDivisibilityError as e:
                expect("not divisible by the context-parallel world size" in str(e), f"message: {e}")
    return fails


# ---------------------------------------------------------------------------------------------- errors


def error_checks() -> list[str]:
    """Typed errors of distributed attention. Returns failure messages."""
    from conformance.distributed import cp_mesh, device
    from olmo_attn.backends.torch_backend import TorchAttentionBackend
    from olmo_attn.cp import (
        ContextParallelInputError,
        ContextParallelUnsupportedError,
        CPDivisibilityError,
        RingContextParallelStyle,
        UlyssesContextParallelStyle,
    )

    mesh = cp_mesh()
    W = dist.get_world_size()
    fails: list[str] = []
    dev = device()
    q = torch.randn(1, 8, 4, 8, device=dev)
    k = torch.randn(1, 8, 2, 8, device=dev)

    def expect_raises(exc, match, fn):
        try:
            fn()
        except exc as e:
            if match not in str(e):
                fails.append(f"{exc.__name__} without {match!r}: {e}")
        except Exception as e:
            fails.append(f"expected {exc.__name__} ({match!r}), got {type(e).__name__}: {e}")
        else:
            fails.append(f"expected {exc.__name__} ({match!r}), nothing raised")

    be = TorchAttentionBackend(head_dim=8, n_heads=4, n_kv_heads=2, dropout_p=0.1)
    be.apply_cp(mesh, ring=RingContextParallelStyle())
    expect_raises(ContextParallelUnsupportedError, "UlyssesContextParallelStyle", lambda: be((q, k, k)))
    be.eval()  # no dropout in eval mode: runs
    be((q, k, k))
    be = TorchAttentionBackend(head_dim=8, n_heads=4, n_kv_heads=2)
    be.apply_cp(mesh, ring=RingContextParallelStyle())
    expect_raises(
        ContextParallelInputError,
        "unified",
        lambda: be((q, k, k), cu_doc_lens_q=torch.tensor([0, 8], dtype=torch.int32, device=dev)),
    )
    be = TorchAttentionBackend(head_dim=8, n_heads=4, n_kv_heads=2)
    be.apply_cp(mesh, ring=RingContextParallelStyle("llama3", head_stride=3))
    expect_raises(ContextParallelInputError, "head_stride=3", lambda: be((q, k, k)))
    be = TorchAttentionBackend(head_dim=8, n_heads=4, n_kv_heads=2)
    be.apply_cp(mesh, ring=RingContextParallelStyle("llama3"))
    expect_raises(
        ContextParallelInputError,
        "cu_doc_lens_q",
        lambda: be((q, k, k), cu_doc_lens=torch.tensor([0, 8], dtype=torch.int32, device=dev)),
    )
    be = TorchAttentionBackend(head_dim=8, n_heads=4, n_kv_heads=2)
    expect_raises(
        ValueError, "not a ring strategy", lambda: be.apply_cp(mesh, ring=RingContextParallelStyle("ulysses"))
    )
    if W > 1:
        heads = W + 1 if (W + 1) % 2 else W + 3
        be = TorchAttentionBackend(head_dim=8, n_heads=heads, n_kv_heads=1)
        be.apply_cp(mesh, uly=UlyssesContextParallelStyle())
        qq = torch.randn(1, 8, heads, 8, device=dev)
        kk = torch.randn(1, 8, 1, 8, device=dev)
        expect_raises(CPDivisibilityError, f"n_heads={heads}", lambda: be((qq, kk, kk)))
    return fails


def run_all(cases: list[Case], module_cases: list[ModuleCase]) -> dict[str, Any]:
    """One spawned group runs everything (process start-up dominates the CPU test time)."""
    import time

    from conformance.distributed import cp_mesh

    t0 = time.perf_counter()
    out: dict[str, Any] = {"a2a": all_to_all_checks(), "errors": error_checks()}
    t1 = time.perf_counter()
    out["backend"] = run_cases(cases)
    t2 = time.perf_counter()
    mesh = cp_mesh()
    out["module"] = [module_result(c, mesh) for c in module_cases]
    out["seconds"] = {"a2a+errors": t1 - t0, "backend": t2 - t1, "module": time.perf_counter() - t2}
    return out
