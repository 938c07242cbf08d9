"""Load balancers: worked examples, errors, inverses and properties (no process group needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_attn.cp.errors import ShardingArgumentError, ShardingError
from olmo_attn.cp.load_balancers import (
    RingAttentionLlama3LoadBalancer,
    RingAttentionLoadBalancer,
    RingAttentionLoadBalancerType,
    RingAttentionZigZagLoadBalancer,
    UlyssesLoadBalancer,
)
from reference import cp_layouts

ZZ = RingAttentionZigZagLoadBalancer
L3 = RingAttentionLlama3LoadBalancer
UL = UlyssesLoadBalancer


def _all(cls, W):
    return [cls(cp_rank=r, cp_world_size=W) for r in range(W)]


def _x(n: int) -> torch.Tensor:
    return torch.arange(n)[None]  # [1, n]


# ---------------------------------------------------------------------------------------------- types


def test_type_enum_and_build_for():
    assert [m.value for m in RingAttentionLoadBalancerType] == ["zig_zag", "llama3", "ulysses"]
    assert RingAttentionLoadBalancerType("llama3") == "llama3"
    for name, cls in (("zig_zag", ZZ), ("llama3", L3), ("ulysses", UL)):
        lb = RingAttentionLoadBalancerType(name).build_for(cp_rank=1, cp_world_size=4)
        assert type(lb) is cls and lb.cp_rank == 1 and lb.cp_world_size == 4


def test_build_from_a_mesh_reads_rank_and_size(monkeypatch):
    import torch.distributed as dist

    class Mesh:
        def get_group(self):
            return "pg"

    monkeypatch.setattr(dist, "get_rank", lambda pg: 3 if pg == "pg" else -1)
    monkeypatch.setattr(dist, "get_world_size", lambda pg: 8 if pg == "pg" else -1)
    lb = RingAttentionLoadBalancerType.zig_zag.build(Mesh())
    assert (lb.cp_rank, lb.cp_world_size) == (3, 8)


def test_base_class_is_abstract_and_ranks_are_checked():
    with pytest.raises(TypeError):
        RingAttentionLoadBalancer(cp_rank=0, cp_world_size=2)  # type: ignore[abstract]
    with pytest.raises(ShardingArgumentError, match="cp_rank=2"):
        ZZ(cp_rank=2, cp_world_size=2)
    with pytest.raises(ShardingArgumentError, match="cp_world_size"):
        UL(cp_rank=0, cp_world_size=0)


# ---------------------------------------------------------------------------------------------- zig-zag


def test_zigzag_padding():
    padded, n = ZZ(cp_rank=0, cp_world_size=4).pad(_x(6), 1, -1)
    assert padded.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]] and n == 2


def test_zigzag_shard():
    out = [lb.batch_shard(inputs=[_x(8)], seq_dims=[1])[0].tolist() for lb in _all(ZZ, 4)]
    assert out == [[[0, 7]], [[1, 6]], [[2, 5]], [[3, 4]]]


def test_zigzag_shard_with_padding():
    out = [lb.batch_shard(inputs=[_x(6)], seq_dims=[1], pad_values=[-1])[0].tolist() for lb in _all(ZZ, 4)]
    assert out[0] == [[0, -1]] and out[3] == [[3, 4]]


def test_zigzag_shard_by_document():
    res = [
        lb.batch_shard_by_document(inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 8, 12]))
        for lb in _all(ZZ, 2)
    ]
    assert res[0][0][0].tolist() == [[0, 1, 6, 7, 8, 11]]
    assert res[1][0][0].tolist() == [[2, 3, 4, 5, 9, 10]]
    for _, meta in res:
        assert meta["cu_doc_lens"].tolist() == [0, 4, 6] and meta["max_doc_len"] == 4


def test_zigzag_shard_by_document_with_padding():
    (out,), meta = ZZ(cp_rank=0, cp_world_size=2).batch_shard_by_document(
        inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 7, 10]), pad_values=[-1]
    )
    assert out.tolist() == [[0, 1, 6, -1, 7, -1]]
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6]
    assert meta["cu_doc_lens"].dtype == torch.int64 and meta["cu_doc_lens"].device.type == "cpu"
    assert isinstance(meta["max_doc_len"], int)


def test_zigzag_by_document_length_multiple_adds_a_trailing_document():
    lb = ZZ(cp_rank=1, cp_world_size=2)
    (out,), meta = lb.batch_shard_by_document(
        inputs=[_x(12)],
        seq_dims=[1],
        cu_doc_lens=torch.tensor([0, 8, 12]),
        pad_values=[-1],
        length_multiple=4,
    )
    assert out.tolist() == [[2, 3, 4, 5, 9, 10, -1, -1]]
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6, 8] and meta["max_doc_len"] == 4
    (_,), meta = lb.batch_shard_by_document(
        inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 8, 12]), length_multiple=3
    )
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6, 6]  # zero-length pseudo-document


def test_zigzag_errors():
    lb = ZZ(cp_rank=0, cp_world_size=4)
    with pytest.raises(ShardingError, match="pad_values"):
        lb.batch_shard(inputs=[_x(6)], seq_dims=[1])
    with pytest.raises(ShardingError, match="length_multiple=6"):
        lb.batch_shard(inputs=[_x(8)], seq_dims=[1], length_multiple=6)
    with pytest.raises(ShardingArgumentError, match="same length"):
        lb.batch_shard(inputs=[_x(8), _x(16)], seq_dims=[1, 1])
    with pytest.raises(AssertionError):  # OLMo-core asserts; ours is also a ValueError
        lb.batch_shard(inputs=[_x(8)], seq_dims=[1, 0])
    with pytest.raises(ValueError, match="pad_values"):
        lb.batch_shard(inputs=[_x(8)], seq_dims=[1], pad_values=[0, 0])
    with pytest.raises(RuntimeError, match="document 0 has length 7"):
        ZZ(cp_rank=0, cp_world_size=2).batch_shard_by_document(
            inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 7, 12])
        )
    with pytest.raises(RuntimeError, match="must provide a 'pad_value'"):
        ZZ(cp_rank=0, cp_world_size=2).batch_shard_by_document(
            inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 8, 12]), length_multiple=4
        )


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([[0, 4]]), "1-D"),
        (torch.tensor([1, 4]), "start with 0"),
        (torch.tensor([0, 6, 4]), "non-decreasing"),
        (torch.tensor([0.0, 4.0]), "integer"),
    ],
)
def test_cu_doc_lens_validation(cu, match):
    for lb in (
        ZZ(cp_rank=0, cp_world_size=2),
        L3(cp_rank=0, cp_world_size=2),
        UL(cp_rank=0, cp_world_size=2),
    ):
        with pytest.raises(RuntimeError, match=match):
            lb.batch_shard_by_document(inputs=[_x(4)], seq_dims=[1], cu_doc_lens=cu, pad_values=[0])


def test_cu_doc_lens_must_be_on_cpu(monkeypatch):
    cu = torch.tensor([0, 4])
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("meta")))
    with pytest.raises(RuntimeError, match="CPU"):
        ZZ(cp_rank=0, cp_world_size=2).shard_index_by_document(cu)


def test_negative_seq_dims_are_normalised():
    x = torch.arange(16).view(2, 8)
    lb = ZZ(cp_rank=1, cp_world_size=2)
    assert torch.equal(
        lb.batch_shard(inputs=[x], seq_dims=[-1])[0], lb.batch_shard(inputs=[x], seq_dims=[1])[0]
    )


def test_outputs_are_contiguous_and_dtypes_kept():
    x = torch.randn(8, 3).t()  # [3, 8], non-contiguous
    (out,) = ZZ(cp_rank=0, cp_world_size=2).batch_shard(inputs=[x], seq_dims=[1])
    assert out.is_contiguous() and out.dtype == x.dtype and out.shape == (3, 4)
    (b,) = UL(cp_rank=1, cp_world_size=2).batch_shard(
        inputs=[torch.ones(1, 5, dtype=torch.bool)], seq_dims=[1], pad_values=[False]
    )
    assert b.dtype == torch.bool and b.tolist() == [[True, True, False]]


# ---------------------------------------------------------------------------------------------- llama3


def test_llama3_metadata_example():
    res = [
        lb.batch_shard_by_document(inputs=[_x(16)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 3, 10, 16]))
        for lb in _all(L3, 2)
    ]
    (o0,), m0 = res[0]
    (o1,), m1 = res[1]
    assert o0.tolist() == [list(range(8))] and o1.tolist() == [list(range(8, 16))]
    assert m0["cu_doc_lens_q"].tolist() == [0, 3, 8] and m0["cu_doc_lens_k"].tolist() == [0, 3, 8]
    assert m0["local_k_slice"] == slice(0, 8)
    assert m1["cu_doc_lens_q"].tolist() == [0, 2, 8] and m1["cu_doc_lens_k"].tolist() == [0, 7, 13]
    assert m1["local_k_slice"] == slice(3, 16) and m1["max_doc_len_q"] == 6 and m1["max_doc_len_k"] == 7


def test_llama3_pads_as_intended_with_a_synthetic_document():
    """The reference's sign bug never pads; ours appends one padding document (N=10, W=4 -> 12)."""
    res = [
        lb.batch_shard_by_document(
            inputs=[_x(10)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 6, 10]), pad_values=[-1]
        )
        for lb in _all(L3, 4)
    ]
    assert [o.tolist() for (o,), _ in res] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9, -1, -1]]]
    m3 = res[3][1]
    assert m3["cu_doc_lens_q"].tolist() == [0, 1, 3] and m3["cu_doc_lens_k"].tolist() == [0, 4, 6]
    assert m3["local_k_slice"] == slice(6, 12)
    # with length_multiple: total padded to a multiple of length_multiple * W
    (o,), m = L3(cp_rank=0, cp_world_size=2).batch_shard_by_document(
        inputs=[_x(10)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 6, 10]), pad_values=[0], length_multiple=4
    )
    assert o.shape == (1, 8) and m["cu_doc_lens_q"].tolist() == [0, 6, 8]


