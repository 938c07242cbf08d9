"""The cross-rank input check of context-parallel attention, on 2 gloo CPU ranks.

Ranks that disagree on the document metadata (zig-zag, llama3, Ulysses), on their local length or
on the dtype must all raise ``CPInputMismatchError`` naming what differs, before any exchange;
agreeing ranks get the ordinary result (against the single-process backend and a float64
reference); ``OLMO_ATTN_CP_CHECK=0`` turns the check off; a repeated call with the same inputs does
not check again, a changed one does. One spawned group runs every scenario (start-up dominates).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from conformance.distributed import run_distributed

T, HQ, HKV, D = 32, 4, 2, 8
CU_GOOD = [0, 12, 20, 32]  # what every rank should pass
CU_OTHER = [0, 32]  # what rank 1 passes in the mismatch scenarios


def _globals(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, T, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, T, HKV, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _backend(strategy: str, mesh):
    from olmo_attn.backends.torch_backend import TorchAttentionBackend
    from olmo_attn.cp import RingContextParallelStyle, UlyssesContextParallelStyle

    be = TorchAttentionBackend(head_dim=D, n_heads=HQ, n_kv_heads=HKV)
    if strategy == "ulysses":
        be.apply_cp(mesh, uly=UlyssesContextParallelStyle())
    else:
        be.apply_cp(mesh, ring=RingContextParallelStyle(strategy))
    return be


def _shard(strategy: str, mesh, cu: list[int] | None, tensors):
    from olmo_attn.cp import RingAttentionLoadBalancerType

    lb = RingAttentionLoadBalancerType(strategy).build(mesh)
    if cu is None:
        return lb, lb.batch_shard(inputs=list(tensors), seq_dims=[1, 1, 1], pad_values=[0.0] * 3), {}
    shards, meta = lb.batch_shard_by_document(
        inputs=list(tensors),
        seq_dims=[1, 1, 1],
        cu_doc_lens=torch.tensor(cu, dtype=torch.int32),
        pad_values=[0.0] * 3,
    )
    meta = {key: val.to(torch.int32) if isinstance(val, torch.Tensor) else val for key, val in meta.items()}
    return lb, shards, meta


def _outcome(fn) -> dict[str, Any]:
    from olmo_attn.exceptions import CPInputMismatchError

    try:
        value = fn()
    except CPInputMismatchError as e:
        return {"error": "CPInputMismatchError", "message": str(e)}
    except Exception as e:  # any other error: reported, so the test names it
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None, "value": value}


def _reference(q, k, v, cu):
    from reference.attention import attention

    out, _ = attention(
        q.double().numpy(),
        k.double().numpy(),
        v.double().numpy(),
        causal=True,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
    )
    return torch.from_numpy(np.asarray(out))


def _agreeing(strategy: str, mesh, with_docs: bool) -> dict[str, Any]:
    """Every rank passes its shard of the same batch: the gathered output vs single process and reference."""
    from olmo_attn.backends.torch_backend import TorchAttentionBackend
    from olmo_attn.cp import gather_sequence

    q, k, v = _globals()
    cu = CU_GOOD if with_docs else None
    lb, (ql, kl, vl), meta = _shard(strategy, mesh, cu, (q, k, v))
    out_l = _backend(strategy, mesh)((ql, kl, vl), **meta)
    kw: dict[str, Any] = {"cu_doc_lens": torch.tensor(cu)} if cu else {"length": T}
    out = gather_sequence(out_l, lb, seq_dim=1, group=mesh.get_group(), **kw)
    single = TorchAttentionBackend(head_dim=D, n_heads=HQ, n_kv_heads=HKV)
    one = single((q, k, v), **({"cu_doc_lens": torch.tensor(cu, dtype=torch.int32)} if cu else {}))
    return {
        "err_single": float((out - one).abs().max()),
        "err_ref": float((out - _reference(q, k, v, cu)).abs().max()),
    }


def _mismatched_docs(strategy: str, mesh, rank: int) -> dict[str, Any]:
    q, k, v = _globals()
    _, shards, meta = _shard(strategy, mesh, CU_GOOD if rank == 0 else CU_OTHER, (q, k, v))
    return _outcome(lambda: _backend(strategy, mesh)(tuple(shards), **meta).shape)


def _mismatched_length(strategy: str, mesh, rank: int) -> dict[str, Any]:
    q, k, v = _globals()
    _, shards, _ = _shard(strategy, mesh, None, (q, k, v))
    if rank == 1:  # rank 1 drops two tokens
        shards = [s[:, :-2] for s in shards]
    return _outcome(lambda: _backend(strategy, mesh)(tuple(shards)).shape)


def _mismatched_dtype(strategy: str, mesh, rank: int) -> dict[str, Any]:
    q, k, v = _globals(torch.float64 if rank == 0 else torch.float32)
    _, shards, _ = _shard(strategy, mesh, None, (q, k, v))
    return _outcome(lambda: _backend(strategy, mesh)(tuple(shards)).shape)


def _functional_mismatch(mesh, rank: int) -> dict[str, Any]:
    """The functional zig-zag entry point checks too (the one the ring tests call)."""
    from olmo_attn.cp import zigzag_ring_attention

    q, k, v = _globals()
    _, (ql, kl, vl), meta = _shard("zig_zag", mesh, CU_GOOD if rank == 0 else CU_OTHER, (q, k, v))
    kernel = _backend("zig_zag", mesh).kernel()
    return _outcome(
        lambda: (
            zigzag_ring_attention(
                ql, kl, vl, group=mesh.get_group(), kernel=kernel, cu_doc_lens=meta["cu_doc_lens"]
            ).shape
        )
    )


def _local_error(mesh, rank: int) -> dict[str, Any]:
    """Only rank 1 rejects its inputs (llama3 offsets that do not match its shard): it raises its own
    error, rank 0 a CPInputMismatchError naming rank 1, and nobody waits in the exchange."""
    q, k, v = _globals()
    _, shards, meta = _shard("llama3", mesh, CU_GOOD, (q, k, v))
    if rank == 1:
        meta["cu_doc_lens_q"] = torch.tensor([0, 15], dtype=torch.int32)  # the shard has 16 tokens
    return _outcome(lambda: _backend("llama3", mesh)(tuple(shards), **meta).shape)


def _mismatched_setting(mesh, rank: int) -> dict[str, Any]:
    """Ranks whose llama3 head_stride differs (their gathers would differ in size)."""
    from olmo_attn.backends.torch_backend import TorchAttentionBackend
    from olmo_attn.cp import RingContextParallelStyle

    q, k, v = _globals()
    _, shards, _ = _shard("llama3", mesh, None, (q, k, v))
    be = TorchAttentionBackend(head_dim=D, n_heads=HQ, n_kv_heads=HKV)
    be.apply_cp(mesh, ring=RingContextParallelStyle("llama3", head_stride=1 + rank))
    return _outcome(lambda: be(tuple(shards)).shape)


def _mismatched_gather(mesh, rank: int) -> dict[str, Any]:
    """gather_sequence of shards whose lengths differ: named, on every rank, before the all-gather."""
    from olmo_attn.cp import RingAttentionLoadBalancerType, gather_sequence

    lb = RingAttentionLoadBalancerType("zig_zag").build(mesh)
    local = torch.zeros(1, 16 - 2 * rank, 3)
    return _outcome(lambda: gather_sequence(local, lb, seq_dim=1, group=mesh.get_group(), length=T).shape)


def _llama3_same_view(mesh, rank: int) -> dict[str, Any]:
    """Two packed sequences that rank 0 sees the same way (documents start at 0 and 12 in its half)
    but rank 1 does not: both ranks must check the second one too (a rank that skipped would leave
    the other alone in the check), and both results are right."""
    from olmo_attn.backends.torch_backend import TorchAttentionBackend
    from olmo_attn.cp import check, gather_sequence

    calls, original = _counting_gathers()
    errs = []
    try:
        q, k, v = _globals()
        be = _backend("llama3", mesh)
        for cu in ([0, 12, 20, 32], [0, 12, 24, 32]):
            lb, shards, meta = _shard("llama3", mesh, cu, (q, k, v))
            out_l = be(tuple(shards), **meta)
            be(tuple(shards), **meta)  # the next layer: same tensors, no check
            out = gather_sequence(out_l, lb, seq_dim=1, group=mesh.get_group(), cu_doc_lens=torch.tensor(cu))
            single = TorchAttentionBackend(head_dim=D, n_heads=HQ, n_kv_heads=HKV)
            one = single((q, k, v), cu_doc_lens=torch.tensor(cu, dtype=torch.int32))
            errs.append(
                max(float((out - one).abs().max()), float((out - _reference(q, k, v, cu)).abs().max()))
            )
    finally:
        check._gather = original
    return {"attention_checks": len([c for c in calls if c == check._N]), "errs": errs}


def _counting_gathers():
    """Wrap the check's collective; returns the list its calls are appended to."""
    from olmo_attn.cp import check

    calls: list[int] = []
    original = check._gather

    def counted(values, group, world, device):
        calls.append(len(values))
        return original(values, group, world, device)

    check._gather = counted
    return calls, original


