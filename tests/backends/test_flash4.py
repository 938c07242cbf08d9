"""flash_4 adapter: argument translation against recording doubles of flash-attn-4 4.0.0b36
(``flash_attn.cute``), the leftpad-aware KV cache, per-architecture head dims, and the errors here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_flash_doubles import (
    Recorder,
    assert_close_bf16,
    fake_cuda,
    install_flash4,
    library_backward,
    qkv,
    reference_out,
)

from olmo_attn import hardware
from olmo_attn.backends.base import AttentionBackendName
from olmo_attn.backends.flash4 import Flash4Kernel, FlashAttention4Backend, fa4_window, head_dim_reason
from olmo_attn.exceptions import BackendUnavailableError, UnsupportedFeatureError
from olmo_attn.kv_cache import KVCacheManager
from olmo_attn.ops.kernel import KernelCall
from reference.kv_cache import kv_cache_attention


@pytest.fixture
def fa4(monkeypatch: pytest.MonkeyPatch):
    rec = Recorder()
    fake_cuda(monkeypatch, (9, 0), "Fake H200")
    install_flash4(monkeypatch, rec)
    yield rec
    hardware.clear_caches()


def build(**kw) -> FlashAttention4Backend:
    backend = AttentionBackendName.flash_4.build(**{"head_dim": 16, "n_heads": 4, "n_kv_heads": 2, **kw})
    assert isinstance(backend, FlashAttention4Backend)
    return backend.eval()


# ----- availability and limits ----------------------------------------------------------------------
def test_unavailable_here() -> None:
    hardware.clear_caches()
    with pytest.raises(
        BackendUnavailableError, match=r"flash_attn.cute not installed.*pip install flash-attn-4"
    ):
        build()


@pytest.mark.parametrize(("sm", "gpu"), [((8, 0), "Fake A100"), ((12, 0), "Fake RTX 5090")])
def test_needs_hopper_or_blackwell(monkeypatch: pytest.MonkeyPatch, sm, gpu) -> None:
    fake_cuda(monkeypatch, sm, gpu)
    install_flash4(monkeypatch, Recorder())
    with pytest.raises(BackendUnavailableError, match=r"'flash_4' needs CUDA sm_90–sm_103"):
        build()
    hardware.clear_caches()


def test_dropout_refused_at_construction(fa4: Recorder) -> None:
    with pytest.raises(
        UnsupportedFeatureError,
        match=r"'flash_4' does not support dropout.*backends that do: torch, flash_2, te",
    ):
        build(dropout_p=0.1)


def test_head_dims_per_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    assert head_dim_reason(192, (9, 0)) is None and head_dim_reason(256, (10, 0)) is None
    assert "sm_100" in head_dim_reason(192, (10, 0))  # type: ignore[operator]
    assert head_dim_reason(100, (9, 0)) is not None
    fake_cuda(monkeypatch, (10, 0), "Fake B200")
    install_flash4(monkeypatch, Recorder())
    with pytest.raises(UnsupportedFeatureError, match=r"head_dim=192 is not supported on sm_100"):
        build(head_dim=192)
    assert build(head_dim=128).head_dim == 128
    hardware.clear_caches()


@pytest.mark.parametrize(
    ("window", "causal", "expected"),
    [
        ((-1, -1), True, (None, None)),
        ((-1, 0), True, (None, None)),
        ((4095, 0), True, (4095, 0)),
        ((7, 3), True, (7, 0)),  # causal already bounds the right side
        ((-1, -1), False, (None, None)),
        ((5, 2), False, (5, 2)),
        ((-1, 4), False, (None, 4)),
    ],
)
def test_window_convention(window, causal, expected) -> None:
    assert fa4_window(window, causal) == expected


# ----- module paths -----------------------------------------------------------------------------------
def test_dense_and_window(fa4: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv()
    out = build()((q, k, v))
    call = fa4.only("flash_attn_func")
    assert call.kwargs["causal"] is True and call.kwargs["window_size"] == (None, None)
    assert call.kwargs["softmax_scale"] == pytest.approx(1 / math.sqrt(16))
    assert call.args[1].shape[2] == 2 and call.kwargs["deterministic"] is False
    assert_close_bf16(out, reference_out(q, k, v))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    out = build(window_size=(4, 0), scale=0.3)((q, k, v))
    call = fa4.calls[-1]
    assert call.kwargs["window_size"] == (4, 0) and call.kwargs["deterministic"] is True
    assert_close_bf16(out, reference_out(q, k, v, scale=0.3, window=(4, 0)))


def test_documents_window_and_packed(fa4: Recorder) -> None:
    q, k, v = qkv(Hq=4, Hkv=4)
    cu = torch.tensor([0, 3, 20, 48], dtype=torch.int32)
    out = build(n_kv_heads=4, window_size=(5, 0))((q, k, v), cu_doc_lens=cu)
    call = fa4.only("flash_attn_varlen_func")
    assert call.args[0].shape == (48, 4, 16) and call.kwargs["cu_seqlens_k"] is cu
    assert call.kwargs["max_seqlen_q"] == 28 and call.kwargs["window_size"] == (5, 0)
    assert call.kwargs["seqused_k"] is None
    assert_close_bf16(out, reference_out(q, k, v, window=(5, 0), cu=cu))
    out = build(n_kv_heads=4)(torch.stack([q, k, v], dim=2))  # FA4 has no packed entry: views
    assert fa4.names()[-1] == "flash_attn_func"
    assert_close_bf16(out, reference_out(q, k, v))


# ----- KV cache: leftpad honoured (OLMo-core's flash_4 ignores it) ------------------------------------
def test_kv_cache_prefill_and_decode_honour_leftpad(fa4: Recorder) -> None:
    B, S, Hq, Hkv, D = 3, 16, 4, 2, 16
    backend = build(window_size=(5, 0))
    cache = KVCacheManager(B, S, Hkv, D, dtype=torch.bfloat16)
    leftpad = torch.tensor([0, 4, 2], dtype=torch.int32)
    cache.record_leftpad(leftpad)
    q, k, v = qkv(B=B, T=7, Hq=Hq, Hkv=Hkv, D=D, seed=7)
    out = backend((q, k, v), kv_cache_manager=cache)
    cache.update_seqlen(7)
    call = fa4.only("flash_attn_varlen_func")
    assert call.kwargs["cu_seqlens_k"].tolist() == [0, 7, 10, 15]  # visible keys pos + T_new - leftpad[b]
    assert call.kwargs.get("seqused_k") is None and call.args[1].shape == (15, Hkv, D)
    assert call.kwargs["cu_seqlens_q"].tolist() == [0, 7, 14, 21]
    assert call.kwargs["max_seqlen_k"] == 7
    ref, _, k_ref, _ = kv_cache_attention(
        q.float().numpy(), k.float().numpy(), v.float().numpy(), np.zeros((B, S, Hkv, D)), np.zeros((B, S, Hkv, D)),
        cache_seqlens=0, cache_leftpad=leftpad.numpy(), window=(5, 0),
    )  # fmt: skip
    valid = (np.arange(7)[None, :] >= leftpad.numpy()[:, None])[..., None, None]
    np.testing.assert_allclose(np.where(valid, out.float().numpy(), 0), np.where(valid, ref, 0), atol=2e-2)
    np.testing.assert_allclose(cache.k_cache.float().numpy()[:, :7], k_ref[:, :7], atol=1e-2)
    for step in range(2):  # decode
        q1, k1, v1 = qkv(B=B, T=1, Hq=Hq, Hkv=Hkv, D=D, seed=10 + step)
        before_k, before_v = cache.k_cache.float().numpy(), cache.v_cache.float().numpy()
        out1 = backend((q1, k1, v1), kv_cache_manager=cache)
        pos = 7 + step
        used = [pos + 1 - lp for lp in (0, 4, 2)]
        assert fa4.calls[-1].kwargs["cu_seqlens_k"].tolist() == [0, *np.cumsum(used).tolist()]
        ref1, *_ = kv_cache_attention(
            q1.float().numpy(), k1.float().numpy(), v1.float().numpy(), before_k, before_v,
            cache_seqlens=pos, cache_leftpad=leftpad.numpy(), window=(5, 0),
        )  # fmt: skip
        assert_close_bf16(out1, ref1)
        cache.update_seqlen(1)


def test_kv_cache_overflow_is_an_error(fa4: Recorder) -> None:
    cache = KVCacheManager(1, 4, 2, 16, dtype=torch.bfloat16)
    q, k, v = qkv(B=1, T=5)
    with pytest.raises(ValueError, match="KV cache overflow"):
        build()((q, k, v), kv_cache_manager=cache)
    assert fa4.calls == []


# ----- the LSE kernel -----------------------------------------------------------------------------------
def test_kernel_forward_backward_argument_order(fa4: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (x[0] for x in qkv(B=1, T=18))
    cu = torch.tensor([0, 8, 18], dtype=torch.int32)
    call = KernelCall(
        scale=0.25, causal=True, window=(3, 0), cu_seqlens_q=cu, cu_seqlens_k=cu, cu_seqlens_q_host=(0, 8, 18),
        cu_seqlens_k_host=(0, 8, 18),
    )  # fmt: skip
    kern = FlashAttention4Backend.kernel(None)  # type: ignore[arg-type]
    assert isinstance(kern, Flash4Kernel)
    out, lse = kern.forward(q, k, v, call)
    fwd = fa4.only("_flash_attn_fwd")
    assert fwd.kwargs["return_lse"] is True and fwd.kwargs["max_seqlen_q"] == 10
    assert (fwd.kwargs["window_size_left"], fwd.kwargs["window_size_right"]) == (3, 0)
    assert lse.shape == (4, 18)
    dout = torch.randn_like(q)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    dq, dk, dv = kern.backward(dout, q, k, v, out.float(), lse, call)
    bwd = fa4.only("_flash_attn_bwd")
    assert bwd.kwargs["dout"] is not None and torch.equal(bwd.kwargs["dout"], dout)
    assert bwd.kwargs["out"].dtype == q.dtype and bwd.kwargs["lse"].dtype == torch.float32
    assert bwd.kwargs["deterministic"] is True and bwd.kwargs["cu_seqlens_q"] is cu
    expected = library_backward(
        dout, q, k, v, out, lse, scale=0.25, causal=True, window=(3, 0), cu_seqlens_q=cu, cu_seqlens_k=cu
    )
    for mine, ref in zip((dq, dk, dv), expected):
        torch.testing.assert_close(mine, ref)


def test_kernel_dense_non_causal_and_empty_rows(fa4: Recorder) -> None:
    q, k, v = qkv(B=1, T=6)
    out, lse = Flash4Kernel().forward(q, k[:, :2], v[:, :2], KernelCall(scale=0.25, causal=True))
    fwd = fa4.calls[-1]
    assert (fwd.kwargs["window_size_left"], fwd.kwargs["window_size_right"]) == (None, None)
    assert torch.isneginf(lse[..., :4]).all() and torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    Flash4Kernel().forward(q, k, v, KernelCall(scale=0.25, causal=False, window=(2, 1)))
    fwd = fa4.calls[-1]
    assert fwd.kwargs["causal"] is False
    assert (fwd.kwargs["window_size_left"], fwd.kwargs["window_size_right"]) == (2, 1)
    with pytest.raises(UnsupportedFeatureError, match="does not support dropout"):
        Flash4Kernel().forward(q, k, v, KernelCall(scale=0.25, dropout_p=0.1, dropout_seed=3))


@pytest.mark.parametrize("head_dim", [128, 256])
def test_kv_cache_gives_the_kernel_only_visible_slots(fa4: Recorder, head_dim: int) -> None:
    """The kernel gets the visible slots only (the H200 run showed NaN in unused slots reaching the output
    through a view of the whole cache, at every head dim)."""
    B, S, Hq, Hkv, T = 2, 12, 2, 1, 5
    backend = build(head_dim=head_dim, n_heads=Hq, n_kv_heads=Hkv)
    cache = KVCacheManager(B, S, Hkv, head_dim, dtype=torch.bfloat16)
    cache.k_cache.fill_(float("nan"))  # poison: no query may see a slot it was not given
    cache.v_cache.fill_(float("nan"))
    leftpad = torch.tensor([0, 3], dtype=torch.int32)
    cache.record_leftpad(leftpad)
    q, k, v = qkv(B=B, T=T, Hq=Hq, Hkv=Hkv, D=head_dim, seed=3)
    out = backend((q, k, v), kv_cache_manager=cache)
    call = fa4.only("flash_attn_varlen_func")
    assert call.kwargs.get("seqused_k") is None
    assert call.kwargs["cu_seqlens_k"].tolist() == [0, 5, 7]  # T - leftpad[b] visible keys, back to back
    assert not torch.isnan(call.args[1]).any() and not torch.isnan(call.args[2]).any()
    ref, *_ = kv_cache_attention(
        q.float().numpy(), k.float().numpy(), v.float().numpy(), np.zeros((B, S, Hkv, head_dim)),
        np.zeros((B, S, Hkv, head_dim)), cache_seqlens=0, cache_leftpad=leftpad.numpy(),
    )  # fmt: skip
    valid = (np.arange(T)[None, :] >= leftpad.numpy()[:, None])[..., None, None]
    assert not torch.isnan(out[torch.from_numpy(valid[..., 0, 0])]).any()
    np.testing.assert_allclose(np.where(valid, out.float().numpy(), 0), np.where(valid, ref, 0), atol=3e-2)