def test_llama3_plain_sequences_are_contiguous_shards():
    """Without documents llama3 keeps [r·L, (r+1)·L) of every row, padded at the end; unshard inverts it."""
    x = _x(10)
    shards = [lb.batch_shard(inputs=[x], seq_dims=[1], pad_values=[-1])[0] for lb in _all(L3, 4)]
    assert [s.tolist() for s in shards] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9, -1, -1]]]
    back = L3(cp_rank=0, cp_world_size=4).unshard(shards, seq_dim=1, length=10)
    assert torch.equal(back, x)
    with pytest.raises(RuntimeError, match="no pad_values"):
        L3(cp_rank=0, cp_world_size=4).batch_shard(inputs=[x], seq_dims=[1])


def test_llama3_errors():
    lb = L3(cp_rank=0, cp_world_size=2)
    with pytest.raises(RuntimeError, match="exactly the packed documents"):
        lb.batch_shard_by_document(
            inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 10]), pad_values=[0]
        )
    with pytest.raises(RuntimeError, match="no pad_values"):
        lb.batch_shard_by_document(inputs=[_x(9)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 9]))


# ---------------------------------------------------------------------------------------------- Ulysses


def test_ulysses_padding_and_shard():
    assert UL(cp_rank=0, cp_world_size=4).pad(_x(6), 1, -1)[0].tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]]
    out = [lb.batch_shard(inputs=[_x(8)], seq_dims=[1])[0].tolist() for lb in _all(UL, 4)]
    assert out == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    out = [lb.batch_shard(inputs=[_x(6)], seq_dims=[1], pad_values=[-1])[0].tolist() for lb in _all(UL, 4)]
    assert out == [[[0, 1]], [[2, 3]], [[4, 5]], [[-1, -1]]]