def _cache_and_switch(mesh, rank: int) -> dict[str, Any]:
    from olmo_attn.cp import check

    check.clear_cache()
    calls, original = _counting_gathers()
    try:
        q, k, v = _globals()
        _, shards, meta = _shard("zig_zag", mesh, CU_GOOD, (q, k, v))
        be = _backend("zig_zag", mesh)
        first = be(tuple(shards), **meta)
        n_first = len(calls)
        again = be(tuple(shards), **meta)  # same fingerprint: no check
        n_again = len(calls)
        _, shards2, meta2 = _shard("zig_zag", mesh, [0, 16, 32], (q, k, v))
        be(tuple(shards2), **meta2)  # new document layout: checked again
        n_changed = len(calls)
        # switched off: mismatched documents pass without the check (and without its collective)
        os.environ["OLMO_ATTN_CP_CHECK"] = "0"
        try:
            check.clear_cache()
            _, shards3, meta3 = _shard("zig_zag", mesh, CU_GOOD if rank == 0 else CU_OTHER, (q, k, v))
            off = _outcome(lambda: be(tuple(shards3), **meta3).shape)
        finally:
            del os.environ["OLMO_ATTN_CP_CHECK"]
        n_off = len(calls) - n_changed
        # always: every call checks, repeated inputs included
        os.environ["OLMO_ATTN_CP_CHECK"] = "always"
        try:
            be(tuple(shards), **meta)
            be(tuple(shards), **meta)
        finally:
            del os.environ["OLMO_ATTN_CP_CHECK"]
        n_always = len(calls) - n_changed - n_off
    finally:
        check._gather = original
    return {
        "n_first": n_first,
        "n_again": n_again,
        "n_changed": n_changed,
        "n_off": n_off,
        "n_always": n_always,
        "same_result": bool(torch.equal(first, again)),
        "off": off,
    }


