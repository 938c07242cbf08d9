"""Check results and the checks that are not a single budget: isolation, edges, determinism, poison.

Every check produces a :class:`CheckResult` whose ``name`` says what was checked (``out``,
``dq.mean``, ``lse``, ``document_isolation``, ``window_edge``, ``causal_edge``, ``determinism``,
``poison``, ``inputs_unchanged``, ``cache_write``, ``pairwise``, ...). A failing case's message
lists its failing checks by name.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import tolerances as tol


class HarnessError(RuntimeError):
    """The harness itself could not judge a case (a bug in the harness, never a verdict)."""


@dataclass
class CheckResult:
    """One named check of one case (numbers are ``None`` for yes/no checks)."""

    name: str
    passed: bool
    message: str = ""
    err: float | None = None
    baseline_err: float | None = None
    threshold: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.err is None or self.baseline_err is None:
            return None
        if self.baseline_err == 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return self.err / self.baseline_err

    @property
    def margin(self) -> float | None:
        if self.err is None or self.threshold is None:
            return None
        return self.threshold - self.err

    @property
    def budget_ratio(self) -> float | None:
        """``err / threshold``: ``<= 1`` passes; the matrix shows the worst per cell."""
        if self.err is None or self.threshold is None:
            return None
        if math.isnan(self.err) or math.isnan(self.threshold):
            return math.inf
        if self.threshold <= 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return self.err / self.threshold

    @classmethod
    def from_verdict(cls, v: tol.Verdict) -> CheckResult:
        return cls(v.name, v.passed, v.message, v.err, v.baseline_err, v.threshold)

    def as_dict(self) -> dict[str, Any]:
        def num(x: float | None) -> float | str | None:
            if x is None:
                return None
            return x if math.isfinite(x) else str(x)

        return {
            "name": self.name,
            "passed": self.passed,
            "message": self.message,
            "err": num(self.err),
            "baseline_err": num(self.baseline_err),
            "ratio": num(self.ratio),
            "threshold": num(self.threshold),
            "margin": num(self.margin),
            "budget_ratio": num(self.budget_ratio),
        }


def ok(name: str, message: str = "") -> CheckResult:
    return CheckResult(name, True, message)


def fail(name: str, message: str) -> CheckResult:
    return CheckResult(name, False, message)


def _baseline_sane(name: str, low: torch.Tensor, ref: torch.Tensor) -> None:
    problem = tol.nonfinite_problem(f"low-precision baseline {name}", low, ref)
    if problem is not None:
        raise HarnessError(problem)


MEAN_MIN_NUMEL = 256


def judge_softmax(
    outs: Mapping[str, torch.Tensor],
    refs: Mapping[str, torch.Tensor],
    lows: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    mean_check: bool = True,
    prefix: str = "",
    rounded_check: bool = False,
) -> list[CheckResult]:
    """The error budget (docs/judging.md) for every named tensor (``out``, ``lse``, ``dq``, ``dk``, ``dv``, ...),
    plus the FlexAttention mean check. A tensor missing from ``outs`` fails. Gradients (names
    starting with ``d``) share one scale for the absolute floor: the largest ``max|ref|`` among them.

    The mean check applies to activations and their gradients (``out``, ``lse``, ``dq``, ``dx``, ...)
    with at least :data:`MEAN_MIN_NUMEL` entries, as in FlexAttention's tests; on parameter gradients
    (``d[w_q.weight]``, a few dozen bias entries) a 1.1x bound on a mean is noise, not a verdict.

    ``rounded_check``: also the rounded-float32 check (:func:`tolerances.rounded_fp32_budget`) on every
    non-gradient tensor of a half dtype with at least :data:`MEAN_MIN_NUMEL` entries (``out``; not the
    float32 ``lse``) — for callers whose ``out`` is one attention op (whole modules round in between)."""
    results = []
    grad_scale = max((tol.ref_scale(r) for n, r in refs.items() if n.startswith("d")), default=0.0)
    for name, ref in refs.items():
        label = prefix + name
        if name not in outs or outs[name] is None:
            results.append(fail(label, f"{label}: the backend produced no {name}"))
            continue
        _baseline_sane(label, lows[name], ref)
        scale = grad_scale if name.startswith("d") else None
        results.append(
            CheckResult.from_verdict(
                tol.max_error_budget(label, outs[name], ref, lows[name], dtype, scale=scale)
            )
        )
        if mean_check and not name.startswith("d[") and ref.numel() >= MEAN_MIN_NUMEL:
            results.append(
                CheckResult.from_verdict(
                    tol.mean_error_budget(label, outs[name], ref, lows[name], dtype, scale=scale)
                )
            )
        if (
            rounded_check
            and not name.startswith("d")
            and dtype in tol.HALF_DTYPES
            and outs[name].dtype in tol.HALF_DTYPES
            and ref.numel() >= MEAN_MIN_NUMEL
        ):
            results.append(CheckResult.from_verdict(tol.rounded_fp32_budget(label, outs[name], ref, dtype)))
    return results


def judge_rel_rms(
    outs: Mapping[str, torch.Tensor],
    refs: Mapping[str, torch.Tensor],
    budgets: Mapping[str, float],
    lows: Mapping[str, torch.Tensor] | None = None,
    *,
    k_low: float | None = None,
) -> list[CheckResult]:
    """fla's relative-RMS rule for every named tensor (``k_low``: see :func:`tolerances.rel_rms_budget`)."""
    results = []
    for name, ref in refs.items():
        if name not in outs or outs[name] is None:
            results.append(fail(name, f"{name}: the implementation produced no {name}"))
            continue
        low = lows.get(name) if lows else None
        results.append(
            CheckResult.from_verdict(
                tol.rel_rms_budget(name, outs[name], ref, budgets[name], low, k_low=k_low)
            )
        )
    return results


