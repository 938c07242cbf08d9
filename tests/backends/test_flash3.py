"""flash_3 adapter: argument translation against recording doubles of FlashAttention-3's
``flash_attn_interface`` — both generations: flash-attn 2.8.3's ``hopper/`` and FA3 3.0.0 (the
custom-op interface that builds with CUDA 13) — and the clear errors here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_flash_doubles import (
    Recorder,
    assert_close_bf16,
    fake_cuda,
    install_flash3,
    library_backward,
    qkv,
    reference_out,
)

from olmo_attn import hardware
from olmo_attn.backends import capabilities as caps
from olmo_attn.backends.base import AttentionBackendName
from olmo_attn.backends.flash3 import Flash3Kernel, FlashAttention3Backend
from olmo_attn.exceptions import BackendUnavailableError, UnsupportedFeatureError
from olmo_attn.kv_cache import KVCacheManager
from olmo_attn.ops.kernel import KernelCall
from reference.kv_cache import kv_cache_attention


@pytest.fixture(params=["2.8.3", "3.0.0"])
def fa3(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    rec = Recorder()
    fake_cuda(monkeypatch, (9, 0))
    install_flash3(monkeypatch, rec, version=request.param)
    yield rec
    hardware.clear_caches()


def _window(call) -> tuple[int, int]:
    """The window a recorded private FA3 call received, in either generation's form."""
    if "window_size_left" in call.kwargs:
        return (call.kwargs["window_size_left"], call.kwargs["window_size_right"])
    return tuple(call.kwargs["window_size"])


def build(**kw) -> FlashAttention3Backend:
    backend = AttentionBackendName.flash_3.build(**{"head_dim": 16, "n_heads": 4, "n_kv_heads": 2, **kw})
    assert isinstance(backend, FlashAttention3Backend)
    return backend.eval()


def test_unavailable_here() -> None:
    hardware.clear_caches()
    with pytest.raises(BackendUnavailableError, match=r"flash_attn_interface not installed.*hopper/"):
        build()


@pytest.mark.parametrize(("sm", "gpu"), [((8, 0), "Fake A100"), ((10, 0), "Fake B200")])
def test_hopper_only(monkeypatch: pytest.MonkeyPatch, sm, gpu) -> None:
    fake_cuda(monkeypatch, sm, gpu)
    install_flash3(monkeypatch, Recorder())
    with pytest.raises(BackendUnavailableError, match=r"'flash_3' needs CUDA sm_90–sm_90"):
        build()
    hardware.clear_caches()


def test_dropout_refused_at_construction(fa3: Recorder) -> None:
    with pytest.raises(UnsupportedFeatureError, match=r"'flash_3' does not support dropout.*flash_2"):
        build(dropout_p=0.1)


