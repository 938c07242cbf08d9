"""KVCacheManager and leftpad_from_attention_mask."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from olmo_attn.backends.torch_backend import TorchAttentionBackend
from olmo_attn.kv_cache import KVCacheManager, KVCacheOverflowError, leftpad_from_attention_mask
from reference.kv_cache import generate_reference


def test_buffers_shapes_dtypes_and_not_persistent():
    m = KVCacheManager(3, 10, 2, 4, device="cpu")
    assert m.k_cache.shape == m.v_cache.shape == (3, 10, 2, 4)
    assert m.k_cache.dtype == torch.bfloat16  # OLMo-core's default
    assert m.cache_leftpad.shape == (3,) and m.cache_leftpad.dtype == torch.int32
    assert m.cache_seqlens.shape == () and m.cache_seqlens.dtype == torch.int32
    assert all(t.abs().sum() == 0 for t in (m.k_cache, m.v_cache, m.cache_leftpad, m.cache_seqlens))
    assert m.state_dict() == {}
    assert dict(m.named_buffers()).keys() == {"k_cache", "v_cache", "cache_leftpad", "cache_seqlens"}
    assert KVCacheManager(1, 2, 1, 4, dtype=torch.float16).v_cache.dtype == torch.float16


def test_record_update_position_zero():
    m = KVCacheManager(2, 8, 1, 4, dtype=torch.float32)
    m.record_leftpad(torch.tensor([1, 3]))
    m.record_leftpad(None)  # keeps the recorded value
    assert m.cache_leftpad.tolist() == [1, 3]
    m.update_seqlen(5)
    assert m.current_position() is m.cache_seqlens and int(m.cache_seqlens) == 5 and m.seqlen == 5
    m.k_cache.fill_(1.0)
    m.zero_cache()
    assert int(m.cache_seqlens) == 0 and m.cache_leftpad.tolist() == [0, 0] and m.k_cache.abs().sum() == 0


def test_reuse_reset_and_reallocate_frees_old_buffers():
    m = KVCacheManager(2, 8, 1, 4, dtype=torch.float32)
    assert m.is_reusable(2, 8) and m.is_reusable(2, 5)
    assert not m.is_reusable(3, 8) and not m.is_reusable(2, 9)
    old = m.k_cache
    m.k_cache.fill_(2.0)
    m.update_seqlen(3)
    m.reset(2, 6)  # reusable: zeroed in place
    assert m.k_cache is old and old.abs().sum() == 0 and m.seqlen == 0
    ref = weakref.ref(old)
    del old
    m.reset(4, 16)  # not reusable: reallocated
    gc.collect()
    assert ref() is None  # the old storage is gone
    assert m.k_cache.shape == (4, 16, 1, 4) and m.cache_leftpad.shape == (4,)
    assert m.k_cache.dtype == torch.float32 and m.state_dict() == {}
    assert m.max_seq_len == 16 and m.batch_size == 4


def test_overflow_is_a_typed_error_before_writing():
    m = KVCacheManager(1, 4, 1, 2, dtype=torch.float32)
    k = torch.ones(1, 3, 1, 2)
    m.append(k, k)
    m.update_seqlen(3)
    with pytest.raises(KVCacheOverflowError, match=r"max_seq_len=4.*reset\(batch_size=1, max_seq_len=5\)"):
        m.append(k[:, :2], k[:, :2])
    assert m.k_cache[0, 3].abs().sum() == 0  # nothing written
    with pytest.raises(KVCacheOverflowError):
        m.update_seqlen(2)
    assert issubclass(KVCacheOverflowError, ValueError)


def test_prefill_leaves_left_padding_zero_and_decode_writes_all_rows():
    m = KVCacheManager(2, 6, 1, 1, dtype=torch.float32)
    m.record_leftpad(torch.tensor([0, 2], dtype=torch.int32))
    k = torch.arange(1, 9, dtype=torch.float32).view(2, 4, 1, 1)
    assert m.append(k, k) == 0
    m.update_seqlen(4)
    assert m.k_cache[:, :, 0, 0].tolist() == [[1, 2, 3, 4, 0, 0], [0, 0, 7, 8, 0, 0]]
    step = torch.tensor([[[[9.0]]], [[[10.0]]]])
    assert m.append(step, step) == 4
    assert m.k_cache[:, 4, 0, 0].tolist() == [9, 10]


def test_constructor_and_leftpad_errors():
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        KVCacheManager(1, 0, 1, 4)
    with pytest.raises(TypeError, match="floating-point"):
        KVCacheManager(1, 4, 1, 4, dtype=torch.int32)
    m = KVCacheManager(2, 4, 1, 4)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        m.record_leftpad(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        m.record_leftpad(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="same shape"):
        m.append(torch.zeros(2, 1, 1, 4), torch.zeros(2, 2, 1, 4))


def test_leftpad_from_attention_mask():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]])
    lp = leftpad_from_attention_mask(mask)
    assert lp.dtype == torch.int32 and lp.tolist() == [0, 2, 4, 1]
    assert leftpad_from_attention_mask(mask.bool()).tolist() == [0, 2, 4, 1]
    with pytest.raises(ValueError, match="row 1 is not prefix"):
        leftpad_from_attention_mask(torch.tensor([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        leftpad_from_attention_mask(torch.ones(4))


@pytest.mark.parametrize("window", [(-1, -1), (3, 0)])
def test_generation_loop_matches_reference_and_cache_free_forward(window):
    """Left-padded prefill + decode equals the reference loop, and each row's cache-free forward."""
    B, T, P, Hq, Hkv, D = 3, 14, 8, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    attn_mask = torch.ones(B, T, dtype=torch.bool)
    attn_mask[1, :2] = False
    attn_mask[2, :5] = False
    leftpad = leftpad_from_attention_mask(attn_mask[:, :P])
    be = TorchAttentionBackend(head_dim=D, n_heads=Hq, n_kv_heads=Hkv, window_size=window)
    m = KVCacheManager(B, 16, Hkv, D, dtype=torch.float64)
    m.record_leftpad(leftpad)
    outs = [be((q[:, :P], k[:, :P], v[:, :P]), kv_cache_manager=m)]
    m.update_seqlen(P)
    for t in range(P, T, 2):
        outs.append(be((q[:, t : t + 2], k[:, t : t + 2], v[:, t : t + 2]), kv_cache_manager=m))
        m.update_seqlen(2)
    out = torch.cat(outs, 1)
    r_out, r_cache = generate_reference(
        q.numpy(),
        k.numpy(),
        v.numpy(),
        prompt_len=P,
        cache_leftpad=leftpad.numpy(),
        max_seq_len=16,
        decode_step=2,
        window=window,
    )
    assert np.abs(out.numpy() - r_out).max() < 1e-10
    assert np.array_equal(m.k_cache.numpy(), r_cache.k_cache)
    for b, lp in enumerate(leftpad.tolist()):
        free = be((q[b : b + 1, lp:], k[b : b + 1, lp:], v[b : b + 1, lp:]))
        assert (out[b : b + 1, lp:] - free).abs().max() < 1e-10
        assert (out[b, :lp] == 0).all()