def bit_identical(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Exact equality (NaN-aware); the message locates the first difference."""
    a_, b_ = a.detach().cpu(), b.detach().cpu()
    if a_.shape != b_.shape:
        return False, f"{name}: shapes differ {tuple(a_.shape)} vs {tuple(b_.shape)}"
    same = (a_ == b_) | (torch.isnan(a_) & torch.isnan(b_))
    if bool(same.all()):
        return True, ""
    idx = tuple(int(i) for i in (~same).nonzero()[0])
    return False, (
        f"{name}: {int((~same).sum())} entries differ, first at {idx}: {float(a_[idx])!r} vs {float(b_[idx])!r} "
        f"(max |diff| {float((a_.double() - b_.double()).abs().nan_to_num(math.inf).max()):.3e})"
    )


# ----------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic_mode() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block: how a user asks every backend for
    its deterministic backward (flash-attn's ``deterministic=True`` follows it). Restored on exit."""
    prev_enabled = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
            yield
    finally:
        torch.use_deterministic_algorithms(prev_enabled, warn_only=prev_warn)


def check_determinism(name: str, run: Callable[[], Mapping[str, torch.Tensor]]) -> CheckResult:
    """Two runs in deterministic mode must be bit-identical, tensor by tensor (backends whose table
    entry claims ``Feature.deterministic``)."""
    with deterministic_mode():
        first = run()
        again = run()
    for k, a in first.items():
        same, msg = bit_identical(k, a, again[k])
        if not same:
            return fail(name, f"{name}: two runs of the same case differ: {msg}")
    return ok(name, f"{name}: {len(first)} tensors bit-identical over two runs")


# ----------------------------------------------------------------------------- poison


@contextlib.contextmanager
def nan_poison() -> Iterator[None]:
    """Fill every uninitialised allocation with NaN while the block runs.

    The mechanism is PyTorch's own: with ``torch.use_deterministic_algorithms(True)`` and
    ``torch.utils.deterministic.fill_uninitialized_memory = True`` (its default), ``torch.empty``,
    ``empty_like``, ``empty_strided``, ``new_empty`` and ``resize_`` fill floating-point memory with
    NaN (integers with their maximum value) — on CPU and CUDA alike, including allocations made
    inside PyTorch operators. ``warn_only=True`` keeps operators without a deterministic variant
    running; their warnings are silenced here. The previous settings are restored on exit.
    """
    import torch.utils.deterministic as det

    prev_enabled = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
            det.fill_uninitialized_memory = True
            yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_enabled, warn_only=prev_warn)


