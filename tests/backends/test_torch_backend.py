"""TorchAttentionBackend against the float64 reference: every feature, forward and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference.attention as ref
import reference.twins as twins
from olmo_attn.backends.torch_backend import TorchAttentionBackend
from olmo_attn.exceptions import ConfigurationError, UnsupportedFeatureError
from olmo_attn.kv_cache import KVCacheManager, KVCacheOverflowError
from reference.kv_cache import kv_cache_attention

F64 = torch.float64


def _rand(*shape: int, dtype: torch.dtype = F64, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _qkv(B: int, T: int, Hq: int, Hkv: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        _rand(B, T, Hq, D, dtype=dtype, gen=g),
        _rand(B, T, Hkv, D, dtype=dtype, gen=g),
        _rand(B, T, Hkv, D, dtype=dtype, gen=g),
    )


def _budget(out: torch.Tensor, low: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    """CONFORMANCE.md: ``max|out-ref| <= 2 max|low-ref| + atol``, ``atol = 2 max|(ref+0.3-0.3)-ref|``."""
    r = ref64.to(F64)
    err = (out.to(F64) - r).abs().max().item()
    low_err = (low.to(F64) - r).abs().max().item()
    rr = r.to(out.dtype)
    atol = 2 * ((rr + 0.3 - 0.3).to(F64) - r).abs().max().item()
    return err, 2 * low_err + atol


def _low(q, k, v, *, scale, window, cu=None, cu_k=None, local_k_slice=None):
    """Plain torch computation in the input dtype (dense mask from the reference): the dtype's own error."""
    B, T, Hq, D = q.shape
    if cu is None and cu_k is None:
        kk, vv = k, v
        if local_k_slice is not None:
            kk, vv = k[:, local_k_slice], v[:, local_k_slice]
        allowed = torch.from_numpy(ref.allowed_mask(T, kk.shape[1], causal=True, window=window))
        qq = q
    else:
        kk = k.reshape(1, -1, *k.shape[2:])
        vv = v.reshape(1, -1, *v.shape[2:])
        if local_k_slice is not None:
            kk, vv = kk[:, local_k_slice], vv[:, local_k_slice]
        qq = q.reshape(1, B * T, Hq, D)
        allowed = torch.from_numpy(
            ref.allowed_mask(
                B * T, kk.shape[1], causal=True, window=window, cu_seqlens_q=cu, cu_seqlens_k=cu_k or cu
            )
        )
    G = Hq // kk.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kk.repeat_interleave(G, 2)) * scale
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv.repeat_interleave(G, 2))
    return out.reshape(B, T, Hq, D)


def _twin_grads(q, k, v, dout, **kw):
    qq, kk, vv = (t.detach().to(F64).requires_grad_(True) for t in (q, k, v))
    out, _ = twins.sdpa(qq, kk, vv, **kw)
    out.backward(dout.to(F64))
    return out.detach(), qq.grad, kk.grad, vv.grad


