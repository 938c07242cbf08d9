"""The case matrix: generated from the capability table, stable ids, quick coverage, -k, skip reasons."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conformance_fakes import ExactBackend, subject_for

from conformance.cases import (
    ATTN_VARIANTS,
    KERNEL_VARIANTS,
    MODULE_VARIANTS,
    build_cases,
    compile_pattern,
    parse_shard,
)
from conformance.subjects import all_subjects, get_subject, registered
from olmo_attn.backends.capabilities import TABLE, Feature


def _cases(**kw):
    return build_cases(**kw)


def test_ids_are_unique_and_stable():
    a = _cases(tiers=["config", "cpu", "multiproc", "gpu", "multigpu"], quick=False)
    ids = [c.id for c in a]
    assert len(ids) == len(set(ids))
    b = _cases(tiers=["config", "cpu", "multiproc", "gpu", "multigpu"], quick=False)
    assert ids == [c.id for c in b]
    assert "cpu/attn/torch/window_documents/float32/d128/gqa4" in ids
    assert "multiproc/cp/torch/ring_llama3_documents/float32/w4" in ids


def test_tiers_are_cheapest_first():
    order = [c.tier for c in _cases(tiers=["multigpu", "gpu", "cpu", "config", "multiproc"])]
    ranks = {t: i for i, t in enumerate(["config", "cpu", "multiproc", "gpu", "multigpu"])}
    assert order == sorted(order, key=ranks.__getitem__)


def test_matrix_follows_the_table():
    cases = _cases(tiers=["gpu"], quick=False)
    for name, spec in TABLE.items():
        mine = [c for c in cases if c.backend == name and c.family in ("attn", "kernel", "packed")]
        assert mine, name
        assert {c.torch_dtype() for c in mine} <= set(spec.dtypes)
        assert all(c.param["head_dim"] <= spec.head_dim_max for c in mine)
        if Feature.sliding_window not in spec.features:
            assert not any("window" in c.variant for c in mine)
        if Feature.dropout not in spec.features:
            assert not any(c.family == "dropout" for c in cases if c.backend == name)
    assert not any(c.backend == "te" and c.family == "kvcache" for c in cases)  # TE has no KV cache
    assert not any(c.dtype == "float64" for c in cases)  # fp64 only for torch on CPU
    cpu = _cases(tiers=["cpu"], quick=False, backends=["torch"])
    assert {"float64", "float32", "bfloat16", "float16"} <= {c.dtype for c in cpu}


def test_a_registered_spec_drives_its_cases():
    limited = frozenset({Feature.causal, Feature.lse})
    subject = subject_for("limited", ExactBackend, features=limited)
    subject = dataclasses.replace(
        subject, spec=dataclasses.replace(subject.spec, dtypes=frozenset({torch.float32}), head_dim_max=64)
    )
    with registered(subject):
        cases = _cases(tiers=["cpu"], backends=["limited"], quick=False)
    assert {(c.family, c.variant) for c in cases if c.family in ("attn", "kernel")} == {
        ("attn", "causal"),
        ("kernel", "causal"),
    }
    assert {c.param["head_dim"] for c in cases if "head_dim" in c.param} == {64}
    assert {c.param["gqa"] for c in cases if "gqa" in c.param} == {"mha"}  # no Feature.gqa
    assert {c.dtype for c in cases} == {"float32"}


def test_quick_covers_every_variant_and_axis_value():
    full = _cases(tiers=["cpu"], backends=["torch"], quick=False)
    quick = _cases(tiers=["cpu"], backends=["torch"], quick=True)
    assert len(quick) < len(full) / 4
    for family in ("attn", "kernel", "module", "kvcache", "gdn"):
        fv = {c.variant for c in full if c.family == family}
        assert fv == {c.variant for c in quick if c.family == family}, family
        for axis in ("head_dim", "gqa"):
            vals = {c.param.get(axis) for c in full if c.family == family}
            assert vals == {c.param.get(axis) for c in quick if c.family == family}, (family, axis)
        assert {c.dtype for c in full if c.family == family} == {c.dtype for c in quick if c.family == family}
    for variant, _, _ in ATTN_VARIANTS:  # every GQA setting in every attention mask
        assert {c.param["gqa"] for c in quick if c.family == "attn" and c.variant == variant} == {
            "mha",
            "gqa4",
            "mqa",
        }
    assert {v for v, _, _ in KERNEL_VARIANTS} == {c.variant for c in quick if c.family == "kernel"}
    assert {v for v, _, _ in MODULE_VARIANTS} == {c.variant for c in quick if c.family == "module"}


def test_cp_matrix_every_balancer_style_mask_and_world_size():
    full = _cases(tiers=["multiproc"], backends=["torch"], quick=False)
    combos = {(c.variant, c.param["world"]) for c in full}
    for style in ("ring_zig_zag", "ring_llama3", "ulysses_ulysses"):
        for mask in ("causal", "window", "documents", "window_documents"):
            assert {(f"{style}_{mask}", 2), (f"{style}_{mask}", 4)} <= combos
    quick = _cases(tiers=["multiproc"], backends=["torch"], quick=True)
    assert {c.variant for c in quick} == {c.variant for c in full}
    for style in ("ring_zig_zag", "ring_llama3", "ulysses_ulysses"):
        assert {c.param["world"] for c in quick if c.variant.startswith(style)} == {2, 4}


def test_seeds_depend_on_the_problem_not_the_backend():
    cases = _cases(tiers=["gpu"], quick=False)
    by_key: dict[str, set[int]] = {}
    for c in cases:
        by_key.setdefault(c.problem_key, set()).add(c.seed)
    assert all(len(s) == 1 for s in by_key.values())
    a = _cases(tiers=["cpu"], seed=0)[0]
    b = _cases(tiers=["cpu"], seed=1)[0]
    assert a.id == b.id and a.seed != b.seed


def test_unavailable_backends_are_skipped_with_the_exact_reason():
    cases = _cases(tiers=["gpu"], backends=["flash_2", "torch"])
    if not torch.cuda.is_available():
        assert cases and all(c.skip_reason and "no CUDA device" in c.skip_reason for c in cases)
    else:
        reasons = {c.skip_reason for c in cases if c.backend == "flash_2"}
        spec_reason = get_subject("flash_2").unavailable_reason("cuda")
        assert reasons == {spec_reason}


def test_pattern_language():
    ids = [
        "cpu/attn/torch/window/float32",
        "cpu/attn/torch/documents/float32",
        "gpu/kernel/flash_2/window/bfloat16",
    ]
    match = compile_pattern("window and not gpu")
    assert [i for i in ids if match(i)] == ids[:1]
    match = compile_pattern("(documents or kernel) and FLOAT")
    assert [i for i in ids if match(i)] == ids[1:]
    for bad in ("window and", "(window", "or window", "window )"):
        with pytest.raises(ValueError):
            compile_pattern(bad)
    assert all("window" in c.id for c in _cases(tiers=["cpu"], pattern="window"))


def test_unknown_backend_or_tier_is_an_error():
    with pytest.raises(ValueError, match="flash_9"):
        _cases(backends=["flash_9"])
    with pytest.raises(ValueError, match="tier"):
        _cases(tiers=["cpu", "tpu"])


def test_subjects_are_the_table_rows():
    assert [s.name for s in all_subjects()][: len(TABLE)] == list(TABLE)
    assert all(s.spec is TABLE[s.name] for s in all_subjects() if s.shipped)


def test_shards_partition_the_cases_by_problem():
    full = build_cases(tiers=["config", "cpu", "gpu"], backends=None)
    shards = [build_cases(tiers=["config", "cpu", "gpu"], backends=None, shard=(i, 3)) for i in (1, 2, 3)]
    ids = [c.id for s in shards for c in s]
    assert sorted(ids) == sorted(c.id for c in full)  # every case exactly once
    where = {c.problem_key: i for i, s in enumerate(shards) for c in s}
    assert all(where[c.problem_key] == i for i, s in enumerate(shards) for c in s)  # problems stay whole
    assert all(len(s) > len(full) // 6 for s in shards)  # roughly balanced
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "x", "1/2/3"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
