"""Zig-zag ring planning, single process: every step's kernel calls cover exactly the allowed
(query, key) pairs, each once, for plain sequences, documents, windows and the padding tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_attn.cp.errors import ContextParallelInputError
from olmo_attn.cp.ring import _pair, _step_blocks, _zigzag_plans
from reference.attention import allowed_mask


def _positions(chunks: list[int], tail: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """(document id, position inside the padded document) of every local token of ``rank``."""
    doc, pos = [], []
    for d, c in enumerate(chunks):
        doc += [d] * (2 * c)
        pos += [rank * c + i for i in range(c)] + [(2 * world - 1 - rank) * c + i for i in range(c)]
    doc += [-1] * tail  # the odd padding tail: attends only to itself, on its own rank
    pos += list(range(tail))
    return np.array(doc, dtype=np.int64), np.array(pos, dtype=np.int64)


def _truth(chunks, tail, rank, src, world, left):
    dq, pq = _positions(chunks, tail, rank, world)
    dk, pk = _positions(chunks, tail, src, world)
    same = dq[:, None] == dk[None, :]
    tail_pair = (dq[:, None] == -1) & (dk[None, :] == -1)
    ok = same & (pk[None, :] <= pq[:, None])
    if left >= 0:
        ok &= pq[:, None] - pk[None, :] <= left
    return np.where(tail_pair, ok & (rank == src), ok)


def _indices(rows, n: int) -> np.ndarray:
    if isinstance(rows, slice):
        return np.arange(n)[rows]
    return rows.numpy()


def _coverage(blocks, n: int) -> np.ndarray:
    count = np.zeros((n, n), dtype=np.int64)
    for blk in blocks:
        qi, ki = _indices(blk.q_rows, n), _indices(blk.k_rows, n)
        call = blk.call
        mask = allowed_mask(
            len(qi),
            len(ki),
            causal=call.causal,
            window=call.window,
            cu_seqlens_q=None if not call.varlen else list(call.cu_seqlens_q_host),
            cu_seqlens_k=None if not call.varlen else list(call.cu_seqlens_k_host),
        )
        assert call.window[0] >= -1 and call.window[1] >= -1
        np.add.at(count, (qi[:, None], ki[None, :]), mask.astype(np.int64))
    return count


@settings(max_examples=150, deadline=None)
@given(
    world=st.integers(1, 5),
    chunks=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    tail=st.sampled_from([0, 0, 1, 3]),
    window=st.sampled_from([None, 1, 2, 3, 5, 8, 13, 40]),
    dense=st.booleans(),
    data=st.data(),
)
def test_blocks_cover_allowed_pairs_exactly_once(world, chunks, tail, window, dense, data):
    rank = data.draw(st.integers(0, world - 1))
    left = -1 if window is None else window - 1
    if dense:  # one document, no tail: the plain-sequence plan
        chunks, tail = [max(1, chunks[0])], 0
        n = 2 * chunks[0]
        local_cu = None
    else:
        n = 2 * sum(chunks) + tail
        lens = [2 * c for c in chunks] + ([tail] if tail else [])
        local_cu = (0, *np.cumsum(lens).tolist())
    plans = _zigzag_plans(local_cu, n, rank, world, 0.5, (left, 0), torch.device("cpu"))
    for src in range(world):
        blocks = _step_blocks(plans, rank, src, left >= 0)
        count = _coverage(blocks, n)
        assert count.max(initial=0) <= 1, "a (query, key) pair is computed twice"
        np.testing.assert_array_equal(count.astype(bool), _truth(chunks, tail, rank, src, world, left))


def test_blocks_outside_the_window_are_skipped():
    # W = 4, 8 tokens per chunk, window 4: only adjacent chunks can interact
    plans = _zigzag_plans(None, 16, 3, 4, 0.5, (3, 0), torch.device("cpu"))
    assert _step_blocks(plans, 3, 0, True) == []  # chunks 0/7 vs 3/4: 7 is not adjacent to 3 or 4
    assert len(_step_blocks(plans, 3, 2, True)) == 1  # chunk 2 -> chunk 3 (the first rows only)
    (blk,) = _step_blocks(plans, 3, 2, True)
    assert blk.q_rows == slice(0, 3) and blk.k_rows == slice(5, 8) and blk.call.window == (0, -1)


def test_pair_geometry():
    assert _pair(3, 4, 8, -1, -1) is None  # later keys
    assert _pair(3, 3, 8, 5, 0) == (True, (5, 0), (0, 8), (0, 8))
    assert _pair(3, 1, 8, -1, -1) == (False, (-1, -1), (0, 8), (0, 8))
    assert _pair(3, 1, 8, 8, 0) is None  # the nearest key is 9 tokens away
    assert _pair(3, 2, 8, 20, 0) == (False, (12, -1), (0, 8), (0, 8))  # all rows see keys
    assert _pair(3, 2, 8, 3, 0) == (False, (0, -1), (0, 3), (5, 8))


def test_odd_local_documents_are_refused_unless_trailing():
    with pytest.raises(ContextParallelInputError, match="odd length 3"):
        _zigzag_plans((0, 3, 7), 7, 0, 2, 0.5, (-1, -1), torch.device("cpu"))
    with pytest.raises(ContextParallelInputError, match="even local length"):
        _zigzag_plans(None, 7, 0, 2, 0.5, (-1, -1), torch.device("cpu"))