def test_ulysses_shard_by_document():
    res = [
        lb.batch_shard_by_document(inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 8, 12]))
        for lb in _all(UL, 2)
    ]
    assert res[0][0][0].tolist() == [list(range(6))] and res[1][0][0].tolist() == [list(range(6, 12))]
    assert all(m["cu_doc_lens"].tolist() == [0, 8, 12] for _, m in res)


def test_ulysses_shard_by_document_with_padding():
    res = [
        lb.batch_shard_by_document(
            inputs=[_x(10)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 6, 10]), pad_values=[-1]
        )
        for lb in _all(UL, 4)
    ]
    assert [o.tolist() for (o,), _ in res] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9, -1, -1]]]
    assert all(m["cu_doc_lens"].tolist() == [0, 6, 10, 12] for _, m in res)
    assert res[0][1]["max_doc_len"] == 6


def test_ulysses_errors():
    lb = UL(cp_rank=0, cp_world_size=4)
    with pytest.raises(RuntimeError, match="length_multiple=6"):
        lb.batch_shard(inputs=[_x(12)], seq_dims=[1], length_multiple=6)
    with pytest.raises(RuntimeError, match="pad_values"):
        lb.batch_shard(inputs=[_x(6)], seq_dims=[1])
    with pytest.raises(RuntimeError, match="cover exactly"):  # the reference silently desynchronises
        lb.batch_shard_by_document(
            inputs=[_x(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 8]), pad_values=[0]
        )


