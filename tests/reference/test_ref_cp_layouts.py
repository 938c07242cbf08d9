"""reference.cp_layouts: every worked balancer example, inverses, coverage, balance, attention equivalence."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import cp_cases as fx
from reference import cp_layouts as cp
from reference.attention import attention, sdpa


def row(x):
    return np.array([x])  # [1, T] with seq_dim 1, like [[0..7]]


# ---------------------------------------------------------------------------------------------- worked examples


def test_zigzag_examples():
    padded, added = cp.zigzag_pad(row(fx.ZIGZAG_PAD["x"]), 1, fx.ZIGZAG_PAD["world"], fx.ZIGZAG_PAD["pad"])
    assert padded.tolist() == [fx.ZIGZAG_PAD["padded"]] and added == fx.ZIGZAG_PAD["added"]
    for case in (fx.ZIGZAG_SHARD, fx.ZIGZAG_SHARD_PAD):
        for rank, want in case["ranks"].items():
            got = cp.zigzag_shard(row(case["x"]), 1, rank, case["world"], pad_value=case.get("pad"))
            assert got.tolist() == [want]


def test_zigzag_by_document_examples():
    c = fx.ZIGZAG_DOCS
    for rank, want in c["ranks"].items():
        local, meta = cp.zigzag_shard_by_document(row(c["x"]), 1, c["cu"], rank, c["world"])
        assert local.tolist() == [want] and meta["cu_doc_lens"].tolist() == c["local_cu"]
        assert meta["max_doc_len"] == 4
    c = fx.ZIGZAG_DOCS_PAD
    local, meta = cp.zigzag_shard_by_document(row(c["x"]), 1, c["cu"], 0, c["world"], pad_value=c["pad"])
    assert local.tolist() == [c["rank0"]] and meta["cu_doc_lens"].tolist() == c["local_cu"]


def test_ulysses_examples():
    padded, added = cp.ulysses_pad(row(range(6)), 1, 4, -1)
    assert padded.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]] and added == 2
    for case in (fx.ULYSSES_SHARD, fx.ULYSSES_SHARD_PAD):
        for rank, want in enumerate(case["ranks"]):
            assert cp.ulysses_shard(row(case["x"]), 1, rank, case["world"], case.get("pad")).tolist() == [
                want
            ]
    for case in (fx.ULYSSES_DOCS, fx.ULYSSES_DOCS_PAD):
        for rank, want in enumerate(case["ranks"]):
            local, meta = cp.ulysses_shard_by_document(
                row(case["x"]), 1, case["cu"], rank, case["world"], case.get("pad")
            )
            assert local.tolist() == [want] and meta["cu_doc_lens"].tolist() == case["cu_out"]
    _, meta = cp.ulysses_shard_by_document(row(range(10)), 1, [0, 6, 10], 0, 4, -1)
    assert meta["max_doc_len"] == fx.ULYSSES_DOCS_PAD["max_doc_len"]


def test_llama3_examples():
    c = fx.LLAMA3
    for rank, want in c["ranks"].items():
        meta = cp.llama3_metadata(c["cu"], rank, c["world"])
        for key, value in want.items():
            got = meta[key]
            assert (got.tolist() if isinstance(got, np.ndarray) else got) == value, key
    c = fx.LLAMA3_PAD
    for rank, want in enumerate(c["ranks"]):
        local, meta = cp.llama3_shard_by_document(
            row(c["x"]),
            1,
            c["cu"],
            rank,
            c["world"],
            pad_value=c["pad"],
            length_multiple=c["length_multiple"],
        )
        assert local.tolist() == [want]
    assert meta["cu_doc_lens_q"].tolist() == [0, 2, 8] and meta["local_k_slice"] == slice(6, 16)


def test_cp2hp_example_and_round_trip():
    out = cp.cp2hp(np.array(fx.CP2HP["inputs"]))
    assert [o.tolist() for o in out] == fx.CP2HP["outputs"]
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 4, 5), (2, 3, 8)):
        xs = [rng.standard_normal(shape) for _ in range(4)]
        hp = cp.cp2hp(xs)
        assert hp[0].shape == (2, 12, shape[2] // 4, *shape[3:])
        for r, h in enumerate(hp):  # out_r[b, s*T_l + t, j] = x_s[b, t, r*H/W + j]
            for s in range(4):
                np.testing.assert_array_equal(
                    h[:, 3 * s : 3 * s + 3], xs[s][:, :, r * shape[2] // 4 : (r + 1) * shape[2] // 4]
                )
        back = cp.hp2cp(hp)
        for a, b in zip(back, xs):
            np.testing.assert_array_equal(a, b)


def test_errors():
    with pytest.raises(ValueError, match="pad_value"):
        cp.zigzag_shard(row(range(6)), 1, 0, 4)
    with pytest.raises(ValueError, match="divisible"):
        cp.zigzag_shard(row(range(8)), 1, 0, 4, length_multiple=4)
    with pytest.raises(ValueError, match="pad_value"):
        cp.zigzag_shard_by_document(row(range(12)), 1, [0, 7, 12], 0, 2)
    with pytest.raises(ValueError, match="start with 0"):
        cp.ulysses_shard_by_document(row(range(4)), 1, [1, 4], 0, 2)
    with pytest.raises(ValueError, match="tokens"):
        cp.llama3_shard_by_document(row(range(12)), 1, [0, 10], 0, 2, pad_value=0)
    with pytest.raises(ValueError, match="divisible"):
        cp.cp2hp([np.zeros((1, 2, 3, 1))] * 2)


def test_zigzag_by_document_length_multiple_adds_trailing_document():
    local, meta = cp.zigzag_shard_by_document(
        row(range(12)), 1, [0, 8, 12], 0, 2, pad_value=-1, length_multiple=4
    )
    assert local.tolist() == [[0, 1, 6, 7, 8, 11, -1, -1]]
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6, 8]
    _, meta = cp.zigzag_shard_by_document(row(range(12)), 1, [0, 8, 12], 0, 2, length_multiple=3)
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6, 6]  # zero-length pseudo-document


# ---------------------------------------------------------------------------------------------- properties

docs = st.lists(st.integers(0, 9), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), world=st.integers(1, 4), extra=st.integers(0, 2))
def test_plain_shards_cover_every_token_once_and_invert(n, world, extra):
    x = np.arange(n)[None, :, None] * np.ones((2, 1, 3), dtype=int)  # [2, n, 3], seq_dim 1
    for shard, unshard, unit in (
        (cp.zigzag_shard, cp.zigzag_unshard, 2 * world),
        (cp.ulysses_shard, cp.ulysses_unshard, world),
    ):
        m = unit * (1 + extra)
        locals_ = [shard(x, 1, r, world, pad_value=-1, length_multiple=m) for r in range(world)]
        assert len({a.shape for a in locals_}) == 1
        tokens = np.concatenate([a[0, :, 0] for a in locals_])
        assert sorted(tokens[tokens >= 0].tolist()) == list(range(n))
        np.testing.assert_array_equal(unshard(locals_, 1, length=n), x)


@settings(max_examples=25, deadline=None)
@given(lens=docs, world=st.integers(1, 4), lm=st.sampled_from([None, 1, 4]))
def test_document_shards_cover_every_token_once_and_invert(lens, world, lm):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    x = np.arange(int(cu[-1]))[:, None] * np.ones((1, 2), dtype=int)  # [N, 2], seq_dim 0
    cases = [
        (cp.zigzag_shard_by_document, cp.zigzag_unshard_by_document),
        (cp.llama3_shard_by_document, cp.llama3_unshard_by_document),
        (cp.ulysses_shard_by_document, cp.ulysses_unshard_by_document),
    ]
    for shard, unshard in cases:
        if shard is cp.llama3_shard_by_document and cu[-1] == 0:
            continue  # llama3 needs at least one token
        multiple = lm if shard is not cp.ulysses_shard_by_document or lm is None else lm * world
        locals_ = [shard(x, 0, cu, r, world, pad_value=-1, length_multiple=multiple)[0] for r in range(world)]
        tokens = np.concatenate([a[:, 0] for a in locals_])
        assert sorted(tokens[tokens >= 0].tolist()) == list(range(int(cu[-1])))
        np.testing.assert_array_equal(unshard(locals_, 0, cu), x)


@settings(max_examples=25, deadline=None)
@given(lens=docs.filter(lambda v: sum(v) > 0), world=st.integers(1, 4))
def test_zigzag_causal_work_is_balanced(lens, world):
    """Causal work of a token = its position in its document + 1; zig-zag gives every rank the same
    total (chunks r and 2W−1−r of each padded document sum to a constant)."""
    padded = [-(-n // (2 * world)) * 2 * world for n in lens]
    work = np.concatenate([np.arange(1, p + 1) for p in padded])[None]  # per token, padded docs
    cu_padded = np.concatenate([[0], np.cumsum(padded)])
    per_rank = [cp.zigzag_shard_by_document(work, 1, cu_padded, r, world)[0].sum() for r in range(world)]
    assert len(set(per_rank)) == 1
    plain = [cp.zigzag_shard(np.arange(1, 2 * world * 3 + 1)[None], 1, r, world).sum() for r in range(world)]
    assert len(set(plain)) == 1


@settings(max_examples=10, deadline=None)
@given(
    lens=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    world=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_llama3_shards_reproduce_global_attention(lens, world, seed):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lens)])
    N = int(cu[-1])
    q, k, v = (rng.standard_normal((1, N, 2, 4)) for _ in range(3))
    want, _ = sdpa(q, k, v, cu_doc_lens=cu, window=(3, 0))
    outs = []
    for r in range(world):
        parts = [
            cp.llama3_shard_by_document(a, 1, cu, r, world, pad_value=0.0, length_multiple=2)
            for a in (q, k, v)
        ]
        meta = parts[0][1]
        k_all = np.concatenate(
            [cp.llama3_shard_by_document(k, 1, cu, s, world, 0.0, 2)[0] for s in range(world)], 1
        )
        v_all = np.concatenate(
            [cp.llama3_shard_by_document(v, 1, cu, s, world, 0.0, 2)[0] for s in range(world)], 1
        )
        out, _ = sdpa(
            parts[0][0],
            k_all,
            v_all,
            window=(3, 0),
            cu_doc_lens_q=meta["cu_doc_lens_q"],
            cu_doc_lens_k=meta["cu_doc_lens_k"],
            local_k_slice=meta["local_k_slice"],
        )
        outs.append(out)
    np.testing.assert_allclose(cp.llama3_unshard_by_document(outs, 1, cu), want, rtol=1e-13, atol=1e-14)


def test_ulysses_all_to_all_reproduces_global_attention():
    """cp2hp → attention over the full sequence on H/W heads → hp2cp equals the contiguous slices."""
    rng = np.random.default_rng(1)
    W, T, Hq, Hkv = 2, 12, 4, 2
    q, k, v = (
        rng.standard_normal((2, T, Hq, 4)),
        rng.standard_normal((2, T, Hkv, 4)),
        rng.standard_normal((2, T, Hkv, 4)),
    )
    want, _ = attention(q, k, v)
    shards = [[cp.ulysses_shard(a, 1, r, W) for r in range(W)] for a in (q, k, v)]
    qh, kh, vh = (cp.cp2hp(s) for s in shards)
    outs = cp.hp2cp([attention(qh[r], kh[r], vh[r])[0] for r in range(W)])
    np.testing.assert_allclose(cp.ulysses_unshard(outs, 1), want, rtol=1e-14, atol=1e-15)