def test_newer_builds_install_flash_attn_3_package(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    fake_cuda(monkeypatch)
    install_flash3(monkeypatch, rec, module="flash_attn_3.flash_attn_interface")
    q, k, v = qkv()
    build()((q, k, v))
    assert rec.names() == ["flash_attn_func"]
    hardware.clear_caches()


def test_dense_window_scale_deterministic(fa3: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv()
    out = build()((q, k, v))
    call = fa3.only("flash_attn_func")
    assert call.kwargs["causal"] is True and call.kwargs["window_size"] == (-1, -1)
    assert call.kwargs["softmax_scale"] == pytest.approx(1 / math.sqrt(16))
    assert call.kwargs["deterministic"] is False and call.args[1].shape[2] == 2
    assert_close_bf16(out, reference_out(q, k, v))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    out = build(window_size=(6, 0), scale=0.3)((q, k, v))
    call = fa3.calls[-1]
    assert call.kwargs["window_size"] == (6, 0) and call.kwargs["softmax_scale"] == 0.3
    assert call.kwargs["deterministic"] is True
    assert_close_bf16(out, reference_out(q, k, v, scale=0.3, window=(6, 0)))


@pytest.mark.parametrize("D", [192, 256])
def test_deterministic_refused_above_head_dim_128(
    fa3: Recorder, monkeypatch: pytest.MonkeyPatch, D: int
) -> None:
    """Regression (H200, FA3 3.0.0): a deterministic backward at head_dim 256 segfaulted inside FA3
    (its 256 kernel has no deterministic variant); asked for one, both entry points raise first."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    q, k, v = qkv(D=D)
    with pytest.raises(UnsupportedFeatureError, match=rf"deterministic backward at head_dim={D}.*flash_4"):
        build(head_dim=D)((q, k, v))
    assert not fa3.calls
    q, k, v = (x[0] for x in qkv(B=1, T=8, D=D))
    call = KernelCall(scale=0.1, causal=True)
    out, lse = Flash3Kernel().forward(q, k, v, call)  # the forward takes no such flag
    with pytest.raises(UnsupportedFeatureError, match=rf"head_dim={D}"):
        Flash3Kernel().backward(torch.randn_like(q), q, k, v, out, lse, call)
    assert fa3.names() == ["_flash_attn_forward"]


def test_deterministic_kept_at_head_dim_128(fa3: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    q, k, v = qkv(D=128)
    build(head_dim=128)((q, k, v))
    assert fa3.only("flash_attn_func").kwargs["deterministic"] is True
    assert caps.get_spec("flash_3").supports_deterministic(128)
    assert not caps.get_spec("flash_3").supports_deterministic(192)
    assert caps.get_spec("flash_4").supports_deterministic(256)


def test_documents_and_packed(fa3: Recorder) -> None:
    q, k, v = qkv(Hq=4, Hkv=4)
    cu = torch.tensor([0, 9, 30, 48], dtype=torch.int32)
    out = build(n_kv_heads=4)((q, k, v), cu_doc_lens=cu)
    call = fa3.only("flash_attn_varlen_func")
    assert call.args[0].shape == (48, 4, 16)
    assert call.kwargs["cu_seqlens_q"] is cu and call.kwargs["max_seqlen_q"] == 21
    assert_close_bf16(out, reference_out(q, k, v, cu=cu))
    packed = torch.stack([q, k, v], dim=2)
    out = build(n_kv_heads=4)(packed)
    assert fa3.only("flash_attn_qkvpacked_func").args[0] is packed
    assert_close_bf16(out, reference_out(q, k, v))
    out = build(n_kv_heads=4)(packed, cu_doc_lens=cu)  # no varlen packed function in FA3: views
    assert fa3.names()[-1] == "flash_attn_varlen_func"
    assert_close_bf16(out, reference_out(q, k, v, cu=cu))


def test_kv_cache_prefill_and_decode_honour_leftpad(fa3: Recorder) -> None:
    """Regression (H200, FA3 3.0.0): through ``flash_attn_with_kvcache`` new keys landed on a row's
    left padding and NaN in unused slots reached the output. The adapter now writes the cache itself
    and hands ``flash_attn_varlen_func`` only the visible slots ``[leftpad, pos + T_new)``."""
    B, S, Hq, Hkv, D = 3, 16, 4, 2, 16
    backend = build(window_size=(5, 0))
    cache = KVCacheManager(B, S, Hkv, D, dtype=torch.bfloat16)
    leftpad = torch.tensor([0, 4, 2], dtype=torch.int32)
    cache.record_leftpad(leftpad)
    cache.k_cache.fill_(float("nan"))  # slots no query may see: must never reach an output
    cache.v_cache.fill_(float("nan"))
    q, k, v = qkv(B=B, T=7, Hq=Hq, Hkv=Hkv, D=D, seed=7)
    out = backend((q, k, v), kv_cache_manager=cache)
    cache.update_seqlen(7)
    call = fa3.only("flash_attn_varlen_func")
    assert call.kwargs["cu_seqlens_k"].tolist() == [0, 7, 10, 15]  # visible keys: pos + T_new - leftpad[b]
    assert call.args[1].shape == (15, Hkv, D) and call.kwargs["max_seqlen_k"] == 7
    assert call.kwargs["cu_seqlens_q"].tolist() == [0, 7, 14, 21] and call.kwargs["causal"] is True
    zeros = np.zeros((B, S, Hkv, D))
    ref, _, k_ref, _ = kv_cache_attention(
        q.float().numpy(), k.float().numpy(), v.float().numpy(), zeros, zeros,
        cache_seqlens=0, cache_leftpad=leftpad.numpy(), window=(5, 0),
    )  # fmt: skip
    valid = np.arange(7)[None, :] >= leftpad.numpy()[:, None]  # [B, 7] rows after the left padding
    got = out.float().numpy()
    assert np.isfinite(got[valid]).all()
    np.testing.assert_allclose(got[valid], ref[valid], atol=2e-2)
    written = cache.k_cache.float().numpy()[:, :7]
    np.testing.assert_allclose(written[valid], k_ref[:, :7][valid], atol=1e-2)
    assert np.isnan(written[~valid]).all()  # the left padding is never written
    for step in range(2):  # decode
        q1, k1, v1 = qkv(B=B, T=1, Hq=Hq, Hkv=Hkv, D=D, seed=10 + step)
        before_k = np.nan_to_num(cache.k_cache.float().numpy())
        before_v = np.nan_to_num(cache.v_cache.float().numpy())
        out1 = backend((q1, k1, v1), kv_cache_manager=cache)
        pos = 7 + step
        used = [pos + 1 - lp for lp in (0, 4, 2)]
        assert fa3.calls[-1].kwargs["cu_seqlens_k"].tolist() == [0, *np.cumsum(used).tolist()]
        ref1, *_ = kv_cache_attention(
            q1.float().numpy(), k1.float().numpy(), v1.float().numpy(), before_k, before_v,
            cache_seqlens=pos, cache_leftpad=leftpad.numpy(), window=(5, 0),
        )  # fmt: skip
        assert torch.isfinite(out1.float()).all()
        assert_close_bf16(out1, ref1)
        cache.update_seqlen(1)


def test_kernel_forward_backward_keywords(fa3: Recorder) -> None:
    q, k, v = (x[0] for x in qkv(B=1, T=16))
    cu_q = torch.tensor([0, 6, 16], dtype=torch.int32)
    call = KernelCall(
        scale=0.25, causal=True, window=(2, 0), cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, max_seqlen_q=10,
        max_seqlen_k=10, deterministic=True,
    )  # fmt: skip
    kern = Flash3Kernel()
    out, lse = kern.forward(q, k, v, call)
    fwd = fa3.only("_flash_attn_forward")
    assert fwd.kwargs["cu_seqlens_q"] is cu_q and fwd.kwargs["max_seqlen_k"] == 10
    assert _window(fwd) == (2, 0) and fwd.kwargs["softmax_scale"] == 0.25
    assert fwd.kwargs["leftpad_k"] is None and fwd.kwargs["k_new"] is None
    assert lse.shape == (4, 16) and torch.isfinite(lse).all()
    dout = torch.randn_like(q)
    dq, dk, dv = kern.backward(dout, q, k, v, out, lse, call)
    bwd = fa3.only("_flash_attn_backward")
    assert bwd.kwargs["deterministic"] is True and _window(bwd) == (2, 0)
    assert bwd.kwargs["sequed_q"] is None and bwd.kwargs["cu_seqlens_k"] is cu_q
    expected = library_backward(
        dout, q, k, v, out, lse, scale=0.25, causal=True, window=(2, 0), cu_seqlens_q=cu_q, cu_seqlens_k=cu_q
    )
    for mine, ref in zip((dq, dk, dv), expected):
        torch.testing.assert_close(mine, ref)


def test_kernel_empty_rows_and_no_dropout(fa3: Recorder) -> None:
    q, k, v = qkv(B=1, T=4)
    out, lse = Flash3Kernel().forward(q, k[:, :2], v[:, :2], KernelCall(scale=0.25))  # Tq 4 > Tk 2
    assert torch.isneginf(lse[..., :2]).all() and torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    with pytest.raises(UnsupportedFeatureError, match="does not support dropout"):
        Flash3Kernel().forward(q, k, v, KernelCall(scale=0.25, dropout_p=0.1, dropout_seed=1))


def test_kernel_speaks_fa3_v3_private_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: FA3 3.0.0 renamed ``window_size`` -> ``window_size_left/_right``, ``out`` -> ``out_``
    and (backward) ``causal`` -> ``is_causal``; the kernel passed 2.8.3's keywords and raised TypeError."""
    rec = Recorder()
    fake_cuda(monkeypatch, (9, 0))
    install_flash3(monkeypatch, rec, version="3.0.0")
    q, k, v = qkv(B=2, T=12)
    call = KernelCall(scale=0.3, causal=True, window=(3, 0))
    out, lse = Flash3Kernel().forward(q, k, v, call)
    fwd = rec.only("_flash_attn_forward")
    assert (fwd.kwargs["window_size_left"], fwd.kwargs["window_size_right"]) == (3, 0)
    assert fwd.kwargs["out_"] is None and fwd.kwargs["causal"] is True and lse.shape == (2, 4, 12)
    dout = torch.randn_like(q)
    dq, dk, dv = Flash3Kernel().backward(dout, q, k, v, out, lse, call)
    bwd = rec.only("_flash_attn_backward")
    assert bwd.kwargs["is_causal"] is True and bwd.kwargs["window_size_left"] == 3
    expected = library_backward(dout, q, k, v, out, lse, scale=0.3, causal=True, window=(3, 0))
    for mine, ref in zip((dq, dk, dv), expected):
        torch.testing.assert_close(mine, ref)


def test_parameter_names_reads_custom_ops() -> None:
    """``torch.library.custom_op`` objects: the decorated function's signature, else the op schema."""
    from olmo_attn.backends.flash3 import parameter_names, window_kwargs

    def fn(q, window_size_left=-1, window_size_right=-1):
        return q

    class CustomOpDef:  # what torch.library.custom_op returns: keeps the function as _init_fn
        _init_fn = staticmethod(fn)

        def __call__(self, *a, **kw):
            return fn(*a, **kw)

    assert window_kwargs(CustomOpDef(), (5, 0)) == {"window_size_left": 5, "window_size_right": 0}

    class Arg:
        def __init__(self, name: str):
            self.name = name

    class Schema:
        arguments = [Arg("q"), Arg("window_size")]

    class Opaque:  # no Python signature, only a schema
        __signature__ = None
        _opoverload = type("Op", (), {"_schema": Schema()})()

        def __call__(self, *a, **kw):
            return None

    Opaque.__call__.__signature__ = "not a signature"  # inspect.signature raises TypeError
    assert parameter_names(Opaque()) == frozenset({"q", "window_size"})
    assert window_kwargs(Opaque(), (1, 2)) == {"window_size": (1, 2)}
