"""The error budgets of ``docs/judging.md``, as arithmetic on tensors.

Softmax attention (flash-attention 3/4's rule). Three results per case: ``ref`` (float64, from
``reference/``), ``low`` (plain PyTorch math in the case dtype: the error the dtype alone causes) and
``out`` (the backend). Element-wise maxima over the tensor::

    pass  iff  max|out − ref| ≤ k · max|low − ref| + atol,     k = 2,
               atol = 2 · max|(ref + 0.3 − 0.3) − ref|          computed in the case dtype

Second, tighter check (PyTorch FlexAttention's tests): mean absolute errors,
``mean|out − ref| ≤ fudge · mean|low − ref|`` with ``fudge = 1.1`` for fp16/bf16 and ``10`` for
fp32/fp64 (FlexAttention's own fp32 factor), plus a floor of ``0.1 · eps(dtype) · mean|ref|`` so that
two exact results (``0 ≤ 0``) and float64 round-off do not decide a verdict.

Recurrent ops (flash-linear-attention's rule): relative RMS ``rms(out − ref) / rms(ref)`` below a
per-tensor budget (output and state 5e-3, dq/dk/dv 8e-3, dβ/dg 2e-2 in bf16/fp16; CP 3e-3).

Absolute floor (our addition, for two situations the rule above was not built for): every
threshold also holds at least ``F · eps(acc) · S`` with ``F = 32`` ulps, ``acc`` the accumulation
precision of kernels (float32 for fp16/bf16/fp32 inputs, float64 for float64) and ``S`` the scale of
the judged quantity (``max|ref|`` of an output; the largest ``max|ref|`` among a case's gradients
for a gradient). (1) Degenerate tensors: with a window of one key, ``dq`` and ``dk`` are
mathematically zero, the plain baseline computes exactly zero, and a flash-style backward
(``P = exp(s − lse)`` recomputed) leaves ~1e-6 of round-off — a budget of ``2 · 0 + 2 · |ref|`` would
fail every correct kernel. (2) fp32/fp64, where the baseline has the kernels' own internal precision
and a different summation order alone costs 3–10 ulps (measured on the torch backend: at most
9.5 ulps of ``S``). For fp16/bf16 the floor is ~2^-15 of the dtype's own unit round-off and changes
no non-degenerate verdict; a precision bug (an fp32 kernel accumulating in bf16) is 2^16 ulps off.

Rounded-float32 check (our addition, half precision only): the budgets above compare a backend with
``low``, plain PyTorch in the case dtype. A backend that drops the float32 upcast the API promises
(softmax statistics, exponentials or the accumulation kept in bf16/fp16) *is* that plain computation,
so it passes them. The promise is sharper: the half-precision result is the float32 computation rounded
to the output dtype once. With ``r = ref`` rounded to float32 and then to the case dtype (the correctly
rounded result)::

    pass  iff  mean|out − r| ≤ R · mean|r − ref| + floor,     R = 1.75,

``mean|r − ref|`` being the mean error of the one final rounding itself and ``floor`` the absolute
floor above at the scale of a mean (``F · eps(float32) · mean|ref|``: 2% of the rounding's own error
in fp16, 0.3% in bf16). Measured on CPU (bf16 and fp16, D 64–256, T 50–511,
mean|out − r| in units of mean|r − ref|): the torch backend 0.74–0.99, a flash-style kernel (float32
scores and softmax, P rounded to the dtype before the P·V product) 1.04–1.16, the same computation kept
in the dtype (``low``) 2.28–3.03. It applies to attention outputs of the softmax families with at least
256 entries, and (``R = 0.25``) to RoPE inside the modules (``rope.q`` / ``rope.k``, the module's
RoPE on its half-precision q/k against the same RoPE evaluated in float64 on the same values: a
float32 rotation rounded once measures 0.0, one kept in bf16/fp16 0.7–1.2, while whole-module budgets
see neither); gradients keep the budgets above (the torch backend's own CPU ``dk``/``dv`` measure up to
2.2 there, a flash-style backward 1.2–1.5, so no factor separates them from ``low`` at 3.1–3.9 with a
margin).

A NaN or Inf in ``out`` (or anywhere ``ref`` is finite) fails every budget, whatever the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

K_FACTOR = 2.0  # FA3/FA4: 2x the low-precision baseline error, for the output and for dq, dk, dv
ATOL_SHIFT = 0.3  # atol = 2 * max|(ref + 0.3 - 0.3) - ref| in the case dtype
HALF_DTYPES = (torch.float16, torch.bfloat16)

# FlexAttention's fudge factors for the mean-absolute-error check
MEAN_FUDGE_HALF = 1.1
MEAN_FUDGE_FULL = 10.0
MEAN_FLOOR = 0.1  # times eps(dtype) * mean|ref|
ATOL_FLOOR_ULPS = 32.0  # times eps(accumulation dtype) * scale of the judged quantity
ROUNDED_K = 1.75  # rounded-float32 check: mean|out - r| <= ROUNDED_K * mean|r - ref| (+ floor)
ROUNDED_K_ELEMENTWISE = 0.25  # the same for one element-wise op (RoPE): float32 then one rounding is exact

# flash-linear-attention's relative-RMS budgets (bf16/fp16, against a float32 token-by-token
# reference; we use our float64 reference). Keys are tensor names used by the GDN family.
GDN_BUDGETS_HALF: dict[str, float] = {
    "o": 5e-3,
    "final_state": 5e-3,
    "dq": 8e-3,
    "dk": 8e-3,
    "dv": 8e-3,
    "dbeta": 2e-2,
    "dg": 2e-2,
    "dh0": 8e-3,
    "cp": 3e-3,
}
# fp32 / fp64: the same budgets scaled by the ratio of the unit round-offs, with a 2^6 safety factor
# for the chunked algorithm's longer accumulation chains (fla publishes no fp32 budget).
_FP_SCALE = {
    torch.float32: (torch.finfo(torch.float32).eps / torch.finfo(torch.bfloat16).eps) * 64,
    torch.float64: (torch.finfo(torch.float64).eps / torch.finfo(torch.bfloat16).eps) * 2**20,
}


def gdn_budget(name: str, dtype: torch.dtype) -> float:
    """Relative-RMS budget for GDN tensor ``name`` (``o``, ``final_state``, ``dq``, ..., ``cp``)."""
    key = name if name in GDN_BUDGETS_HALF else ("dbeta" if name in ("dbeta", "dg", "da") else "dq")
    base = GDN_BUDGETS_HALF[key]
    return base if dtype in HALF_DTYPES else base * _FP_SCALE.get(dtype, 1.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def atol_floor(dtype: torch.dtype, scale: float) -> float:
    """``F · eps(acc) · scale`` (module docstring)."""
    return ATOL_FLOOR_ULPS * torch.finfo(accumulation_dtype(dtype)).eps * scale


def mean_fudge(dtype: torch.dtype) -> float:
    return MEAN_FUDGE_HALF if dtype in HALF_DTYPES else MEAN_FUDGE_FULL


@dataclass(frozen=True)
class Verdict:
    """One tensor judged against one budget.

    ``err`` the measured error of ``out``; ``baseline_err`` the same measure for ``low`` (``None`` for
    budgets without a baseline); ``ratio = err / baseline_err``; ``threshold`` the bound ``err`` must
    not exceed; ``margin = threshold − err`` (negative when failing); ``budget_ratio = err / threshold``
    (what the report's matrix shows, ``> 1`` means failing).
    """

    name: str
    passed: bool
    err: float
    baseline_err: float | None
    threshold: float
    message: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_err is None:
            return None
        if self.baseline_err == 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return self.err / self.baseline_err

    @property
    def margin(self) -> float:
        return self.threshold - self.err

    @property
    def budget_ratio(self) -> float:
        if math.isnan(self.err):
            return math.inf
        if self.threshold <= 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return self.err / self.threshold


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


def measured_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """``2 · max|(ref + 0.3 − 0.3) − ref|`` with ``ref`` rounded to and the arithmetic done in ``dtype``.

    Non-finite entries of ``ref`` (``lse = −inf`` of empty rows) are left out.
    """
    r = ref.detach().to(dtype)
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        r = r[finite]
    if r.numel() == 0:
        return 0.0
    return 2.0 * float(((r + ATOL_SHIFT) - ATOL_SHIFT - r).abs().max())


def nonfinite_problem(name: str, out: torch.Tensor, ref: torch.Tensor | None = None) -> str | None:
    """Text describing NaN / Inf in ``out`` where ``ref`` is finite (or mismatched infinities), else None.

    ``ref = -inf`` (a row without visible keys) requires ``out = -inf`` at the same place.
    """
    o = out.detach().cpu()
    if ref is None:
        bad = ~torch.isfinite(o)
        if bool(bad.any()):
            n_nan = int(torch.isnan(o).sum())
            return f"{name} has {n_nan} NaN and {int(bad.sum()) - n_nan} Inf of {o.numel()} entries"
        return None
    r = ref.detach().cpu()
    if o.shape != r.shape:
        return f"{name} has shape {tuple(o.shape)}, the reference {tuple(r.shape)}"
    finite_ref = torch.isfinite(r)
    bad = finite_ref & ~torch.isfinite(o)
    if bool(bad.any()):
        n_nan = int((bad & torch.isnan(o)).sum())
        return f"{name} has {n_nan} NaN and {int(bad.sum()) - n_nan} Inf where the reference is finite"
    inf_ref = ~finite_ref
    if bool(inf_ref.any()):
        mismatch = inf_ref & (o.double() != r)
        if bool(mismatch.any()):
            idx = tuple(int(i) for i in mismatch.nonzero()[0])
            return (
                f"{name} is {float(o[idx])} at {idx} where the reference is {float(r[idx])} "
                f"({int(mismatch.sum())} such entries; a row without visible keys must give lse = -inf)"
            )
    return None


def _finite_pair(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` and ``ref`` (float64) where ``ref`` is finite (no copy when it is finite everywhere)."""
    o, r = _f64(out), _f64(ref)
    keep = torch.isfinite(r)
    if bool(keep.all()):
        return o, r
    return o[keep], r[keep]


def ref_scale(ref: torch.Tensor) -> float:
    """``max|ref|`` over the finite entries (0 for an empty tensor)."""
    r = _f64(ref)
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        r = r[finite]
    return float(r.abs().max()) if r.numel() else 0.0


def max_error_budget(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    low: torch.Tensor,
    dtype: torch.dtype,
    k: float = K_FACTOR,
    scale: float | None = None,
) -> Verdict:
    """FA3/FA4 rule: ``max|out − ref| ≤ k · max|low − ref| + atol``, ``atol`` at least the floor
    at ``scale`` (default ``max|ref|``) (module docstring)."""
    problem = nonfinite_problem(name, out, ref)
    if problem is not None:
        return Verdict(name, False, math.nan, None, math.nan, problem)
    o, r = _finite_pair(out, ref)
    lo, _ = _finite_pair(low, ref)
    if o.numel() == 0:
        return Verdict(name, True, 0.0, 0.0, 0.0, f"{name}: no finite entries to compare")
    err = float((o - r).abs().max())
    base = float((lo - r).abs().max())
    atol = max(measured_atol(ref, dtype), atol_floor(dtype, ref_scale(ref) if scale is None else scale))
    threshold = k * base + atol
    passed = err <= threshold
    msg = (
        f"{name}: max|out-ref| = {err:.3e} vs budget {threshold:.3e} "
        f"(= {k:g} x low-precision error {base:.3e} + atol {atol:.3e}); ratio to baseline "
        f"{(err / base if base else math.inf) if err else 0.0:.2f}"
    )
    return Verdict(name, passed, err, base, threshold, msg)


def mean_error_budget(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    low: torch.Tensor,
    dtype: torch.dtype,
    scale: float | None = None,
    fudge: float | None = None,
) -> Verdict:
    """FlexAttention rule: ``mean|out − ref| ≤ fudge · mean|low − ref|`` (+ the round-off floors).

    ``fudge`` defaults to :func:`mean_fudge` of ``dtype``.
    """
    check = f"{name}.mean"
    problem = nonfinite_problem(name, out, ref)
    if problem is not None:
        return Verdict(check, False, math.nan, None, math.nan, problem)
    o, r = _finite_pair(out, ref)
    lo, _ = _finite_pair(low, ref)
    if o.numel() == 0:
        return Verdict(check, True, 0.0, 0.0, 0.0, f"{check}: no finite entries to compare")
    err = float((o - r).abs().mean())
    base = float((lo - r).abs().mean())
    fudge = mean_fudge(dtype) if fudge is None else fudge
    floor = max(
        MEAN_FLOOR * torch.finfo(dtype).eps * float(r.abs().mean()),
        atol_floor(dtype, ref_scale(ref) if scale is None else scale),
    )
    threshold = fudge * base + floor
    passed = err <= threshold
    msg = f"{check}: mean|out-ref| = {err:.3e} vs {fudge:g} x mean|low-ref| {base:.3e} (+ floor {floor:.1e})"
    return Verdict(check, passed, err, base, threshold, msg)


def rounded_fp32_budget(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    scale: float | None = None,
    k: float = ROUNDED_K,
) -> Verdict:
    """Rounded-float32 rule (half precision; module docstring): ``mean|out − r| ≤ k · mean|r − ref| +
    floor`` with ``r`` = ``ref`` rounded to float32, then to ``dtype``; check name ``{name}.rounded_fp32``.
    ``k``: :data:`ROUNDED_K` for attention outputs, :data:`ROUNDED_K_ELEMENTWISE` for one element-wise op."""
    check = f"{name}.rounded_fp32"
    problem = nonfinite_problem(name, out, ref)
    if problem is not None:
        return Verdict(check, False, math.nan, None, math.nan, problem)
    o, r = _finite_pair(out, ref)
    if o.numel() == 0:
        return Verdict(check, True, 0.0, 0.0, 0.0, f"{check}: no finite entries to compare")
    rounded = r.to(torch.float32).to(dtype).to(torch.float64)
    err = float((o - rounded).abs().mean())
    base = float((rounded - r).abs().mean())
    floor = atol_floor(dtype, float(r.abs().mean()) if scale is None else scale)
    threshold = k * base + floor
    msg = (
        f"{check}: mean|out-r| = {err:.3e} vs {k:g} x the final rounding's own mean error "
        f"{base:.3e} (+ floor {floor:.1e}), r = the float32 computation rounded to {str(dtype)[6:]}: "
        f"{err / base if base else (math.inf if err else 0.0):.2f} roundings' worth"
    )
    return Verdict(check, err <= threshold, err, base, threshold, msg)


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``rms(out − ref) / rms(ref)`` (``0`` when both are zero, ``inf`` when only ``ref`` is)."""
    o, r = _f64(out), _f64(ref)
    num = float((o - r).pow(2).mean().sqrt())
    den = float(r.pow(2).mean().sqrt())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def rel_rms_budget(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    budget: float,
    low: torch.Tensor | None = None,
    k_low: float | None = None,
) -> Verdict:
    """flash-linear-attention rule: ``rms(out − ref) / rms(ref) < budget``.

    With ``k_low`` (whole layers, whose parameters and projections live in the case dtype, where
    fla's kernel budgets do not apply) the bound is ``max(budget, k_low · rel_rms(low))``: the
    "k times the dtype's own error" rule in fla's metric.
    """
    problem = nonfinite_problem(name, out, ref)
    if problem is not None:
        return Verdict(name, False, math.nan, None, budget, problem)
    err = rel_rms(out, ref)
    base = rel_rms(low, ref) if low is not None else None
    threshold = budget if (k_low is None or base is None) else max(budget, k_low * base)
    passed = err < threshold
    extra = f", low-precision baseline {base:.3e}" if base is not None else ""
    rule = f"budget {threshold:.1e}" + (f" (max of {budget:.1e} and {k_low:g} x baseline)" if k_low else "")
    msg = f"{name}: relative RMS error {err:.3e} vs {rule}{extra}"
    return Verdict(name, passed, err, base, threshold, msg)


def pairwise_budget(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    ref: torch.Tensor,
    low: torch.Tensor,
    dtype: torch.dtype,
    scale: float | None = None,
) -> Verdict:
    """Two backends agree with each other as well as one must agree with ``ref``:
    ``max|a − b| ≤ k · max|low − ref| + atol`` (a complement to, never a replacement for, ``ref``), with
    the atol floor at ``scale`` (default ``max|ref|``) exactly as :func:`max_error_budget` has it."""
    problem = nonfinite_problem(name, a, ref) or nonfinite_problem(name, b, ref)
    if problem is not None:
        return Verdict(name, False, math.nan, None, math.nan, problem)
    ao, r = _finite_pair(a, ref)
    bo, _ = _finite_pair(b, ref)
    lo, _ = _finite_pair(low, ref)
    if ao.numel() == 0:
        return Verdict(name, True, 0.0, 0.0, 0.0, f"{name}: no finite entries to compare")
    err = float((ao - bo).abs().max())
    base = float((lo - r).abs().max())
    floor = atol_floor(dtype, ref_scale(ref) if scale is None else scale)
    threshold = K_FACTOR * base + max(measured_atol(ref, dtype), floor)
    msg = f"{name}: max|a-b| = {err:.3e} vs budget {threshold:.3e}"
    return Verdict(name, err <= threshold, err, base, threshold, msg)
