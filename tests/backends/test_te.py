"""te adapter: ``DotProductAttention`` construction and call translation against a recording double
(bshd, thd documents, window, GQA, ring CP through TE's p2p), and the clear errors here."""

from __future__ import annotations

import types

import pytest
import torch
from test_flash_doubles import Recorder, assert_close_bf16, fake_cuda, install_te, qkv, reference_out

from olmo_attn import hardware
from olmo_attn.backends.base import AttentionBackendName
from olmo_attn.backends.te import TEAttentionBackend
from olmo_attn.exceptions import BackendUnavailableError, UnsupportedFeatureError
from olmo_attn.kv_cache import KVCacheManager


@pytest.fixture
def te(monkeypatch: pytest.MonkeyPatch):
    rec = Recorder()
    fake_cuda(monkeypatch, (9, 0))
    install_te(monkeypatch, rec)
    yield rec
    hardware.clear_caches()


def build(**kw) -> TEAttentionBackend:
    backend = AttentionBackendName.te.build(**{"head_dim": 16, "n_heads": 4, "n_kv_heads": 2, **kw})
    assert isinstance(backend, TEAttentionBackend)
    return backend.eval()


def test_unavailable_here() -> None:
    hardware.clear_caches()
    with pytest.raises(
        BackendUnavailableError,
        match=r"transformer_engine.pytorch not installed.*transformer[-_]engine\[pytorch\]",
    ):
        build()


def test_unavailable_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    install_te(monkeypatch, Recorder())
    with pytest.raises(BackendUnavailableError, match=r"'te' needs CUDA sm_80"):
        build()
    hardware.clear_caches()


def test_construction_arguments(te: Recorder) -> None:
    backend = build(window_size=(9, 0), scale=0.3, dropout_p=0.1)
    init = te.only("DotProductAttention.__init__").kwargs
    assert (init["num_attention_heads"], init["kv_channels"], init["num_gqa_groups"]) == (4, 16, 2)
    assert init["attention_dropout"] == 0.1 and init["softmax_scale"] == 0.3
    assert init["attn_mask_type"] == "causal" and init["qkv_format"] == "bshd"
    assert init["window_size"] == (9, 0)
    assert "te_attn" in dict(backend.named_children())
    build()
    assert te.calls[-1].kwargs["window_size"] == (-1, 0)  # full causal: TE's (-1, 0)


def test_bshd_call(te: Recorder) -> None:
    q, k, v = qkv()
    out = build(window_size=(6, 0))((q, k, v))
    call = te.only("DotProductAttention.forward")
    assert call.args[1].shape == (2, 24, 2, 16)  # GQA: K/V with Hkv heads
    assert call.kwargs["qkv_format"] == "bshd" and call.kwargs["attn_mask_type"] == "causal"
    assert call.kwargs["window_size"] == (6, 0) and call.kwargs["cu_seqlens_q"] is None
    assert out.shape == q.shape
    assert_close_bf16(out, reference_out(q, k, v, window=(6, 0)))


def test_documents_go_through_thd(te: Recorder) -> None:
    """OLMo-core's TE backend rejects every document argument before its thd code; ours runs it."""
    q, k, v = qkv()
    cu = torch.tensor([0, 7, 24, 40, 48], dtype=torch.int32)
    out = build()((q, k, v), cu_doc_lens=cu)
    call = te.only("DotProductAttention.forward")
    assert call.kwargs["qkv_format"] == "thd" and call.kwargs["attn_mask_type"] == "padding_causal"
    assert call.kwargs["cu_seqlens_q"] is cu and call.kwargs["cu_seqlens_kv"] is cu
    assert call.kwargs["max_seqlen_q"] == 17 and call.kwargs["max_seqlen_kv"] == 17
    assert call.args[0].shape == (48, 4, 16)
    assert_close_bf16(out, reference_out(q, k, v, cu=cu))


def test_packed_uses_views(te: Recorder) -> None:
    q, k, v = qkv(Hq=4, Hkv=4)
    out = build(n_kv_heads=4)(torch.stack([q, k, v], dim=2))
    assert_close_bf16(out, reference_out(q, k, v))


def test_refusals(te: Recorder) -> None:
    q, k, v = qkv(B=1, T=8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(UnsupportedFeatureError, match=r"'te' does not support documents qk.*flash_4"):
        build()((q, k, v), cu_doc_lens_q=cu, cu_doc_lens_k=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(UnsupportedFeatureError, match=r"'te' does not support kv cache.*flash_2"):
        build()((q, k, v), kv_cache_manager=KVCacheManager(1, 16, 2, 16))
    with pytest.raises(UnsupportedFeatureError, match=r"'te' does not support lse.*flash_4"):
        build().kernel()


def test_documents_with_a_window_are_refused_before_te_runs(te: Recorder) -> None:
    """The H200 run (TE 2.20.2) gave a right forward and wrong dq / dk / dv (and NaN) for thd
    documents with a sliding window: the table no longer claims it and the call says so."""
    q, k, v = qkv(B=1, T=8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(
        UnsupportedFeatureError,
        match=r"'te' does not support documents window \(window_size=\(2, 0\).*flash_4",
    ):
        build(window_size=(2, 0))((q, k, v), cu_doc_lens=cu)
    assert "DotProductAttention.forward" not in te.names()
    build()((q, k, v), cu_doc_lens=cu)  # documents alone still run
    build(window_size=(2, 0))((q, k, v))  # and so does a window alone
    assert te.names().count("DotProductAttention.forward") == 2


def _mesh() -> types.SimpleNamespace:
    return types.SimpleNamespace(get_group=lambda: "cp-group")


def test_ring_cp_through_te_p2p(te: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 1])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda: "default-stream")
    backend = build()
    backend.apply_cp(_mesh(), ring=types.SimpleNamespace(load_balancer="zig_zag", head_stride=1))
    cp = te.only("set_context_parallel_group").kwargs
    assert cp == {
        "cp_group": "cp-group",
        "cp_global_ranks": [0, 1],
        "cp_stream": "default-stream",
        "cp_comm_type": "p2p",
    }
    q, k, v = qkv()
    out = backend((q, k, v))  # TE runs the ring itself: one plain bshd call on the local shard
    assert te.calls[-1].kwargs["qkv_format"] == "bshd" and out.shape == q.shape
    with pytest.raises(UnsupportedFeatureError, match=r"p2p ring.*Ulysses"):
        backend((q, k, v), cu_doc_lens=torch.tensor([0, 20, 48], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'llama3' is not a ring strategy of backend 'te'"):
        build().apply_cp(_mesh(), ring=types.SimpleNamespace(load_balancer="llama3", head_stride=1))


def test_ulysses_does_not_configure_te_cp(te: Recorder) -> None:
    backend = build()
    backend.apply_cp(_mesh(), uly=types.SimpleNamespace())
    assert "set_context_parallel_group" not in te.names()  # our all-to-all, not TE's "a2a"
