"""reference.kv_cache: the hand fixture, and prefill + decode == cache-free forward."""

import numpy as np
import pytest

from fixtures import kv_cache_cases as fx
from reference.attention import attention
from reference.kv_cache import KVCache, generate_reference, kv_cache_attention


def test_fixture_prefill_then_decode():
    v = np.array(fx.PREFILL_V).reshape(2, 3, 1, 1)
    q = np.zeros((2, 3, 1, 1))
    cache = KVCache.empty(2, 4, 1, 1)
    out, lse, cache = cache.step(q, v, v, cache_leftpad=fx.LEFTPAD)
    np.testing.assert_array_equal(cache.v_cache[:, :, 0, 0], fx.CACHE_AFTER_PREFILL)
    np.testing.assert_array_equal(cache.k_cache[:, :, 0, 0], fx.CACHE_AFTER_PREFILL)
    np.testing.assert_allclose(out[:, :, 0, 0], fx.PREFILL_OUT, rtol=1e-14)
    np.testing.assert_allclose(lse[:, 0], fx.PREFILL_LSE, rtol=1e-14, atol=1e-15)
    assert cache.cache_seqlens == 3

    v_new = np.full((2, 1, 1, 1), fx.DECODE_V)
    out, _, after = cache.step(np.zeros((2, 1, 1, 1)), v_new, v_new)
    np.testing.assert_array_equal(after.v_cache[:, :, 0, 0], fx.CACHE_AFTER_DECODE)
    np.testing.assert_allclose(out[:, 0, 0, 0], fx.DECODE_OUT, rtol=1e-14)
    out_w, _, _ = cache.step(np.zeros((2, 1, 1, 1)), v_new, v_new, window=(1, 0))
    np.testing.assert_allclose(out_w[:, 0, 0, 0], fx.DECODE_OUT_WINDOW_2, rtol=1e-14)


def test_inputs_are_not_modified_and_overflow_raises():
    rng = np.random.default_rng(0)
    k_cache, v_cache = np.zeros((1, 4, 1, 2)), np.zeros((1, 4, 1, 2))
    new = rng.standard_normal((1, 2, 1, 2))
    _, _, k2, _ = kv_cache_attention(new, new, new, k_cache, v_cache, cache_seqlens=1)
    assert not k_cache.any() and k2[:, 1:3].any()
    with pytest.raises(ValueError, match="does not fit"):
        kv_cache_attention(new, new, new, k_cache, v_cache, cache_seqlens=3)


@pytest.mark.parametrize("window", [(-1, -1), (3, 0)])
@pytest.mark.parametrize("decode_step", [1, 3])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_generation_equals_cache_free_forward_on_unpadded_content(window, decode_step, heads):
    """Valid positions of a left-padded prefill + decode equal a forward per row."""
    rng = np.random.default_rng(1)
    Hq, Hkv = heads
    B, T, D = 3, 12, 4
    leftpad = np.array([0, 2, 5])
    q, k, v = (
        rng.standard_normal((B, T, Hq, D)),
        rng.standard_normal((B, T, Hkv, D)),
        rng.standard_normal((B, T, Hkv, D)),
    )
    out, cache = generate_reference(
        q, k, v, prompt_len=7, cache_leftpad=leftpad, max_seq_len=16, decode_step=decode_step, window=window
    )
    assert cache.cache_seqlens == T
    for b, lp in enumerate(leftpad):
        want, _ = attention(q[b : b + 1, lp:], k[b : b + 1, lp:], v[b : b + 1, lp:], window=window)
        np.testing.assert_allclose(out[b : b + 1, lp:], want, rtol=1e-13, atol=1e-14)
        np.testing.assert_array_equal(out[b, :lp], 0.0)
        np.testing.assert_array_equal(cache.k_cache[b, :lp], 0.0)
        np.testing.assert_array_equal(cache.k_cache[b, lp:T], k[b, lp:])
        np.testing.assert_array_equal(cache.k_cache[b, T:], 0.0)


def test_decode_writes_exactly_one_slot_per_step():
    """Each decode step changes only index cache_seqlens, in every row."""
    rng = np.random.default_rng(2)
    cache = KVCache.empty(2, 10, 1, 2)
    x = rng.standard_normal((2, 4, 1, 2))
    _, _, cache = cache.step(x, x, x)
    for _ in range(3):
        y = rng.standard_normal((2, 1, 1, 2))
        _, _, new = cache.step(y, y, y)
        p = cache.cache_seqlens
        assert new.cache_seqlens == p + 1
        np.testing.assert_array_equal(new.k_cache[:, :p], cache.k_cache[:, :p])
        np.testing.assert_array_equal(new.k_cache[:, p], y[:, 0])
        np.testing.assert_array_equal(new.k_cache[:, p + 1 :], 0.0)
        cache = new