# ---------------------------------------------------------------------------------------------- inverses and properties


def _random_docs(draw_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(draw_lens).tolist()])


@settings(max_examples=60, deadline=None)
@given(
    W=st.integers(1, 5),
    n=st.integers(1, 60),
    kind=st.sampled_from(["zig_zag", "ulysses"]),
    mult=st.sampled_from([None, 1, 2, 3]),
    extra=st.integers(1, 3),
)
def test_plain_shard_unshard_identity_and_partition(W, n, kind, mult, extra):
    cls = ZZ if kind == "zig_zag" else UL
    lbs = _all(cls, W)
    length_multiple = None if mult is None else mult * lbs[0].default_length_multiple
    x = torch.randn(extra, n, 2)
    shards = [
        lb.batch_shard(inputs=[x], seq_dims=[1], pad_values=[0.0], length_multiple=length_multiple)[0]
        for lb in lbs
    ]
    assert len({s.shape[1] for s in shards}) == 1  # equal local lengths
    assert torch.equal(lbs[0].unshard(shards, seq_dim=1, length=n, length_multiple=length_multiple), x)
    idx = torch.cat([lb.shard_index(n, length_multiple=length_multiple) for lb in lbs])
    real = idx[idx >= 0]
    assert sorted(real.tolist()) == list(range(n))  # every token on exactly one rank


@settings(max_examples=60, deadline=None)
@given(
    W=st.integers(1, 4),
    lens=st.lists(st.integers(0, 13), min_size=1, max_size=6),
    kind=st.sampled_from(["zig_zag", "llama3", "ulysses"]),
    mult=st.sampled_from([None, 1, 2, 4]),
    tail=st.integers(0, 3),
)
def test_document_shard_unshard_identity_and_partition(W, lens, kind, mult, tail):
    cls = {"zig_zag": ZZ, "llama3": L3, "ulysses": UL}[kind]
    lbs = _all(cls, W)
    if sum(lens) == 0:
        lens = [*lens, 1]
    cu = _random_docs(lens)
    n = int(cu[-1])
    if kind != "zig_zag":
        tail = 0  # llama3 / Ulysses inputs are exactly the documents
    length_multiple = mult if kind != "ulysses" or mult is None else mult * W
    x = torch.randn(1, n + tail, 3)
    out = [
        lb.batch_shard_by_document(
            inputs=[x], seq_dims=[1], cu_doc_lens=cu, pad_values=[0.0], length_multiple=length_multiple
        )
        for lb in lbs
    ]
    shards = [o[0][0] for o in out]
    assert len({s.shape[1] for s in shards}) == 1
    back = lbs[0].unshard_by_document(
        shards, seq_dim=1, cu_doc_lens=cu, length_multiple=length_multiple, length=n + tail, fill_value=0.0
    )
    expect = x.clone()
    expect[:, n:] = 0.0  # tokens after cu[-1] are dropped by zig-zag
    assert torch.equal(back, expect)
    idx = torch.cat([lb.shard_index_by_document(cu, length_multiple=length_multiple)[0] for lb in lbs])
    assert sorted(idx[idx >= 0].tolist()) == list(range(n))
    if kind == "zig_zag":  # one local segmentation shared by every rank
        assert len({tuple(o[1]["cu_doc_lens"].tolist()) for o in out}) == 1


