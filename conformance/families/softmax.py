"""Softmax-attention families: ``attn`` (the backend's module-level path), ``kernel`` (the LSE kernel
with flash-style backward), ``packed`` (packed QKV) and ``dropout`` (seeded keep masks, eval mode).

For every case: draw a shape and inputs from the case seed; build the backend; run forward and
backward; judge ``out`` (and ``lse``) and ``dq, dk, dv`` against ``reference.attention.attention``
(gradients from its float64 twin ``reference.twins.attention``) with the error budget of docs/judging.md, using
:func:`conformance.baseline.attention` as the low-precision baseline; then the extra checks:
inputs unchanged, document isolation, window / causal edges, determinism (backends that claim
it), and a poisoned re-run (NaN-input warm-up, NaN-filled allocations).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import reference.attention as ref_attn
import reference.twins as twins
from olmo_attn.backends.capabilities import Feature

from .. import baseline
from ..checks import (
    CheckResult,
    EdgeProbe,
    Segment,
    check_determinism,
    check_edges,
    check_isolation,
    deterministic_mode,
    edge_probes,
    fail,
    judge_softmax,
    nan_poison,
    ok,
)
from ..results import RunContext, Stored
from ..subjects import Subject

if TYPE_CHECKING:
    from ..cases import Case

Tensors = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ shapes


def draw_heads(rng: np.random.Generator, gqa: str, full: bool) -> tuple[int, int]:
    """``(Hq, Hkv)`` for a GQA setting: ``mha`` (Hq = Hkv), ``gqa4`` (Hq = 4 Hkv), ``mqa`` (Hkv = 1)."""
    if gqa == "mha":
        h = int(rng.choice([2, 4] if full else [2, 3]))
        return h, h
    if gqa == "gqa4":  # two kv heads: with one, "grouped" would be MQA again (a shortcut h % Hkv hides)
        hkv = int(rng.choice([2]))
        return 4 * hkv, hkv
    if gqa == "mqa":
        return int(rng.choice([4, 6] if full else [3, 4])), 1
    raise ValueError(f"unknown gqa setting {gqa!r}")


def draw_len(rng: np.random.Generator, full: bool) -> int:
    """A sequence length; never a multiple of 128 except sometimes in --full."""
    pool = [129, 200, 255, 333, 384, 511] if full else [17, 33, 50, 64, 77, 100]
    return int(rng.choice(pool))


def draw_documents(
    rng: np.random.Generator, batch: int, seqlen: int, *, cross_rows: bool = False
) -> list[int]:
    """``cu_doc_lens`` over ``batch * seqlen`` flattened tokens: random documents including one of
    length 1 and (sometimes) an empty one; documents stay inside rows unless ``cross_rows``."""
    total = batch * seqlen
    cuts: set[int] = set()
    for b in range(batch):
        row0 = b * seqlen
        if b and (not cross_rows or rng.random() < 0.5):
            cuts.add(row0)
        n = int(rng.integers(1, 4))
        for c in rng.choice(np.arange(1, seqlen), size=min(n, seqlen - 1), replace=False):
            cuts.add(row0 + int(c))
    # a document of length 1 somewhere
    one = int(rng.integers(1, total - 1)) if total > 2 else 1
    cuts |= {one, one + 1}
    cu = sorted({0, total} | {c for c in cuts if 0 < c < total})
    if rng.random() < 0.5:  # an empty document (zero-length segment), as OLMo-core's own tests use
        at = int(rng.integers(0, len(cu) - 1))
        cu.insert(at + 1, cu[at])
    return cu


def draw_window(rng: np.random.Generator, seqlen: int) -> int:
    """A user window ``w`` (keys per query, itself included): tiny, mid-sized or larger than the sequence."""
    kind = rng.choice(["one", "small", "mid", "beyond"], p=[0.1, 0.4, 0.3, 0.2])
    if kind == "one":
        return 1
    if kind == "small":
        return int(rng.integers(2, max(3, seqlen // 4)))
    if kind == "mid":
        return int(rng.integers(max(2, seqlen // 4), max(3, seqlen)))
    return seqlen + int(rng.integers(1, 16))


def draw_bidir_window(rng: np.random.Generator, seqlen: int) -> tuple[int, int]:
    left = int(rng.integers(0, max(1, seqlen // 2)))
    right = int(rng.integers(0, max(1, seqlen // 3)))
    r = rng.random()
    if r < 0.15:
        return (-1, right)
    if r < 0.3:
        return (left, -1)
    return (left, right)


def draw_segments_qk(rng: np.random.Generator, n_q: int, n_k: int) -> tuple[list[int], list[int]]:
    """Separate query / key segmentations with the same number of segments; includes a segment with
    more queries than keys (bottom-right alignment leaves early rows empty) and an empty key segment."""
    n_seg = int(rng.integers(2, 5))
    lq = rng.multinomial(n_q - n_seg, [1 / n_seg] * n_seg) + 1
    lk = rng.multinomial(n_k - n_seg, [1 / n_seg] * n_seg) + 1
    lk[int(rng.integers(1, n_seg))] = (
        0  # a segment whose queries see no key at all (segment 0 takes the rest)
    )
    spill = int(lk.sum())
    lk[0] += n_k - spill
    return [0, *np.cumsum(lq).tolist()], [0, *np.cumsum(lk).tolist()]


def randn(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Float64 normal samples already rounded to ``dtype`` (the reference sees exactly the inputs)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)


# ------------------------------------------------------------------------------------------ layout


@dataclass
class Problem:
    """One attention problem in the backend's layout, and its view as a ``reference.attention`` call.

    ``inputs``: float64 ``q, k, v, dout`` holding values exactly representable in ``dtype``.
    ``q_to_ref`` / ``kv_to_ref`` map backend-layout tensors to the reference's ``[B', T', H, D]``
    (differentiable views); ``ref_to_q`` maps a reference-layout output back. ``lse_to_ref`` maps a
    backend LSE to ``[B', Hq, Tq']``. ``allowed`` / ``same_segment``: bool ``[B' or 1, Tq', Tk']``.
    """

    dtype: torch.dtype
    inputs: Tensors
    ref_kwargs: dict[str, Any]
    q_to_ref: Callable[[torch.Tensor], torch.Tensor]
    kv_to_ref: Callable[[torch.Tensor], torch.Tensor]
    ref_to_q: Callable[[torch.Tensor], torch.Tensor]
    lse_to_ref: Callable[[torch.Tensor], torch.Tensor]
    allowed: torch.Tensor
    same_segment: torch.Tensor
    segments: list[Segment] = field(default_factory=list)
    keep: torch.Tensor | None = None  # ref-layout dropout keep mask
    dropout_p: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float | None:
        return self.ref_kwargs.get("scale")


def _dense_problem(
    dtype: torch.dtype,
    inputs: Tensors,
    *,
    causal: bool,
    window: tuple[int, int],
    scale: float | None = None,
) -> Problem:
    q, k = inputs["q"], inputs["k"]
    Tq, Tk = q.shape[1], k.shape[1]
    allowed = torch.from_numpy(ref_attn.allowed_mask(Tq, Tk, causal=causal, window=window))[None]
    same = torch.ones(1, Tq, Tk, dtype=torch.bool)
    return Problem(
        dtype=dtype,
        inputs=inputs,
        ref_kwargs=dict(scale=scale, causal=causal, window=window),
        q_to_ref=lambda t: t,
        kv_to_ref=lambda t: t,
        ref_to_q=lambda t: t,
        lse_to_ref=lambda t: t,
        allowed=allowed,
        same_segment=same,
    )


def _segment_masks(
    Tq: int, Tk: int, cu_q: list[int], cu_k: list[int], causal: bool, window: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = ref_attn.allowed_mask(
        Tq, Tk, causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    same = ref_attn.allowed_mask(Tq, Tk, causal=False, window=(-1, -1), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return torch.from_numpy(allowed)[None], torch.from_numpy(same)[None]


def _segments(cu_q: list[int], cu_k: list[int], k_offset: int = 0) -> list[Segment]:
    return [
        Segment(torch.arange(cu_q[s], cu_q[s + 1]), torch.arange(k_offset + cu_k[s], k_offset + cu_k[s + 1]))
        for s in range(len(cu_q) - 1)
    ]


def _flat_doc_problem(
    dtype: torch.dtype,
    inputs: Tensors,
    *,
    cu_q: list[int],
    cu_k: list[int],
    local_k_slice: slice | None,
    causal: bool,
    window: tuple[int, int],
    scale: float | None = None,
) -> Problem:
    """Backend layout ``q [B, T, Hq, D]``, ``k, v [B', T', Hkv, D]`` with documents over the flattened
    batch (keys optionally sliced by ``local_k_slice`` after flattening, the llama3 layout)."""
    q = inputs["q"]
    B, T, _Hq, _D = q.shape
    ks = local_k_slice or slice(0, inputs["k"].shape[0] * inputs["k"].shape[1])
    n_k = ks.stop - ks.start

    def kv_to_ref(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])[ks][None]

    allowed, same = _segment_masks(B * T, n_k, cu_q, cu_k, causal, window)
    return Problem(
        dtype=dtype,
        inputs=inputs,
        ref_kwargs=dict(scale=scale, causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
        q_to_ref=lambda t: t.reshape(1, B * T, *t.shape[2:]),
        kv_to_ref=kv_to_ref,
        ref_to_q=lambda t: t.reshape(B, T, *t.shape[2:]),
        lse_to_ref=lambda t: t.transpose(0, 1).reshape(1, t.shape[1], B * T),
        allowed=allowed,
        same_segment=same,
        segments=_segments(cu_q, cu_k, ks.start),
    )


def _varlen_problem(
    dtype: torch.dtype,
    inputs: Tensors,
    *,
    cu_q: list[int],
    cu_k: list[int],
    causal: bool,
    window: tuple[int, int],
    scale: float | None = None,
) -> Problem:
    """Backend (kernel varlen) layout ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``."""
    tq, tk = inputs["q"].shape[0], inputs["k"].shape[0]
    allowed, same = _segment_masks(tq, tk, cu_q, cu_k, causal, window)
    return Problem(
        dtype=dtype,
        inputs=inputs,
        ref_kwargs=dict(scale=scale, causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
        q_to_ref=lambda t: t[None],
        kv_to_ref=lambda t: t[None],
        ref_to_q=lambda t: t[0],
        lse_to_ref=lambda t: t[None],
        allowed=allowed,
        same_segment=same,
        segments=_segments(cu_q, cu_k),
    )


# ------------------------------------------------------------------------------------------ judge


def reference(problem: Problem, *, with_lse: bool) -> Tensors:
    """``ref``: forward from ``reference.attention.attention`` (NumPy float64), gradients from the
    twin ``reference.twins.attention`` (autograd, float64), in the backend layout."""
    inp = problem.inputs
    kw = dict(problem.ref_kwargs)
    if problem.keep is not None:
        kw.update(keep_mask=problem.keep.numpy(), dropout_p=problem.dropout_p)
    out_np, lse_np = ref_attn.attention(
        problem.q_to_ref(inp["q"]).numpy(),
        problem.kv_to_ref(inp["k"]).numpy(),
        problem.kv_to_ref(inp["v"]).numpy(),
        **kw,
    )
    leaves = {n: inp[n].clone().requires_grad_(True) for n in ("q", "k", "v")}
    kw_t = dict(kw)
    if problem.keep is not None:
        kw_t["keep_mask"] = problem.keep
    out_t, _ = twins.attention(
        problem.q_to_ref(leaves["q"]),
        problem.kv_to_ref(leaves["k"]),
        problem.kv_to_ref(leaves["v"]),
        **kw_t,
    )
    dq, dk, dv = torch.autograd.grad(
        out_t, (leaves["q"], leaves["k"], leaves["v"]), problem.q_to_ref(inp["dout"])
    )
    refs = {"out": problem.ref_to_q(torch.from_numpy(out_np)), "dq": dq, "dk": dk, "dv": dv}
    if with_lse:
        refs["lse"] = torch.from_numpy(lse_np)
    return refs


def lowprec(problem: Problem, *, with_lse: bool) -> Tensors:
    """``low``: :func:`conformance.baseline.attention` in the case dtype, same layout as ``reference``."""
    inp = {n: t.to(problem.dtype) for n, t in problem.inputs.items()}
    leaves = {n: inp[n].clone().requires_grad_(True) for n in ("q", "k", "v")}
    out, lse = baseline.attention(
        problem.q_to_ref(leaves["q"]),
        problem.kv_to_ref(leaves["k"]),
        problem.kv_to_ref(leaves["v"]),
        problem.allowed,
        scale=problem.scale,
        keep=problem.keep,
        dropout_p=problem.dropout_p,
    )
    dq, dk, dv = torch.autograd.grad(
        out, (leaves["q"], leaves["k"], leaves["v"]), problem.q_to_ref(inp["dout"])
    )
    lows = {"out": problem.ref_to_q(out.detach()), "dq": dq, "dk": dk, "dv": dv}
    if with_lse:
        lows["lse"] = lse.detach()
    return lows


# ------------------------------------------------------------------------------------------ runners


def _on(t: torch.Tensor, device: str, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    x = t.detach().to(device=device, dtype=dtype, copy=True)
    return x.requires_grad_(True) if grad else x


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


@dataclass
class Runner:
    """Runs one backend on a :class:`Problem`'s inputs: ``full(inputs)`` → out (+ lse) and grads;
    ``forward(inputs)`` → out only. ``violations`` collects every call that modified the tensors it
    was given (q, k, v, dout: compared bit for bit after forward and backward)."""

    full: Callable[[Tensors], Tensors]
    forward: Callable[[Tensors], torch.Tensor]
    violations: list[str] = field(default_factory=list)


def _watch(
    violations: list[str], names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]
) -> Callable[[], None]:
    """Snapshot ``tensors``; the returned function records which of them changed since."""
    snap = [t.detach().clone() for t in tensors]

    def check() -> None:
        changed = [n for n, a, t in zip(names, snap, tensors) if not torch.equal(a, t.detach())]
        if changed:
            violations.append(f"the backend modified its input(s) {changed} in place")

    return check


def backend_runner(backend: Any, device: str, dtype: torch.dtype, call_kwargs: dict[str, Any]) -> Runner:
    """The module-level path: ``backend((q, k, v), **call_kwargs)`` and autograd."""

    violations: list[str] = []

    def full(inputs: Tensors) -> Tensors:
        q, k, v = (_on(inputs[n], device, dtype, True) for n in ("q", "k", "v"))
        dout = _on(inputs["dout"], device, dtype)
        check = _watch(violations, ("q", "k", "v", "dout"), (q, k, v, dout))
        out = backend((q, k, v), **call_kwargs)
        if not out.requires_grad:
            raise RuntimeError("the backend's output has no autograd graph (no backward)")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        check()
        return {"out": _cpu(out), "dq": _cpu(dq), "dk": _cpu(dk), "dv": _cpu(dv)}

    def forward(inputs: Tensors) -> torch.Tensor:
        with torch.no_grad():
            q, k, v = (_on(inputs[n], device, dtype) for n in ("q", "k", "v"))
            return _cpu(backend((q, k, v), **call_kwargs))

    return Runner(full, forward, violations)


def packed_runner(backend: Any, device: str, dtype: torch.dtype, call_kwargs: dict[str, Any]) -> Runner:
    """Packed QKV: ``backend(stack([q, k, v], dim=2), **call_kwargs)``; ``dqkv`` split into dq/dk/dv."""

    violations: list[str] = []

    def full(inputs: Tensors) -> Tensors:
        qkv = _on(torch.stack([inputs["q"], inputs["k"], inputs["v"]], dim=2), device, dtype, True)
        dout = _on(inputs["dout"], device, dtype)
        check = _watch(violations, ("qkv", "dout"), (qkv, dout))
        out = backend(qkv, **call_kwargs)
        if not out.requires_grad:
            raise RuntimeError("the backend's output has no autograd graph (no backward)")
        (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
        check()
        dq, dk, dv = _cpu(dqkv).unbind(dim=2)
        return {"out": _cpu(out), "dq": dq, "dk": dk, "dv": dv}

    def forward(inputs: Tensors) -> torch.Tensor:
        with torch.no_grad():
            qkv = _on(torch.stack([inputs["q"], inputs["k"], inputs["v"]], dim=2), device, dtype)
            return _cpu(backend(qkv, **call_kwargs))

    return Runner(full, forward, violations)


def kernel_runner(kernel: Any, device: str, dtype: torch.dtype, make_call: Callable[[], Any]) -> Runner:
    """The LSE kernel: ``kernel.forward(q, k, v, call)`` → ``(out, lse)``; ``kernel.backward``."""

    violations: list[str] = []

    def full(inputs: Tensors) -> Tensors:
        call = make_call()
        q, k, v = (_on(inputs[n], device, dtype) for n in ("q", "k", "v"))
        dout = _on(inputs["dout"], device, dtype)
        check = _watch(violations, ("q", "k", "v", "dout"), (q, k, v, dout))
        out, lse = kernel.forward(q, k, v, call)
        out_snap = out.detach().clone()
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, call)
        check()
        if not torch.equal(out_snap, out):
            violations.append("kernel.backward modified out in place")
        return {"out": _cpu(out), "lse": _cpu(lse), "dq": _cpu(dq), "dk": _cpu(dk), "dv": _cpu(dv)}

    def forward(inputs: Tensors) -> torch.Tensor:
        call = make_call()
        q, k, v = (_on(inputs[n], device, dtype) for n in ("q", "k", "v"))
        out, _ = kernel.forward(q, k, v, call)
        return _cpu(out)

    return Runner(full, forward, violations)


def _cu_tensor(cu: list[int], device: str) -> torch.Tensor:
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _maxlen(cu: list[int]) -> int:
    return max((b - a for a, b in itertools.pairwise(cu)), default=0)


# ------------------------------------------------------------------------------------------ checks


ISOLATION_GRAD_ULPS = 4  # other documents' gradients under a non-deterministic backward


def run_checks(
    case: Case,
    subject: Subject,
    problem: Problem,
    runner: Runner,
    ctx: RunContext,
    *,
    with_lse: bool,
    edge_name: str | None,
    edge_sides: tuple[str, ...] = ("left", "right"),
    poison: bool = True,
) -> list[CheckResult]:
    """Budget checks and the extra checks of docs/judging.md for one problem on one backend."""
    dtype = problem.dtype
    inputs = problem.inputs
    outs = runner.full(inputs)
    refs = reference(problem, with_lse=with_lse)
    lows = lowprec(problem, with_lse=with_lse)
    if with_lse:
        outs = dict(outs, lse=problem.lse_to_ref(outs["lse"]))
    results = judge_softmax(outs, refs, lows, dtype, rounded_check=True)
    results.append(
        fail("inputs_unchanged", "inputs_unchanged: " + runner.violations[0])
        if runner.violations
        else ok(
            "inputs_unchanged", "inputs_unchanged: q, k, v and dout bit-identical after forward and backward"
        )
    )
    ctx.remember(case, Stored({k: v for k, v in outs.items()}, refs, lows, dtype))
    gen = torch.Generator().manual_seed(case.seed + 1)

    if problem.segments and len(problem.segments) > 1:
        nonempty = [i for i, s in enumerate(problem.segments) if s.q.numel() and s.k.numel()]
        which = nonempty[len(nonempty) // 2] if nonempty else 0
        if subject.spec.supports_deterministic(inputs["q"].shape[-1]):
            # Bit-identity across two runs is only promised by a deterministic backward (flash_4's
            # atomics reorder dK sums by an ulp otherwise: seen on an H200); compare in that mode.
            with deterministic_mode():
                base = {k: v for k, v in runner.full(inputs).items() if k != "lse"}
                results.append(check_isolation(runner.full, inputs, problem.segments, which, base, gen))
        else:
            # no deterministic backward here (e.g. flash_3 above head_dim 128): atomics may move
            # other documents' gradients by an ulp between any two runs
            base = {k: v for k, v in outs.items() if k != "lse"}
            results.append(
                check_isolation(
                    runner.full, inputs, problem.segments, which, base, gen, grad_ulps=ISOLATION_GRAD_ULPS
                )
            )

    if edge_name is not None:
        results.append(_edge_check(edge_name, problem, runner, outs["out"], gen, edge_sides, case))

    if subject.spec.supports_deterministic(inputs["q"].shape[-1]):
        results.append(check_determinism("determinism", lambda: runner.full(inputs)))

    if poison:
        results.append(_poison_check(problem, runner, refs, lows))
    return results


def _edge_check(
    name: str,
    problem: Problem,
    runner: Runner,
    base_out: torch.Tensor,
    gen: torch.Generator,
    sides: tuple[str, ...],
    case: Case,
) -> CheckResult:
    shape_q = problem.inputs["q"].shape[:-2]
    shape_k = problem.inputs["k"].shape[:-2]
    q_flat = problem.q_to_ref(torch.arange(math.prod(shape_q)).reshape(*shape_q, 1, 1))[..., 0, 0]
    k_flat = problem.kv_to_ref(torch.arange(math.prod(shape_k)).reshape(*shape_k, 1, 1))[..., 0, 0]
    rng = np.random.default_rng(case.seed + 7)
    Bq, Tq = q_flat.shape
    rows = [(int(rng.integers(0, Bq)), int(i)) for i in rng.permutation(Tq)[:48]]
    probes: list[EdgeProbe] = []
    for side in sides:
        found = edge_probes(problem.allowed, problem.same_segment, q_flat, k_flat, rows, sides=(side,))
        probes += found[:2]
    return check_edges(name, runner.forward, problem.inputs, probes, base_out, gen)


def _poison_check(problem: Problem, runner: Runner, refs: Tensors, lows: Tensors) -> CheckResult:
    """Warm the backend up on NaN inputs of the same shape (catches state or scratch carried over
    between calls), then re-run the real inputs with every uninitialised allocation NaN-filled."""
    nan_inputs = {n: torch.full_like(t, math.nan) for n, t in problem.inputs.items()}
    with contextlib.suppress(Exception):  # a backend may reject NaN inputs; what matters is the next call
        runner.full(nan_inputs)
    with nan_poison():
        outs = runner.full(problem.inputs)
    if "lse" in refs:
        outs = dict(outs, lse=problem.lse_to_ref(outs["lse"]))
    verdicts = judge_softmax(outs, refs, lows, problem.dtype, mean_check=False, prefix="")
    bad = [v for v in verdicts if not v.passed]
    if bad:
        return fail(
            "poison",
            "poison: after a NaN-input warm-up and with NaN-filled allocations: "
            + "; ".join(v.message for v in bad),
        )
    return ok("poison", "poison: NaN warm-up and NaN-filled allocations change no verdict")


# ------------------------------------------------------------------------------------------ families


def _base_shape(case: Case) -> tuple[np.random.Generator, torch.Generator, int, int, int, int, int, bool]:
    rng = case.rng()
    gen = torch.Generator().manual_seed(case.seed)
    full = case.size == "full"
    p = case.param
    Hq, Hkv = draw_heads(rng, p["gqa"], full)
    B = int(rng.integers(1, 4 if full else 3))
    T = draw_len(rng, full)
    return rng, gen, B, T, Hq, Hkv, int(p["head_dim"]), full


def run_attn(case: Case, subject: Subject, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    """``backend((q, k, v), ...)``: causal, window, documents, window + documents, q/k segmentations."""
    rng, gen, B, T, Hq, Hkv, D, full = _base_shape(case)
    dtype, device, variant = case.torch_dtype(), case.device, case.variant
    w = draw_window(rng, T) if "window" in variant else None
    window = (w - 1, 0) if w is not None else (-1, -1)
    info: dict[str, Any] = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "window_size": w}
    if variant == "documents_qk":
        # the llama3 context-parallel layout of one rank: local queries, all keys up to its end
        world = int(rng.choice([2, 3, 4]))
        rank = int(rng.integers(1, world))
        n = T * world
        cu_global = draw_documents(rng, 1, n)
        meta = ref_layout_llama3(cu_global, rank, world)
        B = 1
        inputs = {
            "q": randn(gen, (1, T, Hq, D), dtype),
            "k": randn(gen, (1, n, Hkv, D), dtype),
            "v": randn(gen, (1, n, Hkv, D), dtype),
            "dout": randn(gen, (1, T, Hq, D), dtype),
        }
        problem = _flat_doc_problem(
            dtype,
            inputs,
            cu_q=meta["cu_q"],
            cu_k=meta["cu_k"],
            local_k_slice=meta["local_k_slice"],
            causal=True,
            window=window,
        )
        call = {
            "cu_doc_lens_q": _cu_tensor(meta["cu_q"], device),
            "cu_doc_lens_k": _cu_tensor(meta["cu_k"], device),
            "max_doc_len_q": _maxlen(meta["cu_q"]),
            "max_doc_len_k": _maxlen(meta["cu_k"]),
            "local_k_slice": meta["local_k_slice"],
        }
        info.update(B=1, world=world, rank=rank, cu_doc_lens=cu_global, cu_q=meta["cu_q"], cu_k=meta["cu_k"])
    else:
        inputs = {
            "q": randn(gen, (B, T, Hq, D), dtype),
            "k": randn(gen, (B, T, Hkv, D), dtype),
            "v": randn(gen, (B, T, Hkv, D), dtype),
            "dout": randn(gen, (B, T, Hq, D), dtype),
        }
        if "documents" in variant:
            cu = draw_documents(rng, B, T, cross_rows=full)
            problem = _flat_doc_problem(
                dtype, inputs, cu_q=cu, cu_k=cu, local_k_slice=None, causal=True, window=window
            )
            call = {"cu_doc_lens": _cu_tensor(cu, device), "max_doc_len": _maxlen(cu)}
            info["cu_doc_lens"] = cu
        else:
            problem = _dense_problem(dtype, inputs, causal=True, window=window)
            call = {}
    backend = subject.build_backend(
        head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=None, dropout_p=0.0, window_size=window
    )
    runner = backend_runner(backend, device, dtype, call)
    edge = "window_edge" if w is not None and w <= T else "causal_edge"
    checks = run_checks(case, subject, problem, runner, ctx, with_lse=False, edge_name=edge)
    return checks, info


def ref_layout_llama3(cu: list[int], rank: int, world: int) -> dict[str, Any]:
    from reference.cp_layouts import llama3_metadata

    meta = llama3_metadata(np.asarray(cu), rank, world)
    return {
        "cu_q": [int(x) for x in meta["cu_doc_lens_q"]],
        "cu_k": [int(x) for x in meta["cu_doc_lens_k"]],
        "local_k_slice": meta["local_k_slice"],
    }


def run_packed(case: Case, subject: Subject, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    """Packed ``[B, T, 3, H, D]`` QKV through the backend (MHA)."""
    rng, gen, B, T, Hq, _Hkv, D, _full = _base_shape(case)
    dtype, device, variant = case.torch_dtype(), case.device, case.variant
    w = draw_window(rng, T) if variant == "window" else None
    window = (w - 1, 0) if w is not None else (-1, -1)
    inputs = {n: randn(gen, (B, T, Hq, D), dtype) for n in ("q", "k", "v", "dout")}
    info: dict[str, Any] = {"B": B, "T": T, "H": Hq, "D": D, "window_size": w}
    if variant == "documents":
        cu = draw_documents(rng, B, T)
        problem = _flat_doc_problem(
            dtype, inputs, cu_q=cu, cu_k=cu, local_k_slice=None, causal=True, window=window
        )
        call = {"cu_doc_lens": _cu_tensor(cu, device), "max_doc_len": _maxlen(cu)}
        info["cu_doc_lens"] = cu
    else:
        problem = _dense_problem(dtype, inputs, causal=True, window=window)
        call = {}
    backend = subject.build_backend(
        head_dim=D, n_heads=Hq, n_kv_heads=Hq, scale=None, dropout_p=0.0, window_size=window
    )
    runner = packed_runner(backend, device, dtype, call)
    edge = "window_edge" if w is not None and w <= T else None
    return run_checks(case, subject, problem, runner, ctx, with_lse=False, edge_name=edge), info


def _kernel_call_factory(
    subject: Subject,
    device: str,
    *,
    head_dim: int,
    scale: float,
    causal: bool,
    window: tuple[int, int],
    cu_q: list[int] | None = None,
    cu_k: list[int] | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> Callable[[], Any]:
    from olmo_attn.ops.kernel import KernelCall

    deterministic = subject.spec.supports_deterministic(head_dim)

    def make() -> Any:
        kw: dict[str, Any] = dict(
            scale=scale,
            causal=causal,
            window=window,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            deterministic=deterministic,
        )
        if cu_q is not None and cu_k is not None:
            kw.update(
                cu_seqlens_q=_cu_tensor(cu_q, device),
                cu_seqlens_k=_cu_tensor(cu_k, device),
                max_seqlen_q=_maxlen(cu_q),
                max_seqlen_k=_maxlen(cu_k),
                cu_seqlens_q_host=tuple(cu_q),
                cu_seqlens_k_host=tuple(cu_k),
            )
        return KernelCall(**kw)

    return make


def run_kernel(case: Case, subject: Subject, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    """``backend.kernel()``: non-causal, causal with Tq != Tk, windows, varlen, q/k segmentations."""
    rng, gen, B, T, Hq, Hkv, D, full = _base_shape(case)
    dtype, device, variant = case.torch_dtype(), case.device, case.variant
    scale = (
        float(rng.choice([1.0 / math.sqrt(D), 0.5 / math.sqrt(D)]))
        if Feature.custom_scale in subject.spec.features
        else 1.0 / math.sqrt(D)
    )
    info: dict[str, Any] = {"Hq": Hq, "Hkv": Hkv, "D": D, "scale": scale}
    causal = variant not in ("non_causal", "window_bidir")
    if variant in ("non_causal", "causal", "window", "window_bidir"):
        Tq = T
        Tk = T if rng.random() < 0.5 else draw_len(rng, full)
        if variant == "window":
            w = draw_window(rng, Tk)
            window = (w - 1, int(rng.choice([0, 3, -1])))
        elif variant == "window_bidir":
            window = draw_bidir_window(rng, max(Tq, Tk))
        else:
            window = (-1, -1)
        inputs = {
            "q": randn(gen, (B, Tq, Hq, D), dtype),
            "k": randn(gen, (B, Tk, Hkv, D), dtype),
            "v": randn(gen, (B, Tk, Hkv, D), dtype),
            "dout": randn(gen, (B, Tq, Hq, D), dtype),
        }
        problem = _dense_problem(dtype, inputs, causal=causal, window=window, scale=scale)
        make_call = _kernel_call_factory(
            subject, device, head_dim=D, scale=scale, causal=causal, window=window
        )
        info.update(B=B, Tq=Tq, Tk=Tk, causal=causal, window=window)
    else:
        total_q = B * T
        if variant == "varlen_qk":
            total_k = B * draw_len(rng, full)
            cu_q, cu_k = draw_segments_qk(rng, total_q, total_k)
            window = (-1, -1) if rng.random() < 0.5 else (int(rng.integers(1, T)), 0)
        else:
            total_k = total_q
            cu_q = cu_k = draw_documents(rng, B, T, cross_rows=True)
            window = (draw_window(rng, T) - 1, 0) if variant == "varlen_window" else (-1, -1)
        inputs = {
            "q": randn(gen, (total_q, Hq, D), dtype),
            "k": randn(gen, (total_k, Hkv, D), dtype),
            "v": randn(gen, (total_k, Hkv, D), dtype),
            "dout": randn(gen, (total_q, Hq, D), dtype),
        }
        problem = _varlen_problem(
            dtype, inputs, cu_q=cu_q, cu_k=cu_k, causal=True, window=window, scale=scale
        )
        make_call = _kernel_call_factory(
            subject, device, head_dim=D, scale=scale, causal=True, window=window, cu_q=cu_q, cu_k=cu_k
        )
        info.update(total_q=total_q, total_k=total_k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window=window)
    backend = subject.build_backend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=scale, dropout_p=0.0)
    runner = kernel_runner(backend.kernel(), device, dtype, make_call)
    bounded = window[0] >= 0 or window[1] >= 0
    edge = "window_edge" if bounded else ("causal_edge" if causal else None)
    return run_checks(case, subject, problem, runner, ctx, with_lse=True, edge_name=edge), info


def recover_keep(kernel: Any, problem: Problem, make_call: Callable[[], Any], device: str) -> torch.Tensor:
    """The keep mask a kernel's dropout actually used, read off one forward with ``v`` = identity.

    With ``v[j] = e_j`` (key ``j``'s value is the ``j``-th unit vector; needs ``D >= Tk``),
    ``out[i, j] = P_ij · keep_ij / (1 − p)``, so the kept entries are the non-zero ones (``P_ij > 0``
    wherever the mask allows the pair). Works for any RNG: flash-attn's Philox stream as well as our
    counter-based mask; the real run then replays the same mask from the same seed.
    Returns bool ``[B', Hq, Tq', Tk']`` in the reference layout (``False`` where the mask forbids).
    """
    q, k = problem.inputs["q"], problem.inputs["k"]
    Tk_ref = problem.kv_to_ref(k).shape[1]
    D = q.shape[-1]
    if Tk_ref > D:
        raise ValueError(f"recovering the keep mask needs head_dim >= keys ({D} < {Tk_ref})")
    flat = torch.zeros(*k.shape[:-2], k.shape[-2], D, dtype=torch.float64)  # backend layout of v
    idx = torch.arange(Tk_ref)
    ref_v = problem.kv_to_ref(flat)  # a view: writing it fills the backend-layout tensor
    ref_v[:, idx, :, idx] = 1.0
    call = make_call()
    with torch.no_grad():
        out, _ = kernel.forward(
            _on(q, device, problem.dtype),
            _on(k, device, problem.dtype),
            _on(flat, device, problem.dtype),
            call,
        )
    probs = problem.q_to_ref(_cpu(out).double())[..., :Tk_ref]  # [B', Tq', Hq, Tk']
    return (probs != 0).permute(0, 2, 1, 3) & problem.allowed[:, None]


def run_dropout(case: Case, subject: Subject, ctx: RunContext) -> tuple[list[CheckResult], dict[str, Any]]:
    """Seeded dropout against the reference with the kernel's own keep mask; no dropout in eval mode.

    The mask is recovered from an identity-``V`` probe (:func:`recover_keep`) and must (a) keep about
    ``1 − p`` of the allowed pairs, (b) be replayed exactly by the same seed (the judged run uses it).
    When it equals ``olmo_attn.ops.dropout.keep_mask(seed, ...)`` (the torch backend's counter-based
    mask) the case says so; other kernels (flash-attn's Philox) use their own stream.
    """
    rng, gen, B, _T, Hq, Hkv, D, _full = _base_shape(case)
    dtype, device, variant = case.torch_dtype(), case.device, case.variant
    p = float(rng.choice([0.1, 0.3]))
    T = int(rng.choice([t for t in (17, 33, 50, 64) if t <= D]))  # keys <= head_dim for the probe
    info: dict[str, Any] = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "dropout_p": p}
    if variant == "eval_off":
        return _eval_dropout(case, subject, gen, B, T, Hq, Hkv, D, p, dtype, device), info
    seed = int(rng.integers(0, 2**62))
    scale = 1.0 / math.sqrt(D)
    if variant == "keep_mask_varlen":
        B = max(1, D // T)  # the probe needs every key of the flattened batch within head_dim
        n = B * T
        cu = draw_documents(rng, B, T, cross_rows=True)
        inputs = {
            "q": randn(gen, (n, Hq, D), dtype),
            "k": randn(gen, (n, Hkv, D), dtype),
            "v": randn(gen, (n, Hkv, D), dtype),
            "dout": randn(gen, (n, Hq, D), dtype),
        }
        problem = _varlen_problem(dtype, inputs, cu_q=cu, cu_k=cu, causal=True, window=(-1, -1), scale=scale)
        make_call = _kernel_call_factory(
            subject,
            device,
            head_dim=D,
            scale=scale,
            causal=True,
            window=(-1, -1),
            cu_q=cu,
            cu_k=cu,
            dropout_p=p,
            dropout_seed=seed,
        )
        shared_shape = (1, Hq, n, n)
        info.update(B=B, cu_seqlens=cu)
    else:
        inputs = {
            "q": randn(gen, (B, T, Hq, D), dtype),
            "k": randn(gen, (B, T, Hkv, D), dtype),
            "v": randn(gen, (B, T, Hkv, D), dtype),
            "dout": randn(gen, (B, T, Hq, D), dtype),
        }
        problem = _dense_problem(dtype, inputs, causal=True, window=(-1, -1), scale=scale)
        make_call = _kernel_call_factory(
            subject,
            device,
            head_dim=D,
            scale=scale,
            causal=True,
            window=(-1, -1),
            dropout_p=p,
            dropout_seed=seed,
        )
        shared_shape = (B, Hq, T, T)
    info["dropout_seed"] = seed
    backend = subject.build_backend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=scale, dropout_p=p)
    kernel = backend.kernel()
    keep = recover_keep(kernel, problem, make_call, device)
    checks = [_dropout_rate(keep, problem.allowed, p)]
    from olmo_attn.ops.dropout import keep_mask

    shared = keep_mask(seed, *shared_shape, p) & problem.allowed[:, None]
    info["mask"] = "olmo_attn.ops.dropout.keep_mask" if torch.equal(shared, keep) else "the kernel's own RNG"
    problem.keep = keep
    problem.dropout_p = p
    runner = kernel_runner(kernel, device, dtype, make_call)
    checks += run_checks(case, subject, problem, runner, ctx, with_lse=True, edge_name=None)
    return checks, info


def _dropout_rate(keep: torch.Tensor, allowed: torch.Tensor, p: float) -> CheckResult:
    """The fraction of allowed pairs dropped is ``p`` within 6 standard deviations."""
    n = int(allowed.expand(keep.shape[0], *allowed.shape[1:]).sum()) * keep.shape[1]
    dropped = n - int(keep.sum())
    sigma = math.sqrt(n * p * (1 - p))
    ok_ = abs(dropped - n * p) <= 6 * sigma + 1
    msg = f"dropout_rate: {dropped} of {n} allowed pairs dropped ({dropped / max(n, 1):.3f}, p = {p})"
    return ok("dropout_rate", msg) if ok_ else fail("dropout_rate", msg)


def _eval_dropout(
    case: Case,
    subject: Subject,
    gen: torch.Generator,
    B: int,
    T: int,
    Hq: int,
    Hkv: int,
    D: int,
    p: float,
    dtype: torch.dtype,
    device: str,
) -> list[CheckResult]:
    """A backend built with ``dropout_p > 0`` drops nothing in ``eval()`` (OLMo-core drops there too;
    we don't), and does drop in ``train()``."""
    inputs = {
        "q": randn(gen, (B, T, Hq, D), dtype),
        "k": randn(gen, (B, T, Hkv, D), dtype),
        "v": randn(gen, (B, T, Hkv, D), dtype),
        "dout": randn(gen, (B, T, Hq, D), dtype),
    }
    plain = subject.build_backend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=None, dropout_p=0.0)
    dropping = subject.build_backend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, scale=None, dropout_p=p)
    plain.eval()
    dropping.eval()
    a = backend_runner(plain, device, dtype, {}).forward(inputs)
    b = backend_runner(dropping, device, dtype, {}).forward(inputs)
    from ..checks import bit_identical

    results = []
    same, msg = bit_identical("out", a, b)
    results.append(
        ok("eval_no_dropout", "eval(): dropout_p > 0 gives the dropout-free output")
        if same
        else fail(
            "eval_no_dropout", f"eval_no_dropout: a backend with dropout_p={p} still drops in eval(): {msg}"
        )
    )
    dropping.train()
    c = backend_runner(dropping, device, dtype, {}).forward(inputs)
    same, _ = bit_identical("out", a, c)
    results.append(
        fail("train_dropout_active", f"train_dropout_active: dropout_p={p} in train() changed nothing")
        if same
        else ok("train_dropout_active", "train(): dropout is applied")
    )
    # the dropout-free eval output is also judged against the reference
    problem = _dense_problem(dtype, inputs, causal=True, window=(-1, -1))
    refs = reference(problem, with_lse=False)
    lows = lowprec(problem, with_lse=False)
    results += judge_softmax({"out": b}, {"out": refs["out"]}, {"out": lows["out"]}, dtype)
    return results