def _ulysses_local_error(mesh, rank: int) -> dict[str, Any]:
    """Ulysses checks the global document offsets against W x the local length before any
    exchange: rank 1, two tokens short, rejects them alone; rank 0 must not wait in the all-to-all."""
    q, k, v = _globals()
    _, shards, meta = _shard("ulysses", mesh, CU_GOOD, (q, k, v))
    if rank == 1:
        shards = [s[:, :-2] for s in shards]
    return _outcome(lambda: _backend("ulysses", mesh)(tuple(shards), **meta).shape)


def rank_body() -> dict[str, Any]:
    import torch.distributed as dist

    from conformance.distributed import cp_mesh
    from olmo_attn.cp import check

    mesh = cp_mesh()
    rank = dist.get_rank()
    out: dict[str, Any] = {}

    def run(name: str, fn) -> None:
        # every scenario starts as a first call: a rank whose inputs match a fingerprint that already
        # passed skips the check (see olmo_attn.cp.check), so a mismatch after an agreeing scenario
        # with the same inputs on one rank would leave the other rank alone in the check
        check.clear_cache()
        out[name] = fn()

    for strategy in ("zig_zag", "llama3", "ulysses"):
        run(f"agree/{strategy}/docs", lambda s=strategy: _outcome(lambda: _agreeing(s, mesh, True)))
        run(f"agree/{strategy}/causal", lambda s=strategy: _outcome(lambda: _agreeing(s, mesh, False)))
        run(f"docs/{strategy}", lambda s=strategy: _mismatched_docs(s, mesh, rank))
        run(f"length/{strategy}", lambda s=strategy: _mismatched_length(s, mesh, rank))
        run(f"dtype/{strategy}", lambda s=strategy: _mismatched_dtype(s, mesh, rank))
    run("functional/zig_zag", lambda: _functional_mismatch(mesh, rank))
    run("local_error", lambda: _local_error(mesh, rank))
    run("local_error/ulysses", lambda: _ulysses_local_error(mesh, rank))
    run("head_stride", lambda: _mismatched_setting(mesh, rank))
    run("gather", lambda: _mismatched_gather(mesh, rank))
    run("cache", lambda: _cache_and_switch(mesh, rank))
    run("llama3_views", lambda: _llama3_same_view(mesh, rank))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(rank_body, 2, timeout_s=120)


