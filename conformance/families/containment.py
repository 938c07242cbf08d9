"""``containment`` family: a NaN or Inf in one document (or one batch row) stays there.

A packed batch holds several documents (``cu_doc_lens``) and a padded batch several sequences (its
rows); one bad token — a NaN or an Inf in K or in V — must not reach the outputs or the input
gradients of any *other* document or row. A kernel that multiplies masked-out probabilities (exact
zeros) with the bad value, or adds a mask to a NaN score, spreads it: ``0 * NaN`` and ``0 * Inf`` are
NaN. Each case runs the backend's public attention op (``backend((q, k, v), cu_doc_lens=...)``,
forward and autograd backward) twice on the same inputs: clean, and with the bad value planted in
every head and channel of one token of K or V of one document (or row). For every other document
(row) it compares ``out`` and ``dq`` (its query rows) and ``dk``, ``dv`` (its key rows) with the clean
run: they must stay finite and equal — bit-identical, or within a few units in the last place of the
rows' scale for a backward that sums in a varying order (backends that claim a deterministic backward
are compared in deterministic mode). A failure names what leaked where, e.g. ``NaN in document 1
(token 4 of K) reached document 0 outputs (rows 0-9)``.

Variants ``{target}_{tensor}_{value}``: target ``documents`` (packed, needs the ``documents``
feature) or ``batch_rows`` (a dense batch of independent rows), tensor ``k`` or ``v``, value ``nan``
or ``inf``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from olmo_attn.backends.capabilities import Feature

from ..cases import Case, containment_variants
from ..checks import CheckResult, HarnessError, deterministic_mode, fail, ok
from ..results import RunContext
from ..subjects import Subject
from .softmax import _cu_tensor, _maxlen, backend_runner, draw_documents, draw_len, randn

VALUES = {"nan": math.nan, "inf": math.inf}
ULPS = 8  # allowed |difference| in units of eps * the rows' largest magnitude (reordered sums)

_WHAT = {"out": "outputs", "dq": "dQ", "dk": "dK", "dv": "dV"}


def variants() -> list[tuple[str, tuple[Feature, ...]]]:
    """``(variant, required features)`` for every point of the family (the case matrix's list)."""
    return containment_variants()


def _ranges(rows: list[int], limit: int = 8) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (the first ``limit`` runs, then a count)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        text += f", ... ({len(rows)} rows)"
    return text


def _layout(case: Case) -> dict[str, Any]:
    """Shapes, the groups (documents or rows) as flat token ranges, and where the bad value goes."""
    rng: np.random.Generator = case.rng()
    full = case.size == "full"
    target, tensor, value = case.variant.rsplit("_", 2)
    T = draw_len(rng, full)
    if target == "documents":
        B = int(rng.integers(1, 3))
        cu = draw_documents(rng, B, T)
        groups = [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
        unit = "document"
    elif target == "batch_rows":
        B = int(rng.integers(3, 5 if full else 4))
        cu = None
        groups = [(b * T, (b + 1) * T) for b in range(B)]
        unit = "batch row"
    else:
        raise ValueError(f"unknown containment variant {case.variant!r}")
    sized = [i for i, (a, b) in enumerate(groups) if b - a >= 2] or [
        i for i, (a, b) in enumerate(groups) if b > a
    ]
    bad = int(sized[int(rng.integers(0, len(sized)))])
    a, b = groups[bad]
    token = int(rng.integers(a, b))
    return dict(B=B, T=T, cu=cu, groups=groups, unit=unit, bad=bad, token=token, tensor=tensor, value=value)


def _compare(
    name: str, clean: torch.Tensor, poisoned: torch.Tensor, lay: dict[str, Any], dtype: torch.dtype
) -> tuple[list[str], list[str], float]:
    """Per other group: the rows that went non-finite, the rows that changed beyond tolerance."""
    flat_c = clean.reshape(lay["B"] * lay["T"], -1).to(torch.float64)
    flat_p = poisoned.reshape(lay["B"] * lay["T"], -1).to(torch.float64)
    eps = torch.finfo(dtype).eps
    leaked: list[str] = []
    changed: list[str] = []
    worst = 0.0
    unit = lay["unit"]
    # documents: rows of the packed (flattened) batch, as cu_doc_lens counts them; batch rows:
    # positions within the row
    packed = lay["cu"] is not None
    where = "rows" if packed else "positions"

    def base(start: int) -> int:
        return start if packed else 0

    for g, (a, b) in enumerate(lay["groups"]):
        if g == lay["bad"] or b <= a:
            continue
        c, p = flat_c[a:b], flat_p[a:b]
        nonfinite = (~torch.isfinite(p)).any(dim=-1)
        if nonfinite.any():
            rows = [base(a) + int(i) for i in torch.nonzero(nonfinite).flatten()]
            leaked.append(f"{unit} {g} {_WHAT[name]} ({where} {_ranges(rows)})")
            continue
        diff = (p - c).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        scale = float(c.abs().max()) if c.numel() else 0.0
        tol = ULPS * eps * max(scale, 1e-30)
        over = (diff > tol).any(dim=-1)
        if over.any():
            rows = [base(a) + int(i) for i in torch.nonzero(over).flatten()]
            changed.append(
                f"{unit} {g} {_WHAT[name]} ({where} {_ranges(rows)}; max |diff| {float(diff.max()):.3e} "
                f"> {tol:.3e})"
            )
    return leaked, changed, worst


def run_containment(
    case: Case, subject: Subject, ctx: RunContext
) -> tuple[list[CheckResult], dict[str, Any]]:
    lay = _layout(case)
    dtype, device = case.torch_dtype(), case.device
    B, T, D = lay["B"], lay["T"], int(case.param["head_dim"])
    H = 2
    gen = torch.Generator().manual_seed(case.seed)
    inputs = {
        "q": randn(gen, (B, T, H, D), dtype),
        "k": randn(gen, (B, T, H, D), dtype),
        "v": randn(gen, (B, T, H, D), dtype),
        "dout": randn(gen, (B, T, H, D), dtype),
    }
    poisoned = dict(inputs)
    planted = inputs[lay["tensor"]].clone()
    planted.view(B * T, H, D)[lay["token"]] = VALUES[lay["value"]]
    poisoned[lay["tensor"]] = planted
    call: dict[str, Any] = {}
    if lay["cu"] is not None:
        call = {"cu_doc_lens": _cu_tensor(lay["cu"], device), "max_doc_len": _maxlen(lay["cu"])}
    backend = subject.build_backend(
        head_dim=D, n_heads=H, n_kv_heads=H, scale=None, dropout_p=0.0, window_size=(-1, -1)
    )
    runner = backend_runner(backend, device, dtype, call)
    mode = deterministic_mode() if subject.spec.supports_deterministic(D) else contextlib.nullcontext()
    with mode:
        clean = runner.full(inputs)
        # (the poisoned run's inputs hold a NaN, which never compares equal to itself: only the clean
        # run says whether the backend writes into its inputs)
        violations = list(runner.violations)
        dirty = runner.full(poisoned)
    for n, t in clean.items():
        if not torch.isfinite(t).all():
            raise HarnessError(f"the clean run's {n} is not finite (the inputs are finite normals)")

    unit, bad = lay["unit"], lay["bad"]
    a, _b = lay["groups"][bad]
    value = "NaN" if lay["value"] == "nan" else "Inf"
    where = f", packed row {lay['token']}" if lay["cu"] is not None else ""
    source = f"{value} in {unit} {bad} (token {lay['token'] - a} of {lay['tensor'].upper()}{where})"
    checks: list[CheckResult] = []
    reached_own: dict[str, bool] = {}
    ga, gb = lay["groups"][bad]
    for name in ("out", "dq", "dk", "dv"):
        leaked, changed, worst = _compare(name, clean[name], dirty[name], lay, dtype)
        own = dirty[name].reshape(B * T, -1)[ga:gb]
        reached_own[name] = bool((~torch.isfinite(own)).any())
        check = f"containment.{name}"
        if leaked:
            checks.append(fail(check, f"{check}: {source} reached " + ", ".join(leaked)))
        elif changed:
            checks.append(fail(check, f"{check}: {source} changed " + ", ".join(changed)))
        elif worst == 0.0:
            checks.append(ok(check, f"{check}: other {unit}s' {_WHAT[name]} bit-identical to the clean run"))
        else:
            checks.append(
                ok(
                    check,
                    f"{check}: other {unit}s' {_WHAT[name]} finite, within {ULPS} ulps of the clean run "
                    f"(max |diff| {worst:.3e})",
                )
            )
    if violations:
        checks.append(fail("inputs_unchanged", "inputs_unchanged: " + violations[0]))
    info: dict[str, Any] = {
        "B": B,
        "T": T,
        "H": H,
        "D": D,
        "target": unit,
        "poisoned_group": bad,
        "poisoned_token": lay["token"],
        "tensor": lay["tensor"],
        "value": value,
        "reached_own_group": reached_own,
    }
    if lay["cu"] is not None:
        info["cu_doc_lens"] = lay["cu"]
    return checks, info
