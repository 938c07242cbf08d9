"""Index vectors and tile classification against the reference's dense ``allowed_mask``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from olmo_attn.ops.kernel import KernelCall
from olmo_attn.ops.masking import (
    EMPTY,
    FULL,
    PARTIAL,
    allowed_pairs,
    build_mask_index,
    classify_blocks,
    union_over_batch,
)
from reference.attention import allowed_mask


def _random_cu(rng: random.Random, total: int, n: int) -> list[int]:
    cuts = sorted(rng.randint(0, total) for _ in range(n - 1))
    return [0, *cuts, total]


def _random_case(rng: random.Random):
    causal = rng.random() < 0.7
    window = (rng.choice([-1, 0, 1, 5, 17, 200]), rng.choice([-1, -1, 0, 3, 40]))
    if rng.random() < 0.5:
        tq, tk = rng.randint(1, 90), rng.randint(1, 90)
        return tq, tk, KernelCall(scale=1.0, causal=causal, window=window), None, None
    tq, tk = rng.randint(1, 90), rng.randint(1, 90)
    n = rng.randint(1, 6)
    cu_q, cu_k = _random_cu(rng, tq, n), _random_cu(rng, tk, n)
    if rng.random() < 0.5:  # shared segmentation
        tk, cu_k = tq, cu_q
    call = KernelCall(
        scale=1.0,
        causal=causal,
        window=window,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
    )
    return tq, tk, call, cu_q, cu_k


@pytest.mark.parametrize("seed", range(6))
def test_dense_mask_equals_reference_and_tiles_are_sound(seed):
    rng = random.Random(seed)
    for _ in range(40):
        tq, tk, call, cu_q, cu_k = _random_case(rng)
        index = build_mask_index(call, tq=tq, tk=tk, device="cpu")
        want = allowed_mask(
            tq, tk, causal=call.causal, window=call.window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
        )
        dense = index.dense()[0].numpy()
        assert np.array_equal(dense, want), (tq, tk, call.causal, call.window, cu_q, cu_k)
        bq, bk = rng.choice([1, 4, 8, 16]), rng.choice([1, 4, 8, 16])
        cls = classify_blocks(index, bq, bk)[0]
        assert cls.shape == (-(-tq // bq), -(-tk // bk))
        for qb in range(cls.shape[0]):
            for kb in range(cls.shape[1]):
                tile = want[qb * bq : (qb + 1) * bq, kb * bk : (kb + 1) * bk]
                c = int(cls[qb, kb])
                if c == EMPTY:
                    assert not tile.any()
                elif c == FULL:
                    assert tile.all()
                # without segments the classification is exact
                if cu_q is None:
                    assert c == (EMPTY if not tile.any() else FULL if tile.all() else PARTIAL)
        assert int(allowed_pairs(index, bq, bk)[0]) == int(want.sum())


def test_classification_skips_most_tiles_for_windows_and_documents():
    tq = 4096
    call = KernelCall(scale=1.0, causal=True, window=(255, 0))
    cls = classify_blocks(build_mask_index(call, tq=tq, tk=tq, device="cpu"), 128, 128)[0]
    assert int((cls != EMPTY).sum()) <= 3 * (tq // 128)  # O(T/block) tiles, not O((T/block)^2)
    cu = torch.tensor([0, 1000, 1024, 3000, 4096], dtype=torch.int32)
    doc = KernelCall(scale=1.0, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    cls = classify_blocks(build_mask_index(doc, tq=tq, tk=tq, device="cpu"), 128, 128)[0]
    nonempty = int((cls != EMPTY).sum())
    dense_causal = (tq // 128) * (tq // 128 + 1) // 2
    assert nonempty < dense_causal * 0.6
    assert int((cls == FULL).sum()) > 0


def test_kv_cache_key_validity_per_row():
    leftpad = torch.tensor([0, 3, 6])
    call = KernelCall(scale=1.0, causal=True, window=(4, 0))
    index = build_mask_index(call, tq=2, tk=12, device="cpu", q_start=8, key_lo=leftpad, key_hi=10)
    assert index.batch == 3
    dense = index.dense().numpy()
    for b, lp in enumerate(leftpad.tolist()):
        for t in range(2):
            p = 8 + t
            want = [(lp <= j <= p) and (j >= p - 4) for j in range(12)]
            assert dense[b, t].tolist() == want
    cls = classify_blocks(index, 1, 4)
    assert cls.shape == (3, 2, 3)
    merged = union_over_batch(cls)
    assert merged.shape == (2, 3)
    assert int(merged[0, 0]) == EMPTY  # keys 0..3 are outside every row's window
    # q_start as a 0-dim tensor (no host sync on device) gives the same vectors
    t_index = build_mask_index(
        call, tq=2, tk=12, device="cpu", q_start=torch.tensor(8), key_lo=leftpad, key_hi=torch.tensor(10)
    )
    assert torch.equal(t_index.dense(), index.dense())


def test_rows_of_uncovered_positions_see_nothing():
    # cu[-1] < total: trailing positions belong to no segment
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    call = KernelCall(scale=1.0, causal=False, cu_seqlens_q=cu, cu_seqlens_k=cu)
    index = build_mask_index(call, tq=8, tk=8, device="cpu")
    dense = index.dense()[0]
    assert not dense[5:].any() and not dense[:, 5:].any()
    assert np.array_equal(
        dense.numpy(), allowed_mask(8, 8, causal=False, cu_seqlens_q=[0, 3, 5], cu_seqlens_k=[0, 3, 5])
    )


def test_mismatched_segment_counts_raise():
    call = KernelCall(
        scale=1.0,
        cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="cu_seqlens_q has 3 entries"):
        build_mask_index(call, tq=4, tk=4, device="cpu")
