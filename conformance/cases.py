"""The case matrix, generated from the capability table.

Every case is one (tier, family, backend, variant, dtype, parameters) point. Which points exist for
a backend is read from its :class:`~olmo_attn.backends.capabilities.BackendSpec` (features, dtypes,
head dims, devices, ring strategies) — there is no second list of what a backend supports. A backend
that cannot run here still gets its cases, marked ``skipped: <exact reason>``.

Families (what a case exercises):

==========  ===========================================================================================
``config``  configuration tier: availability, table consistency, configs, layouts (no numerics)
``attn``    ``backend((q, k, v), cu_doc_lens=...)``: the module-level path (always causal, the
            backend's window), forward + autograd backward
``kernel``  ``backend.kernel()``: ``(out, lse)`` forward and flash-style backward; non-causal,
            two-sided windows, varlen documents, separate q/k segmentations (empty rows included)
``packed``  packed ``[B, T, 3, H, D]`` QKV through the backend
``dropout`` seeded keep masks (``olmo_attn.ops.dropout.keep_mask``) and dropout-off-in-eval
``kvcache`` prefill (with left padding) and decode steps through a ``KVCacheManager``
``module``  ``Attention`` / ``FusedAttention`` / ``NormalizedAttention`` against
            ``reference.modules`` (gates, RoPE variants and scalings, QK-norms, clip_qkv, ...)
``gdn``     Gated DeltaNet: the gated delta rule and the layer against ``reference.gated_deltanet``
``cp``      context parallelism in W worker processes (gloo on CPU, NCCL on GPUs)
==========  ===========================================================================================

``containment`` (cpu and gpu tiers): a NaN or Inf planted in one token of K or V of one document (or
one batch row) must not reach the other documents' (rows') outputs or input gradients.

Shapes are drawn per case from a seed derived from the case id (without the backend, so every
backend of a pairwise comparison sees the same inputs); ``--quick`` draws small shapes and keeps a
covering subset of the points, ``--full`` keeps every point and draws larger, awkward shapes.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from olmo_attn.backends.capabilities import Feature

from .subjects import Subject, all_subjects, gdn_unavailable_reason

TIERS: tuple[str, ...] = ("config", "cpu", "multiproc", "gpu", "multigpu")  # cheapest first
TIER_DEVICE = {"config": "cpu", "cpu": "cpu", "multiproc": "cpu", "gpu": "cuda", "multigpu": "cuda"}

HEAD_DIMS = (64, 128, 256)
GQA = ("mha", "gqa4", "mqa")
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CP_WORLD_SIZES = (2, 4)

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def dtype_from_name(name: str) -> torch.dtype:
    return {v: k for k, v in _DTYPE_NAMES.items()}[name]


@dataclass(frozen=True)
class Case:
    """One conformance case.

    ``id`` is stable across runs and machines: ``tier/family/backend/variant[/dtype][/params...]``;
    ``-k`` filters and JUnit names use it. ``features`` are the matrix columns the case counts for.
    """

    tier: str
    family: str
    backend: str
    variant: str
    dtype: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    features: tuple[str, ...] = ()
    size: str = "quick"  # "quick" (small shapes) | "full"
    base_seed: int = 0
    skip_reason: str | None = None

    @property
    def device(self) -> str:
        return TIER_DEVICE[self.tier]

    @property
    def param(self) -> dict[str, Any]:
        return dict(self.params)

    def _parts(self, with_backend: bool) -> list[str]:
        parts = [self.tier, self.family]
        if with_backend:
            parts.append(self.backend)
        parts.append(self.variant)
        if self.dtype:
            parts.append(self.dtype)
        for k, v in self.params:
            parts.append(_param_text(k, v))
        return parts

    @property
    def id(self) -> str:
        return "/".join(self._parts(True))

    @property
    def problem_key(self) -> str:
        """The id without the backend: cases with equal keys solve the same problem (pairwise)."""
        return "/".join(self._parts(False))

    @property
    def seed(self) -> int:
        """Input seed: a function of the problem (not the backend) and ``--seed``."""
        return (zlib.crc32(self.problem_key.encode()) ^ (self.base_seed * 0x9E3779B1)) & 0x7FFFFFFF

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            raise ValueError(f"case {self.id} has no dtype")
        return dtype_from_name(self.dtype)


def _param_text(k: str, v: Any) -> str:
    if k == "head_dim":
        return f"d{v}"
    if k == "world":
        return f"w{v}"
    if k == "gqa":
        return str(v)
    return f"{k}={v}"


# ------------------------------------------------------------------------------------------ axes


def _dtypes(subject: Subject, device: str) -> list[torch.dtype]:
    order = CPU_DTYPES if device == "cpu" else GPU_DTYPES
    return [d for d in order if d in subject.spec.dtypes]


def _head_dims(subject: Subject) -> list[int]:
    s = subject.spec
    return [d for d in HEAD_DIMS if d <= s.head_dim_max and d % s.head_dim_multiple == 0]


def _gqa(subject: Subject) -> list[str]:
    return list(GQA) if Feature.gqa in subject.spec.features else ["mha"]


def _has(subject: Subject, *features: Feature) -> bool:
    return all(f in subject.spec.features for f in features)


# (variant, required features, matrix columns)
ATTN_VARIANTS: tuple[tuple[str, tuple[Feature, ...], tuple[str, ...]], ...] = (
    ("causal", (Feature.causal,), ("causal",)),
    ("window", (Feature.causal, Feature.sliding_window), ("sliding_window",)),
    ("documents", (Feature.causal, Feature.documents), ("documents",)),
    (
        "window_documents",
        (Feature.sliding_window, Feature.documents, Feature.documents_window),
        ("sliding_window", "documents"),
    ),
    ("documents_qk", (Feature.documents_qk,), ("documents_qk",)),
)
KERNEL_VARIANTS: tuple[tuple[str, tuple[Feature, ...], tuple[str, ...]], ...] = (
    ("non_causal", (Feature.lse, Feature.non_causal), ("non_causal", "lse")),
    ("causal", (Feature.lse, Feature.causal), ("causal", "lse")),
    ("window", (Feature.lse, Feature.sliding_window), ("sliding_window", "lse")),
    (
        "window_bidir",
        (Feature.lse, Feature.sliding_window, Feature.non_causal),
        ("sliding_window", "non_causal", "lse"),
    ),
    ("varlen", (Feature.lse, Feature.documents), ("documents", "lse")),
    (
        "varlen_window",
        (Feature.lse, Feature.documents, Feature.sliding_window, Feature.documents_window),
        ("documents", "sliding_window", "lse"),
    ),
    ("varlen_qk", (Feature.lse, Feature.documents_qk), ("documents_qk", "lse")),
)
PACKED_VARIANTS: tuple[tuple[str, tuple[Feature, ...], tuple[str, ...]], ...] = (
    ("causal", (Feature.packed_qkv,), ("packed_qkv",)),
    ("window", (Feature.packed_qkv, Feature.sliding_window), ("packed_qkv", "sliding_window")),
    ("documents", (Feature.packed_qkv, Feature.documents), ("packed_qkv", "documents")),
)
DROPOUT_VARIANTS: tuple[tuple[str, tuple[Feature, ...], tuple[str, ...]], ...] = (
    ("keep_mask", (Feature.dropout, Feature.lse), ("dropout",)),
    ("keep_mask_varlen", (Feature.dropout, Feature.lse, Feature.documents), ("dropout", "documents")),
    ("eval_off", (Feature.dropout,), ("dropout",)),
)
KVCACHE_VARIANTS: tuple[tuple[str, tuple[Feature, ...], tuple[str, ...]], ...] = (
    ("decode", (Feature.kv_cache,), ("kv_cache",)),
    ("leftpad", (Feature.kv_cache, Feature.kv_cache_leftpad), ("kv_cache", "kv_cache_leftpad")),
    ("window", (Feature.kv_cache, Feature.sliding_window), ("kv_cache", "sliding_window")),
)
# module-level variants: (variant, required backend features, matrix columns)
MODULE_VARIANTS: tuple[tuple[str, tuple[Feature, ...], tuple[str, ...]], ...] = (
    ("plain", (), ("module",)),
    ("gqa", (Feature.gqa,), ("module", "gqa")),
    ("mqa", (Feature.gqa,), ("module", "gqa")),
    ("bias_free", (), ("module",)),
    ("softmax_scale", (Feature.custom_scale,), ("module",)),
    ("gate_headwise", (), ("gate",)),
    ("gate_elementwise", (), ("gate",)),
    ("gate_half_sigmoid", (), ("gate",)),
    ("gate_documents", (Feature.documents,), ("gate", "documents")),
    ("rope_default", (), ("rope",)),
    ("rope_complex", (), ("rope",)),
    ("rope_partial", (), ("rope",)),
    ("rope_abf", (), ("rope",)),
    ("rope_pi", (), ("rope",)),
    ("rope_stepwise", (), ("rope",)),
    ("rope_yarn", (), ("rope",)),
    ("rope_documents", (Feature.documents,), ("rope", "documents")),
    ("qk_norm_layer", (), ("qk_norm",)),
    ("qk_norm_rms", (), ("qk_norm",)),
    ("qk_norm_qwen", (), ("qk_norm",)),
    ("qk_norm_l2", (), ("qk_norm",)),
    ("qk_norm_per_head", (), ("qk_norm",)),
    ("clip_qkv", (), ("clip_qkv",)),
    ("window", (Feature.sliding_window,), ("module", "sliding_window")),
    (
        "everything",
        (Feature.gqa, Feature.sliding_window, Feature.documents, Feature.documents_window),
        ("gate", "rope", "qk_norm", "clip_qkv"),
    ),
    ("fused", (Feature.packed_qkv,), ("fused",)),
    ("fused_rope", (Feature.packed_qkv,), ("fused", "rope")),
    ("fused_documents", (Feature.packed_qkv, Feature.documents), ("fused", "documents")),
    ("normalized", (), ("normalized",)),
    ("normalized_rope", (), ("normalized", "rope")),
    ("kvcache_generate", (Feature.kv_cache, Feature.kv_cache_leftpad), ("kv_cache", "rope")),
)
GDN_VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rule", ("gdn",)),
    ("rule_gva", ("gdn",)),
    ("rule_state", ("gdn",)),
    ("rule_varlen", ("gdn", "documents")),
    ("layer", ("gdn",)),
    ("layer_varlen", ("gdn", "documents")),
    ("decode", ("gdn", "gdn_decode")),
)
# context parallelism: (variant, style, balancer, mask)
CP_MASKS = ("causal", "window", "documents", "window_documents")
CP_STYLES = (("ring", "zig_zag"), ("ring", "llama3"), ("ulysses", "ulysses"))


@dataclass
class _Point:
    family: str
    variant: str
    dtype: torch.dtype | None
    params: dict[str, Any]
    features: tuple[str, ...]
    per_variant: tuple[str, ...] = ()  # axes that --quick covers for every variant
    group: str | None = None  # --quick covers the other axes' values once per group (None: per family)


def _attn_like(
    family: str,
    variants: Sequence[tuple[str, tuple[Feature, ...], tuple[str, ...]]],
    subject: Subject,
    device: str,
    *,
    head_dims: Sequence[int] | None = None,
    gqa: Sequence[str] | None = None,
) -> list[_Point]:
    points = []
    hds = list(head_dims) if head_dims is not None else _head_dims(subject)
    gqas = list(gqa) if gqa is not None else _gqa(subject)
    for variant, needs, cols in variants:
        if not _has(subject, *needs):
            continue
        for dtype, hd, g in itertools.product(_dtypes(subject, device), hds, gqas):
            feats = cols + (("gqa",) if g != "mha" else ())
            points.append(_Point(family, variant, dtype, {"head_dim": hd, "gqa": g}, feats, ("gqa",)))
    return points


def _module_points(subject: Subject, device: str) -> list[_Point]:
    points = []
    for variant, needs, cols in MODULE_VARIANTS:
        if not _has(subject, *needs):
            continue
        for dtype in _dtypes(subject, device):
            points.append(_Point("module", variant, dtype, {}, cols))
    return points


def _gdn_points(device: str) -> list[_Point]:
    dtypes = (*CPU_DTYPES[:2], torch.float64) if device == "cpu" else (torch.bfloat16, torch.float32)
    return [_Point("gdn", variant, dtype, {}, cols) for variant, cols in GDN_VARIANTS for dtype in dtypes]


GDN_IMPLS = ("torch", "triton", "fla")  # Gated DeltaNet implementations (matrix rows)


def _gdn_cases(tier: str, rows: Sequence[str], quick: bool, size: str, seed: int) -> list[Case]:
    device = TIER_DEVICE[tier]
    out = []
    for impl in rows:
        if impl == "fla" and device == "cpu":
            continue  # fla's kernels are Triton (CUDA only): no CPU cases, not a skip
        points = _gdn_points(device)
        if quick:
            points = _quick_subset(points)
        reason = gdn_unavailable_reason(impl, device)
        out += [
            Case(tier, "gdn", impl, p.variant, _DTYPE_NAMES[p.dtype], (), p.features, size, seed, reason)
            for p in points
        ]
    return out


def _cp_points(subject: Subject, device: str) -> list[_Point]:
    points = []
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in subject.spec.dtypes:
        dtype = next(iter(_dtypes(subject, device)), None)
    if dtype is None:
        return []
    for (style, balancer), mask, world in itertools.product(CP_STYLES, CP_MASKS, CP_WORLD_SIZES):
        feature = Feature.ring_cp if style == "ring" else Feature.ulysses_cp
        if feature not in subject.spec.features:
            continue
        if style == "ring" and balancer not in subject.spec.ring_strategies:
            continue
        if "window" in mask and Feature.sliding_window not in subject.spec.features:
            continue
        if "documents" in mask and Feature.documents not in subject.spec.features:
            continue
        if mask == "window_documents" and Feature.documents_window not in subject.spec.features:
            continue
        cols = (
            (feature.value,)
            + (("sliding_window",) if "window" in mask else ())
            + (("documents",) if "documents" in mask else ())
        )
        # --quick: every style x balancer x mask at one world size, both world sizes for every style
        points.append(
            _Point(
                "cp", f"{style}_{balancer}_{mask}", dtype, {"world": world}, cols, group=f"{style}_{balancer}"
            )
        )
    # module-level CP: Attention with per-document RoPE, and Gated DeltaNet under Ulysses
    for style, balancer in CP_STYLES:
        feature = Feature.ring_cp if style == "ring" else Feature.ulysses_cp
        if feature not in subject.spec.features or not _has(subject, Feature.documents):
            continue
        if style == "ring" and balancer not in subject.spec.ring_strategies:
            continue
        points.append(
            _Point("cp", f"module_{style}_{balancer}", dtype, {"world": 2}, (feature.value, "module", "rope"))
        )
    if subject.name == "torch":
        points.append(_Point("cp", "gdn_ulysses", dtype, {"world": 2}, ("ulysses_cp", "gdn")))
    return points


# the containment family's axes (conformance/families/containment.py reads the variant names; the
# matrix owns the list, so that it imports no family; the family reads it from here)
CONTAINMENT_TARGETS = ("documents", "batch_rows")
CONTAINMENT_TENSORS = ("k", "v")
CONTAINMENT_VALUES = ("nan", "inf")


def containment_variants() -> list[tuple[str, tuple[Feature, ...]]]:
    """``(variant, required features)`` of the containment family: ``{target}_{tensor}_{value}``."""
    return [
        (f"{target}_{tensor}_{value}", (Feature.documents,) if target == "documents" else ())
        for target in CONTAINMENT_TARGETS
        for tensor in CONTAINMENT_TENSORS
        for value in CONTAINMENT_VALUES
    ]


def _containment_points(subject: Subject, device: str) -> list[_Point]:
    """One dtype (float32 on CPU, bfloat16 on GPUs where supported), the smallest head dim, MHA."""
    dtypes = _dtypes(subject, device)
    preferred = torch.float32 if device == "cpu" else torch.bfloat16
    dtype = preferred if preferred in dtypes else next(iter(dtypes), None)
    hds = _head_dims(subject)
    if dtype is None or not hds:
        return []
    return [
        _Point("containment", variant, dtype, {"head_dim": hds[0]}, ("containment",))
        for variant, needs in containment_variants()
        if _has(subject, *needs)
    ]


CONFIG_BACKEND_VARIANTS = ("availability", "table")
CONFIG_LIBRARY_VARIANTS = (
    "window_for_layer",
    "attention_num_params",
    "gdn_num_params",
    "config_roundtrip",
    "input_errors",
    "balancers",
    "state_dict_keys",
    "normalized_attention",
)
LIBRARY_ROW = "library"  # matrix row of the configuration checks that belong to no backend


def _points_for(subject: Subject, tier: str) -> list[_Point]:
    device = TIER_DEVICE[tier]
    if tier == "config":
        return [
            _Point("config", v, None, {}, (v if v == "table" else "available",))
            for v in CONFIG_BACKEND_VARIANTS
        ]
    if tier in ("cpu", "gpu"):
        if device not in subject.spec.devices:
            return []
        pts = _attn_like("attn", ATTN_VARIANTS, subject, device)
        pts += _attn_like("kernel", KERNEL_VARIANTS, subject, device)
        pts += _attn_like("packed", PACKED_VARIANTS, subject, device, gqa=["mha"])
        pts += _attn_like("dropout", DROPOUT_VARIANTS, subject, device, head_dims=_head_dims(subject)[:1])
        pts += _attn_like("kvcache", KVCACHE_VARIANTS, subject, device)
        pts += _module_points(subject, device)
        pts += _containment_points(subject, device)
        return pts
    if tier in ("multiproc", "multigpu"):
        if device not in subject.spec.devices:
            return []
        return _cp_points(subject, device)
    raise ValueError(f"unknown tier {tier!r}; choose among {TIERS}")


def _point_key(p: _Point) -> tuple:
    return (p.family, p.variant, p.dtype, tuple(sorted(p.params.items())))


# --quick covers every (dtype, value) pair of these axes somewhere in each family: a kernel's fast path
# is often chosen by dtype and head layout together (a GQA shortcut wrong only in float16)
PAIRED_WITH_DTYPE = ("gqa",)


def _quick_subset(points: list[_Point], prefer: set[tuple] | None = None) -> list[_Point]:
    """Greedy covering: every variant, every per-variant axis value within each variant, every
    value of the other axes somewhere in the family, and every pair of a dtype with a value of an axis
    in :data:`PAIRED_WITH_DTYPE` somewhere in the family, with as few points as that takes.

    Points in ``prefer`` (those earlier backends of the tier chose) are tried first, so backends
    share problems and the pairwise comparison has something to compare."""
    chosen: list[_Point] = []
    by_family: dict[str, list[_Point]] = {}
    for p in points:
        by_family.setdefault(p.family, []).append(p)
    for fam_points in by_family.values():
        variants = list(dict.fromkeys(p.variant for p in fam_points))
        need: set[tuple] = set()

        def reqs(p: _Point) -> set[tuple]:
            r = {("variant", p.variant)}
            r.add(("dtype", p.dtype))
            for k, v in p.params.items():
                r.add((p.variant, k, v) if k in p.per_variant else (p.group, k, v))
                if k in PAIRED_WITH_DTYPE:  # a fast path wrong for one dtype and one layout only
                    r.add(("dtype x", k, p.dtype, v))
            return r

        for p in fam_points:
            need |= reqs(p)
        # rotate each variant's points so that different variants start with different axis values
        ordered: list[_Point] = []
        for vi, v in enumerate(variants):
            vp = [p for p in fam_points if p.variant == v]
            shift = (vi * 5) % len(vp)
            vp = vp[shift:] + vp[:shift]
            if prefer:
                vp.sort(key=lambda p: _point_key(p) not in prefer)  # stable: preferred first
            ordered += vp
        for p in ordered:
            r = reqs(p)
            if r & need:
                chosen.append(p)
                need -= r
    return chosen


def build_cases(
    *,
    tiers: Iterable[str] = ("config", "cpu"),
    backends: Iterable[str] | None = None,
    quick: bool = True,
    seed: int = 0,
    pattern: str | None = None,
    subjects: Sequence[Subject] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[Case]:
    """The case list for ``tiers`` (cheapest first) and ``backends`` (default: every subject).

    ``shard=(i, n)`` keeps shard ``i`` of ``n`` (1-based): the cases whose problem hashes to it, so
    every backend's case of one problem lands in the same shard and pairwise checks still run.
    """
    unknown_tiers = sorted(set(tiers) - set(TIERS))
    if unknown_tiers:
        raise ValueError(f"unknown tier(s) {unknown_tiers}; choose among {', '.join(TIERS)}")
    tiers = [t for t in TIERS if t in set(tiers)]
    pool = list(subjects) if subjects is not None else all_subjects()
    gdn_rows = list(GDN_IMPLS)
    if backends is not None:
        wanted = list(backends)
        names = {s.name for s in pool} | set(GDN_IMPLS)
        unknown = [b for b in wanted if b not in names]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; choose among {sorted(names)}")
        pool = [s for s in pool if s.name in wanted]
        gdn_rows = [g for g in GDN_IMPLS if g in wanted]
    size = "quick" if quick else "full"
    cases: list[Case] = []
    for tier in tiers:
        device = TIER_DEVICE[tier]
        if tier == "config":
            cases += [
                Case("config", "config", LIBRARY_ROW, v, features=("config",), size=size, base_seed=seed)
                for v in CONFIG_LIBRARY_VARIANTS
            ]
        preferred: set[tuple] = set()
        for subject in pool:
            points = _points_for(subject, tier)
            if quick:
                points = _quick_subset(points, preferred)
                preferred |= {_point_key(p) for p in points}
            reason = None if tier == "config" else subject.unavailable_reason(device)
            if reason is None and tier == "multigpu":
                n = torch.cuda.device_count()
                if n < 2:
                    reason = f"the multigpu tier needs >= 2 CUDA devices, this machine has {n}"
            for p in points:
                case_reason = reason
                if (
                    case_reason is None
                    and tier == "multigpu"
                    and p.params.get("world", 0) > torch.cuda.device_count()
                ):
                    case_reason = (
                        f"world size {p.params['world']} needs {p.params['world']} CUDA devices, "
                        f"this machine has {torch.cuda.device_count()}"
                    )
                cases.append(
                    Case(
                        tier=tier,
                        family=p.family,
                        backend=subject.name,
                        variant=p.variant,
                        dtype=_DTYPE_NAMES[p.dtype] if p.dtype is not None else None,
                        params=tuple(p.params.items()),
                        features=p.features,
                        size=size,
                        base_seed=seed,
                        skip_reason=case_reason,
                    )
                )
        if tier in ("cpu", "gpu"):
            cases += _gdn_cases(tier, gdn_rows, quick, size, seed)
    if pattern:
        match = compile_pattern(pattern)
        cases = [c for c in cases if match(c.id)]
    if shard is not None:
        i, n = shard
        if not (isinstance(n, int) and isinstance(i, int) and 1 <= i <= n):
            raise ValueError(f"shard must be I/N with 1 <= I <= N, got {i}/{n}")
        cases = [c for c in cases if zlib.crc32(c.problem_key.encode()) % n == i - 1]
    return cases


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)``; ``None`` passes through; anything else is a ``ValueError``."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 2/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text}: need 1 <= I <= N")
    return i, n


def with_skip(case: Case, reason: str) -> Case:
    return replace(case, skip_reason=reason)


# ------------------------------------------------------------------------------------------ -k


_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def compile_pattern(expr: str):
    """pytest-style ``-k``: substrings of the case id combined with ``and``, ``or``, ``not`` and
    parentheses (case-insensitive). ``"cpu and window and not documents"``."""
    tokens = [t for t in _TOKEN.findall(expr) if t]
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"-k {expr!r}: unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def parse_or():
        left = parse_and()
        while peek() == "or":
            take()
            right = parse_and()
            left = (lambda a, b: lambda s: a(s) or b(s))(left, right)
        return left

    def parse_and():
        left = parse_not()
        while peek() == "and":
            take()
            right = parse_not()
            left = (lambda a, b: lambda s: a(s) and b(s))(left, right)
        return left

    def parse_not():
        if peek() == "not":
            take()
            inner = parse_not()
            return lambda s: not inner(s)
        return parse_atom()

    def parse_atom():
        tok = take()
        if tok == "(":
            inner = parse_or()
            if take() != ")":
                raise ValueError(f"-k {expr!r}: missing ')'")
            return inner
        if tok in (")", "and", "or"):
            raise ValueError(f"-k {expr!r}: unexpected {tok!r}")
        needle = tok.lower()
        return lambda s: needle in s.lower()

    fn = parse_or()
    if pos != len(tokens):
        raise ValueError(f"-k {expr!r}: unexpected {tokens[pos]!r}")
    return fn
