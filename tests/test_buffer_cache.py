"""BufferCache: namespaced views over one shared storage."""

from __future__ import annotations

import pytest
import torch

from olmo_attn import BufferCache, RoPEConfig, RotaryEmbedding, YaRNRoPEScalingConfig


def test_fresh_cache_is_empty_default_namespace():
    cache = BufferCache()
    assert cache.namespace == ""
    assert len(cache) == 0 and list(cache) == []
    assert cache.get("x") is None
    with pytest.raises(KeyError):
        cache["x"]


def test_mutable_mapping_protocol():
    cache = BufferCache()
    t = torch.arange(3)
    cache["a"] = t
    assert cache["a"] is t and "a" in cache and len(cache) == 1
    assert dict(cache.items()) == {"a": t}
    del cache["a"]
    assert "a" not in cache and len(cache) == 0


def test_namespaces_are_isolated_views_over_shared_storage():
    root = BufferCache()
    a, b = root.with_namespace("a"), root.with_namespace("b")
    a["x"] = torch.ones(2)
    b["x"] = torch.zeros(3)
    assert a["x"].shape == (2,) and b["x"].shape == (3,)
    assert "x" not in root
    # a second view of the same namespace sees the first one's writes
    assert root.with_namespace("a")["x"] is a["x"]
    # a view of a view still writes the shared storage
    a.with_namespace("c")["y"] = torch.ones(1)
    assert "y" in root.with_namespace("c")
    assert root.namespaces() == ["a", "b", "c"]


def test_get_for_device_moves_and_restores():
    cache = BufferCache()
    assert cache.get_for_device("missing", torch.device("cpu")) is None
    t = torch.arange(4)
    cache["t"] = t
    assert cache.get_for_device("t", "cpu") is t  # already there: same object
    meta = cache.get_for_device("t", torch.device("meta"))
    assert meta.device.type == "meta" and cache["t"] is meta  # moved copy is stored


def test_iteration_snapshot_allows_writes():
    cache = BufferCache()
    cache["a"], cache["b"] = torch.ones(1), torch.ones(1)
    for key in cache:
        cache[key + "_copy"] = cache[key]
    assert sorted(cache) == ["a", "a_copy", "b", "b_copy"]


def test_rope_modules_share_buffers_only_when_identically_configured():
    cache = BufferCache()
    r1 = RoPEConfig().build(16, cache=cache)
    r2 = RoPEConfig().build(16, cache=cache)
    r3 = RoPEConfig(scaling=YaRNRoPEScalingConfig()).build(16, cache=cache)
    assert isinstance(r1, RotaryEmbedding)
    b1 = r1.get_buffers(8, "cpu")
    assert r2.get_buffers(8, "cpu").pos_sin.data_ptr() == b1.pos_sin.data_ptr()
    assert r3.get_buffers(8, "cpu").pos_sin.data_ptr() != b1.pos_sin.data_ptr()
    assert len(cache.namespaces()) == 2
    assert all(ns.startswith("RoPE_theta=500000_partial=1.0_scaling=") for ns in cache.namespaces())
