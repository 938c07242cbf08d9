"""A NaN/Inf in one token's key or value reaches only the rows that can see that token: other
documents, rows outside a sliding window and earlier rows keep the clean run's outputs and input
gradients exactly (the blockwise kernel never forms ``0 · nan`` at a masked pair)."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_attn.ops.kernel import KernelCall
from olmo_attn.ops.torch_kernel import BlockSizes, attend

BLOCKS = BlockSizes(block_q=16, block_k=16, max_run=64)  # small tiles: many PARTIAL tiles


def _visible(T: int, cu: list[int] | None, window: int) -> torch.Tensor:
    """``[T, T]`` bool: row i sees key j (causal, the window, inside its document)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = j <= i
    if window >= 0:
        ok &= i - j <= window
    if cu is not None:
        doc = torch.bucketize(torch.arange(T), torch.tensor(cu[1:]), right=True)
        ok &= doc[:, None] == doc[None, :]
    return ok


def _run(q, k, v, dout, call):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attend(q, k, v, call, blocks=BLOCKS)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), dq, dk, dv


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("mask", ["documents", "window", "causal"])
def test_bad_token_stays_in_the_rows_that_see_it(mask: str, tensor: str, bad: float):
    T, Hq, Hkv, D, t_bad = 96, 4, 2, 16, 41
    cu = [0, 30, 57, 96] if mask == "documents" else None
    window = 9 if mask == "window" else -1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(T, Hq, D, generator=g)
    call = KernelCall(scale=D**-0.5, causal=True, window=(window, 0) if window >= 0 else (-1, -1))
    if cu is not None:
        cu_t = torch.tensor(cu, dtype=torch.int32)
        call = KernelCall(
            scale=D**-0.5, causal=True, cu_seqlens_q=cu_t, cu_seqlens_k=cu_t, max_seqlen_q=30,
            max_seqlen_k=30, cu_seqlens_q_host=tuple(cu), cu_seqlens_k_host=tuple(cu),
        )  # fmt: skip
    if cu is None:  # the dense layout: [B=1, T, H, D]
        q, k, v, dout = (t[None] for t in (q, k, v, dout))
    clean = _run(q, k, v, dout, call)
    planted = {"q": q, "k": k.clone(), "v": v.clone()}
    planted[tensor][..., t_bad, 0, 3] = bad
    dirty = _run(planted["q"], planted["k"], planted["v"], dout, call)
    vis = _visible(T, cu, window)
    sees = vis[:, t_bad]  # query rows that see the bad token
    # keys that share a query row with the bad token get gradients from those rows
    touched = vis[sees].any(dim=0)
    for name, c, d, rows in (
        ("out", clean[0], dirty[0], ~sees),
        ("dq", clean[1], dirty[1], ~sees),
        ("dk", clean[2], dirty[2], ~touched),
        ("dv", clean[3], dirty[3], ~touched),
    ):
        c, d = c.reshape(T, -1), d.reshape(T, -1)
        assert torch.isfinite(d[rows]).all(), (
            f"{name}: the bad {tensor} token reached rows that cannot see it"
        )
        assert torch.equal(c[rows], d[rows]), f"{name}: rows that cannot see the bad token changed"
    assert not torch.isfinite(dirty[0].reshape(T, -1)[sees]).all()  # and it does reach the rows that see it