@settings(max_examples=40, deadline=None)
@given(W=st.integers(1, 6), chunk=st.integers(1, 20))
def test_zigzag_causal_work_is_balanced(W, chunk):
    """Causal pairs (query i sees keys 0..i) per rank are equal: chunk r + chunk 2W-1-r."""
    n = 2 * W * chunk
    work = [int((lb.shard_index(n) + 1).sum()) for lb in _all(ZZ, W)]
    assert len(set(work)) == 1
    ul = [int((lb.shard_index(n) + 1).sum()) for lb in _all(UL, W)]
    if W > 1:
        assert ul[-1] > ul[0]  # contiguous shards are not balanced: the reason for zig-zag


# ---------------------------------------------------------------------------------------------- against reference.cp_layouts


@settings(max_examples=50, deadline=None)
@given(
    W=st.integers(1, 4),
    lens=st.lists(st.integers(1, 11), min_size=1, max_size=5),
    mult=st.sampled_from([None, 2, 4]),
    seq_dim=st.sampled_from([0, 1]),
)
def test_agrees_with_reference_layouts(W, lens, mult, seq_dim):
    cu = _random_docs(lens)
    n = int(cu[-1])
    x = torch.randn(n, 2) if seq_dim == 0 else torch.randn(2, n)
    for r in range(W):
        zz = ZZ(cp_rank=r, cp_world_size=W)
        ul = UL(cp_rank=r, cp_world_size=W)
        l3 = L3(cp_rank=r, cp_world_size=W)
        lm = None if mult is None else mult * 2 * W
        got = zz.batch_shard(inputs=[x], seq_dims=[seq_dim], pad_values=[-1.0], length_multiple=lm)[0]
        ref = cp_layouts.zigzag_shard(x.numpy(), seq_dim, r, W, pad_value=-1.0, length_multiple=lm)
        np.testing.assert_array_equal(got.numpy(), ref)
        (got,), meta = zz.batch_shard_by_document(
            inputs=[x], seq_dims=[seq_dim], cu_doc_lens=cu, pad_values=[-1.0], length_multiple=mult
        )
        ref, ref_meta = cp_layouts.zigzag_shard_by_document(
            x.numpy(), seq_dim, cu.numpy(), r, W, pad_value=-1.0, length_multiple=mult
        )
        np.testing.assert_array_equal(got.numpy(), ref)
        assert meta["cu_doc_lens"].tolist() == ref_meta["cu_doc_lens"].tolist()
        assert meta["max_doc_len"] == ref_meta["max_doc_len"]
        (got,), meta = l3.batch_shard_by_document(
            inputs=[x], seq_dims=[seq_dim], cu_doc_lens=cu, pad_values=[-1.0], length_multiple=mult
        )
        ref, ref_meta = cp_layouts.llama3_shard_by_document(
            x.numpy(), seq_dim, cu.numpy(), r, W, pad_value=-1.0, length_multiple=mult
        )
        np.testing.assert_array_equal(got.numpy(), ref)
        for key in ("cu_doc_lens_q", "cu_doc_lens_k"):
            assert meta[key].tolist() == ref_meta[key].tolist()
        for key in ("max_doc_len_q", "max_doc_len_k", "local_k_slice"):
            assert meta[key] == ref_meta[key]
        um = None if mult is None else mult * W
        (got,), meta = ul.batch_shard_by_document(
            inputs=[x], seq_dims=[seq_dim], cu_doc_lens=cu, pad_values=[-1.0], length_multiple=um
        )
        ref, ref_meta = cp_layouts.ulysses_shard_by_document(
            x.numpy(), seq_dim, cu.numpy(), r, W, pad_value=-1.0, length_multiple=um
        )
        np.testing.assert_array_equal(got.numpy(), ref)
        assert meta["cu_doc_lens"].tolist() == ref_meta["cu_doc_lens"].tolist()
        assert meta["max_doc_len"] == ref_meta["max_doc_len"]
