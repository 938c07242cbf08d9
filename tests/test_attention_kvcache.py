"""Attention with a KV cache : prefill + decode equals the cache-free
forward, left padding shifts nothing, cache contents and positions, against
``reference.modules.attention_forward_cached``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olmo_attn import Attention, GateConfig, LayerNormConfig, RoPEConfig
from olmo_attn.kv_cache import KVCacheManager, KVCacheOverflowError, leftpad_from_attention_mask
from reference import modules as ref_modules
from reference.kv_cache import KVCache

D_MODEL = 32

CONFIGS = {
    "mha": dict(n_heads=4),
    "gqa_rope": dict(n_heads=4, n_kv_heads=2, rope=RoPEConfig(theta=10_000)),
    "mqa_complex_gate_norm": dict(
        n_heads=4,
        n_kv_heads=1,
        rope=RoPEConfig(name="complex", theta=10_000),
        gate=GateConfig(),
        qk_norm=LayerNormConfig(name="rms", dtype="float64"),
    ),
    "swa_rope": dict(n_heads=4, n_kv_heads=2, window_size=5, rope=RoPEConfig(theta=10_000)),
}


def _attn(name: str, dtype=torch.float64) -> Attention:
    torch.manual_seed(0)
    return Attention(d_model=D_MODEL, dtype=dtype, backend="torch", **CONFIGS[name])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_and_decode_equal_cache_free_forward(name, batch):
    m = _attn(name)
    T, prompt = 13, 8
    x = torch.randn(batch, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        m.init_kv_cache_manager(batch, 16)
        assert m.kv_cache_manager.k_cache.dtype == torch.float64  # follows the parameters
        outs = [m(x[:, :prompt], cache_leftpad=torch.zeros(batch, dtype=torch.int32))]
        outs.append(m(x[:, prompt : prompt + 2]))  # a two-token step
        outs += [m(x[:, t : t + 1]) for t in range(prompt + 2, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    assert m.kv_cache_manager.seqlen == T and int(m.kv_cache_manager.current_position()) == T


@pytest.mark.parametrize("name", ["gqa_rope", "swa_rope", "mqa_complex_gate_norm"])
def test_cached_forward_matches_reference(name):
    m = _attn(name)
    B, prompt = 2, 6
    leftpad = torch.tensor([0, 2], dtype=torch.int32)
    x = torch.randn(B, prompt + 3, D_MODEL, dtype=torch.float64)
    weights = {k: v.numpy() for k, v in m.state_dict().items()}
    opts = dict(CONFIGS[name])
    ref_opts: dict = {"n_heads": opts["n_heads"], "n_kv_heads": opts.get("n_kv_heads")}
    if "rope" in opts:
        ref_opts["rope"] = {"name": opts["rope"].name.value, "theta": opts["rope"].theta}
    if "gate" in opts:
        ref_opts["gate"] = "headwise"
    if "qk_norm" in opts:
        ref_opts["qk_norm"] = "rms"
    if "window_size" in opts:
        ref_opts["window_size"] = opts["window_size"]
    cache = KVCache.empty(B, 12, m.n_kv_heads, m.head_dim)
    m.init_kv_cache_manager(B, 12)
    with torch.no_grad():
        got = m(x[:, :prompt], cache_leftpad=leftpad)
        want, cache = ref_modules.attention_forward_cached(
            weights, x[:, :prompt].numpy(), cache, cache_leftpad=leftpad.numpy(), **ref_opts
        )
        valid = (np.arange(prompt)[None, :] >= leftpad.numpy()[:, None])[..., None]
        np.testing.assert_allclose(
            np.where(valid, got.numpy(), 0), np.where(valid, want, 0), rtol=0, atol=1e-12
        )
        for t in range(prompt, prompt + 3):
            got = m(x[:, t : t + 1])
            want, cache = ref_modules.attention_forward_cached(
                weights, x[:, t : t + 1].numpy(), cache, **ref_opts
            )
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.kv_cache_manager.k_cache.numpy(), cache.k_cache, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rope", [None, RoPEConfig(theta=10_000), RoPEConfig(name="complex", theta=10_000)])
def test_leftpad_shift_equivalence(rope):
    """The same 7 tokens left-padded by 3 and by 8: identical outputs on the valid positions and
    identical decode steps (RoPE positions shift uniformly, which attention cannot see), and equal
    to the unpadded cache-free forward."""
    torch.manual_seed(0)
    m = Attention(d_model=D_MODEL, n_heads=4, n_kv_heads=2, rope=rope, dtype=torch.float64, backend="torch")
    content = torch.randn(1, 7, D_MODEL, dtype=torch.float64)
    new_tok = torch.randn(1, 1, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        plain = m(torch.cat([content, new_tok], 1))
        results = []
        for pad in (3, 8):
            padded = torch.cat([torch.zeros(1, pad, D_MODEL, dtype=torch.float64), content], 1)
            m.init_kv_cache_manager(1, 100)
            prefill = m(padded, cache_leftpad=torch.tensor([pad], dtype=torch.int32))[:, pad:]
            decode = m(new_tok)
            results.append((prefill, decode))
            m.kv_cache_manager = None
    (p3, d3), (p8, d8) = results
    torch.testing.assert_close(p3, p8, rtol=0, atol=1e-12)
    torch.testing.assert_close(d3, d8, rtol=0, atol=1e-12)
    torch.testing.assert_close(p3, plain[:, :7], rtol=0, atol=1e-12)
    torch.testing.assert_close(d3, plain[:, 7:], rtol=0, atol=1e-12)


def test_cache_write_positions_and_leftpad_from_mask():
    torch.manual_seed(0)
    m = Attention(d_model=D_MODEL, n_heads=4, backend="torch")
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, :5] = False
    leftpad = leftpad_from_attention_mask(mask)
    assert leftpad.tolist() == [3, 5]
    m.init_kv_cache_manager(2, 100)
    mgr = m.kv_cache_manager
    with torch.no_grad():
        m(torch.randn(2, 10, D_MODEL), cache_leftpad=leftpad)
        assert mgr.cache_leftpad.tolist() == [3, 5] and mgr.seqlen == 10
        for row, lp in enumerate((3, 5)):
            for cache in (mgr.k_cache, mgr.v_cache):
                assert (cache[row, :lp] == 0).all() and (cache[row, lp:10] != 0).any(dim=(-1, -2)).all()
                assert (cache[row, 10:] == 0).all()
        before = mgr.k_cache.clone()
        m(torch.randn(2, 1, D_MODEL))
    assert mgr.seqlen == 11
    assert torch.equal(mgr.k_cache[:, :10], before[:, :10]) and torch.equal(
        mgr.k_cache[:, 11:], before[:, 11:]
    )
    assert (mgr.k_cache[:, 10] != 0).any(dim=(-1, -2)).all()
    assert mgr.cache_leftpad.tolist() == [3, 5]  # the recorded padding persists


def test_kv_cache_manager_lifecycle_and_errors():
    m = Attention(d_model=D_MODEL, n_heads=4, backend="torch")
    m.init_kv_cache_manager(1, 4, dtype=torch.bfloat16)
    assert (
        isinstance(m.kv_cache_manager, KVCacheManager) and m.kv_cache_manager.k_cache.dtype == torch.bfloat16
    )
    assert "kv_cache_manager" not in "".join(m.state_dict())  # non-persistent buffers
    with torch.no_grad():
        m(torch.randn(1, 3, D_MODEL))
        with pytest.raises(KVCacheOverflowError, match="max_seq_len=4"):
            m(torch.randn(1, 2, D_MODEL))
        with pytest.raises(ValueError, match="cache_leftpad must have shape"):
            m(torch.randn(1, 1, D_MODEL), cache_leftpad=torch.zeros(2, dtype=torch.int32))
        m.kv_cache_manager = None  # caching off again
        assert m(torch.randn(1, 6, D_MODEL)).shape == (1, 6, D_MODEL)
    m.init_kv_cache_manager(1, 8)
    with pytest.raises(ValueError, match="cu_doc_lens"):
        m(torch.randn(1, 4, D_MODEL), cu_doc_lens=torch.tensor([0, 2, 4], dtype=torch.int32))


def test_kv_cache_gradients_reach_the_queries():
    torch.manual_seed(0)
    m = Attention(d_model=D_MODEL, n_heads=4, rope=RoPEConfig(), backend="torch", dtype=torch.float64)
    m.init_kv_cache_manager(1, 8)
    x = torch.randn(1, 4, D_MODEL, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