def nan_like(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [torch.full_like(t, math.nan) for t in tensors]


# ----------------------------------------------------------------------------- isolation & edges


@dataclass(frozen=True)
class Segment:
    """Flat token indices of one document: queries ``q`` and keys ``k`` (backend layout, over the
    leading dims of the tensors, e.g. ``b * T + t``)."""

    q: torch.Tensor
    k: torch.Tensor


def check_isolation(
    run: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    inputs: dict[str, torch.Tensor],
    segments: Sequence[Segment],
    which: int,
    first: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    *,
    q_names: Sequence[str] = ("q", "dout"),
    k_names: Sequence[str] = ("k", "v"),
    q_outputs: Sequence[str] = ("out", "dq"),
    k_outputs: Sequence[str] = ("dk", "dv"),
    trailing: int = 2,
    grad_ulps: int = 0,
) -> CheckResult:
    """Perturb document ``which`` (its queries, keys, values and output gradient); every other
    document's outputs and gradients must stay bit-identical, and the perturbed one must move.

    ``trailing``: number of non-token dims at the end of every tensor (2 for ``[..., H, D]``, 1 for
    module activations ``[B, T, C]``). ``grad_ulps``: for a backward that is not deterministic (atomic
    adds reorder sums between any two runs), other documents' gradients may move by this many ulps
    of the tensor's largest magnitude; outputs stay bit-identical."""
    name = "document_isolation"

    def tok(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[t.dim() - trailing :])

    seg = segments[which]
    new = {k: t.clone() for k, t in inputs.items()}
    for nm in q_names:
        if nm in new and seg.q.numel():
            flat = tok(new[nm])
            flat[seg.q] = _fresh(flat[seg.q], generator)
    for nm in k_names:
        if nm in new and seg.k.numel():
            flat = tok(new[nm])
            flat[seg.k] = _fresh(flat[seg.k], generator)
    second = run(new)
    others_q = torch.cat([s.q for i, s in enumerate(segments) if i != which] or [seg.q[:0]])
    others_k = torch.cat([s.k for i, s in enumerate(segments) if i != which] or [seg.k[:0]])
    for outs, idx in ((q_outputs, others_q), (k_outputs, others_k)):
        for nm in outs:
            if nm not in first or idx.numel() == 0:
                continue
            a = tok(first[nm])[idx]
            b = tok(second[nm])[idx]
            same, msg = bit_identical(nm, a, b)
            if not same and grad_ulps and nm.startswith("d") and a.is_floating_point():
                tol = grad_ulps * torch.finfo(a.dtype).eps * float(a.abs().max())
                both_finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
                same = both_finite and float((a.double() - b.double()).abs().max()) <= tol
                msg += f" (beyond {grad_ulps} ulps of max|{nm}| = {tol:.3g}, the non-deterministic backward's allowance)"
            if not same:
                return fail(
                    name,
                    f"{name}: perturbing document {which} changed other documents' {nm}: {msg}",
                )
    if seg.q.numel() and "out" in first:
        a = tok(first["out"])[seg.q]
        b = tok(second["out"])[seg.q]
        if bool((a == b).all()) and bool(a.ne(0).any()):
            return fail(name, f"{name}: perturbing document {which} left its own output unchanged")
    return ok(name, f"{name}: document {which} perturbed, {len(segments) - 1} others bit-identical")


def _fresh(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return (noise * 2.0 + 0.5).to(t.dtype)


@dataclass(frozen=True)
class EdgeProbe:
    """Query ``q`` (flat index) and the keys around one edge of its visible range: ``inside`` are
    visible (perturbing them must change the output), ``outside`` are not (must change nothing)."""

    q: int
    inside: tuple[int, ...]
    outside: tuple[int, ...]
    side: str  # "left" | "right"


def edge_probes(
    allowed: torch.Tensor,
    same_segment: torch.Tensor,
    q_flat: torch.Tensor,
    k_flat: torch.Tensor,
    rows: Sequence[tuple[int, int]],
    *,
    sides: Sequence[str] = ("left", "right"),
) -> list[EdgeProbe]:
    """Probes for query rows ``rows`` (``(batch, i)`` in the reference layout).

    ``allowed`` / ``same_segment``: bool ``[B', Tq', Tk']`` (the mask, and "same document, key valid");
    ``q_flat [B', Tq']`` / ``k_flat [B', Tk']`` map reference positions to flat backend indices. An
    edge is probed when the keys just beyond it are in the query's own document (so only the
    causal/window mask hides them).
    """
    probes = []
    for b, i in rows:
        ab = allowed[min(b, allowed.shape[0] - 1), i]
        seg = same_segment[min(b, same_segment.shape[0] - 1), i]
        vis = ab.nonzero().flatten().tolist()
        if not vis:
            continue
        lo, hi = vis[0], vis[-1]
        for side in sides:
            if side == "left":
                inside = [j for j in (lo, lo + 1) if j <= hi and bool(ab[j])]
                outside = [j for j in (lo - 1, lo - 2) if j >= 0 and bool(seg[j]) and not bool(ab[j])]
            else:
                inside = [j for j in (hi, hi - 1) if j >= lo and bool(ab[j])]
                outside = [j for j in (hi + 1, hi + 2) if j < ab.numel() and bool(seg[j]) and not bool(ab[j])]
            if inside and outside:
                probes.append(
                    EdgeProbe(
                        int(q_flat[b, i]),
                        tuple(int(k_flat[b, j]) for j in inside),
                        tuple(int(k_flat[b, j]) for j in outside),
                        side,
                    )
                )
    return probes


def check_edges(
    name: str,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    inputs: dict[str, torch.Tensor],
    probes: Sequence[EdgeProbe],
    base_out: torch.Tensor,
    generator: torch.Generator,
) -> CheckResult:
    """For each probe: perturbing an outside key (k and v) leaves that query's output bit-identical;
    perturbing an inside key changes it."""
    if not probes:
        return ok(name, f"{name}: no edge inside the sequence to probe")
    lines = []
    for p in probes:
        base_row = base_out.reshape(-1, *base_out.shape[-2:])[p.q]
        for j, must_change in [(j, True) for j in p.inside] + [(j, False) for j in p.outside]:
            new = {k: t.clone() for k, t in inputs.items()}
            for nm in ("k", "v"):
                flat = new[nm].view(-1, *new[nm].shape[-2:])
                flat[j] = _fresh(flat[j : j + 1], generator)[0]
            row = forward(new).reshape(-1, *base_out.shape[-2:])[p.q]
            changed = not bool(((row == base_row) | (torch.isnan(row) & torch.isnan(base_row))).all())
            if changed != must_change:
                where = "inside" if must_change else "outside"
                effect = "did not change" if must_change else "changed"
                lines.append(
                    f"query {p.q}: perturbing key {j} just {where} the {p.side} edge {effect} its output"
                )
    if lines:
        return fail(
            name,
            f"{name}: " + "; ".join(lines[:4]) + (f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""),
        )
    n = sum(len(p.inside) + len(p.outside) for p in probes)
    return ok(name, f"{name}: {len(probes)} edge(s), {n} keys probed")