STRATEGIES = ("zig_zag", "llama3", "ulysses")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_agreeing_ranks_get_the_single_process_result(results, strategy):
    for case in ("docs", "causal"):
        for r, res in enumerate(results):
            got = res[f"agree/{strategy}/{case}"]
            assert got["error"] is None, f"rank {r} {case}: {got}"
            assert got["value"]["err_single"] < 1e-10, (r, case, got)
            assert got["value"]["err_ref"] < 1e-10, (r, case, got)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_different_document_metadata_raise_on_every_rank(results, strategy):
    for r, res in enumerate(results):
        got = res[f"docs/{strategy}"]
        assert got["error"] == "CPInputMismatchError", f"rank {r}: {got}"
        msg = got["message"]
        assert "cu_doc_lens" in msg and "rank 0" in msg and "rank 1" in msg, msg
        assert "shard_batch" in msg, msg
        if strategy == "llama3":  # per-rank offsets by design: checked for fitting together
            assert "do not describe one packed sequence" in msg, msg
        else:
            assert "differs across context-parallel ranks" in msg, msg
    if strategy == "ulysses":  # the global offsets themselves are named
        msg = results[0][f"docs/{strategy}"]["message"]
        assert "rank 0 has 3 documents [0, 12, 20, 32]" in msg and "rank 1 has 1 document [0, 32]" in msg, msg
    if strategy == "zig_zag":  # the local offsets (each rank keeps a quarter of every padded document)
        msg = results[0][f"docs/{strategy}"]["message"]
        assert "rank 0 has 3 documents [0, 6, 10, 16]" in msg and "rank 1 has 1 document [0, 16]" in msg, msg
    if strategy == "llama3":  # rank 1's keys start at 0, but rank 0's last document starts at 12
        msg = results[0][f"docs/{strategy}"]["message"]
        assert "rank 1's local_k_slice starts at 0" in msg and "starts at 12" in msg, msg
    assert results[0][f"docs/{strategy}"]["message"] == results[1][f"docs/{strategy}"]["message"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_different_local_lengths_name_the_shape(results, strategy):
    for r, res in enumerate(results):
        got = res[f"length/{strategy}"]
        assert got["error"] == "CPInputMismatchError", f"rank {r}: {got}"
        msg = got["message"]
        assert "local shape of q/k/v differs" in msg, msg
        assert "rank 0 has q (1, 16, 4, 8)" in msg and "rank 1 has q (1, 14, 4, 8)" in msg, msg


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_different_dtypes_name_the_dtype(results, strategy):
    for r, res in enumerate(results):
        got = res[f"dtype/{strategy}"]
        assert got["error"] == "CPInputMismatchError", f"rank {r}: {got}"
        msg = got["message"]
        assert "dtype of q/k/v differs" in msg, msg
        assert "rank 0 has q/k/v torch.float64" in msg and "rank 1 has q/k/v torch.float32" in msg, msg


def test_functional_entry_point_checks_too(results):
    for r, res in enumerate(results):
        got = res["functional/zig_zag"]
        assert got["error"] == "CPInputMismatchError" and "cu_doc_lens" in got["message"], f"rank {r}: {got}"


def test_a_rank_that_rejects_its_inputs_does_not_leave_the_others_waiting(results):
    r0, r1 = results[0]["local_error"], results[1]["local_error"]
    assert r1["error"] == "ContextParallelInputError" and "does not match the shapes" in r1["message"], r1
    assert r0["error"] == "CPInputMismatchError", r0
    assert "rank 1 rejected its inputs" in r0["message"] and "does not match the shapes" in r0["message"], r0


def test_different_settings_name_the_setting(results):
    for r, res in enumerate(results):
        got = res["head_stride"]
        assert got["error"] == "CPInputMismatchError", f"rank {r}: {got}"
        assert (
            "head_stride differs across context-parallel ranks: rank 0 has 1, rank 1 has 2" in got["message"]
        )


def test_repeated_calls_skip_the_check_and_the_switch_turns_it_off(results):
    for r, res in enumerate(results):
        c = res["cache"]
        assert c["n_first"] == 1, (r, c)  # one collective on the first call
        assert c["n_again"] == 1, (r, c)  # none for the same inputs again
        assert c["n_changed"] == 2, (r, c)  # one for a new document layout
        assert c["same_result"], (r, c)
        assert c["n_off"] == 0, (r, c)  # OLMO_ATTN_CP_CHECK=0: no check collective
        assert c["off"]["error"] is None, (r, c)  # and no error from the check
        assert c["n_always"] == 2, (r, c)  # OLMO_ATTN_CP_CHECK=always: every call


def test_gather_sequence_checks_the_shard_shapes(results):
    for r, res in enumerate(results):
        got = res["gather"]
        assert got["error"] == "CPInputMismatchError", f"rank {r}: {got}"
        assert "local shape of shard differs" in got["message"], got
        assert "rank 0 has shard (1, 16, 3), rank 1 has shard (1, 14, 3)" in got["message"], got


def test_llama3_layouts_that_look_the_same_to_one_rank_are_checked_on_every_rank(results):
    for r, res in enumerate(results):
        got = res["llama3_views"]
        # 2 layouts x (attention check + gather check); the repeated call of each layout skips
        assert got["attention_checks"] == 4, (r, got)
        assert max(got["errs"]) < 1e-10, (r, got)


def test_a_ulysses_rank_that_rejects_its_documents_does_not_leave_the_others_waiting(results):
    r0, r1 = results[0]["local_error/ulysses"], results[1]["local_error/ulysses"]
    # rank 1's own error (or, its shape differing too, the mismatch report that quotes it)
    assert r1["error"] in ("InvalidInputError", "CPInputMismatchError"), r1
    assert "number of flattened tokens" in r1["message"], r1
    assert r0["error"] == "CPInputMismatchError" and "rank 1" in r0["message"], r0