CASES = [
    # (B, T, Hq, Hkv, D, window, docs)
    (2, 37, 4, 4, 8, (-1, -1), None),  # MHA causal (SDPA)
    (2, 37, 4, 2, 8, (-1, -1), None),  # GQA causal (SDPA enable_gqa)
    (2, 37, 4, 1, 8, (6, 0), None),  # MQA + sliding window
    (1, 45, 2, 2, 16, (100, 0), None),  # window larger than the sequence
    (2, 33, 4, 2, 8, (-1, -1), [0, 1, 20, 33, 50, 66]),  # documents incl. a length-1 one, crossing rows
    (2, 33, 4, 2, 8, (4, 0), [0, 7, 7, 40, 66]),  # window + documents (with an empty document)
    (1, 300, 2, 1, 8, (70, 0), [0, 130, 131, 300]),  # several blocks, odd lengths
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}/{c[3]}w{c[5][0]}d{bool(c[6])}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_vs_reference(case, dtype):
    B, T, Hq, Hkv, D, window, docs = case
    q, k, v = _qkv(B, T, Hq, Hkv, D, dtype)
    scale = 0.37
    be = TorchAttentionBackend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, window_size=window, scale=scale)
    kw = {} if docs is None else {"cu_doc_lens": torch.tensor(docs, dtype=torch.int32)}
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = be((qg, kg, vg), **kw)
    assert out.shape == (B, T, Hq, D) and out.dtype == dtype
    dout = _rand(B, T, Hq, D, dtype=dtype, gen=torch.Generator().manual_seed(1))
    out.backward(dout)
    ref_kw = dict(scale=scale, window=window, cu_doc_lens=docs)
    r_out, r_dq, r_dk, r_dv = _twin_grads(q, k, v, dout, **ref_kw)
    np_out, _ = ref.sdpa(q.to(F64).numpy(), k.to(F64).numpy(), v.to(F64).numpy(), **ref_kw)
    assert np.abs(r_out.numpy() - np_out).max() < 1e-12  # twin and NumPy agree
    if dtype == torch.float64:
        for got, want in ((out, r_out), (qg.grad, r_dq), (kg.grad, r_dk), (vg.grad, r_dv)):
            assert (got.detach() - want).abs().max().item() < 1e-10
        return
    # float32: the conformance budget, output and gradients against a plain float32 computation
    ql, kl, vl = (t.clone().requires_grad_(True) for t in (q, k, v))
    low = _low(ql, kl, vl, scale=scale, window=window, cu=docs)
    low.backward(dout)
    for got, lo, want in (
        (out, low, r_out),
        (qg.grad, ql.grad, r_dq),
        (kg.grad, kl.grad, r_dk),
        (vg.grad, vl.grad, r_dv),
    ):
        err, bound = _budget(got.detach(), lo.detach(), want)
        assert err <= bound, (err, bound)


def test_kv_cache_decoding_matches_reference():
    B, Hq, Hkv, D, S = 2, 4, 2, 8, 24
    window = (5, 0)
    be = TorchAttentionBackend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, window_size=window)
    m = KVCacheManager(B, S, Hkv, D, dtype=F64)
    lp = torch.tensor([0, 3], dtype=torch.int32)
    m.record_leftpad(lp)
    kc = np.zeros((B, S, Hkv, D))
    vc = np.zeros((B, S, Hkv, D))
    pos = 0
    g = torch.Generator().manual_seed(3)
    for n in (7, 1, 1, 4):
        q, k, v = (_rand(B, n, h, D, gen=g) for h in (Hq, Hkv, Hkv))
        out = be((q, k, v), kv_cache_manager=m)
        m.update_seqlen(n)
        r_out, _, kc, vc = kv_cache_attention(
            q.numpy(),
            k.numpy(),
            v.numpy(),
            kc,
            vc,
            cache_seqlens=pos,
            cache_leftpad=lp.numpy(),
            window=window,
        )
        pos += n
        assert np.abs(out.numpy() - r_out).max() < 1e-10
        assert np.array_equal(m.k_cache.numpy(), kc) and np.array_equal(m.v_cache.numpy(), vc)
    assert int(m.cache_seqlens) == pos
    # a prefill leaves indices below each row's left padding zero
    assert m.k_cache[1, :3].abs().sum() == 0


def test_kv_cache_overflow_is_typed():
    be = TorchAttentionBackend(head_dim=8, n_heads=2)
    m = KVCacheManager(1, 4, 2, 8, dtype=torch.float32)
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(KVCacheOverflowError, match="max_seq_len=4"):
        be((q, q, q), kv_cache_manager=m)


def test_packed_qkv_matches_unpacked():
    B, T, H, D = 2, 29, 4, 8
    qkv = torch.randn(B, T, 3, H, D, dtype=F64)
    be = TorchAttentionBackend(head_dim=D, n_heads=H, window_size=(5, 0))
    out = be(qkv)
    r, _ = ref.sdpa(*(qkv[:, :, i].numpy() for i in range(3)), window=(5, 0))
    assert np.abs(out.numpy() - r).max() < 1e-10


def test_backend_refuses_bad_heads():
    with pytest.raises(ConfigurationError, match="n_kv_heads"):
        TorchAttentionBackend(head_dim=8, n_heads=6, n_kv_heads=4)


def test_torch_has_no_unsupported_features():
    for f in ("sliding_window", "documents", "documents_qk", "kv_cache", "packed_qkv", "dropout"):
        TorchAttentionBackend.assert_supports(f)
    with pytest.raises(UnsupportedFeatureError):
        TorchAttentionBackend.assert_supports("deterministic")
