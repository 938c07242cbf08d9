"""TorchKernel (blockwise on CPU, FlexAttention block masks) against the float64 reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import reference.attention as ref
import reference.twins as twins
from olmo_attn.ops.kernel import AttentionKernel, KernelCall
from olmo_attn.ops.torch_kernel import BlockSizes, TorchKernel, attend

F64 = torch.float64
SMALL = BlockSizes(block_q=8, block_k=4, max_run=12)  # many tiles and runs on test-sized inputs


def _cu(rng: random.Random, total: int, n: int) -> list[int]:
    return [0, *sorted(rng.randint(0, total) for _ in range(n - 1)), total]


def _case(rng: random.Random):
    """Random kernel problem: dense (B, Tq != Tk) or varlen (separate segmentations), any mask."""
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2, 3])
    d = rng.choice([4, 8])
    causal = rng.random() < 0.7
    window = (rng.choice([-1, 0, 3, 11, 500]), rng.choice([-1, 0, 2]))
    kw = dict(scale=rng.uniform(0.2, 0.8), causal=causal, window=window)
    if rng.random() < 0.5:
        b, tq, tk = rng.randint(1, 2), rng.randint(1, 40), rng.randint(1, 40)
        return (b, tq, tk, hq, hkv, d), kw, None, None
    tq, tk, n = rng.randint(1, 60), rng.randint(1, 60), rng.randint(1, 5)
    cu_q, cu_k = _cu(rng, tq, n), _cu(rng, tk, n)
    return (None, tq, tk, hq, hkv, d), kw, cu_q, cu_k


def _tensors(shape, seed: int, dtype=F64):
    b, tq, tk, hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    lead_q = (tq,) if b is None else (b, tq)
    lead_k = (tk,) if b is None else (b, tk)
    mk = lambda lead, h: torch.randn(*lead, h, d, generator=g, dtype=F64).to(dtype)
    return mk(lead_q, hq), mk(lead_k, hkv), mk(lead_k, hkv), mk(lead_q, hq)


def _call(kw, cu_q, cu_k, **extra) -> KernelCall:
    if cu_q is None:
        return KernelCall(**kw, **extra)
    return KernelCall(
        **kw,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        cu_seqlens_q_host=tuple(cu_q),
        cu_seqlens_k_host=tuple(cu_k),
        **extra,
    )


def test_torch_kernel_satisfies_protocol():
    assert isinstance(TorchKernel(), AttentionKernel)


@pytest.mark.parametrize("seed", range(8))
def test_kernel_forward_backward_float64_random(seed):
    rng = random.Random(seed)
    kernel = TorchKernel(blocks=SMALL)
    for trial in range(6):
        shape, kw, cu_q, cu_k = _case(rng)
        q, k, v, dout = _tensors(shape, seed * 100 + trial)
        call = _call(kw, cu_q, cu_k)
        out, lse = kernel.forward(q, k, v, call)
        ref_kw = dict(kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        r_out, r_lse = ref.attention(q.numpy(), k.numpy(), v.numpy(), **ref_kw)
        assert lse.dtype == F64 and lse.shape == r_lse.shape
        assert np.abs(out.numpy() - r_out).max() < 1e-10
        assert np.array_equal(np.isneginf(lse.numpy()), np.isneginf(r_lse))
        fin = np.isfinite(r_lse)
        assert np.abs(lse.numpy()[fin] - r_lse[fin]).max(initial=0.0) < 1e-10
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        t_out, _ = twins.attention(qq, kk, vv, **ref_kw)
        t_out.backward(dout)
        grads = kernel.backward(dout, q, k, v, out, lse, call)
        for got, want in zip(grads, (qq.grad, kk.grad, vv.grad)):
            assert torch.isfinite(got).all()
            assert (got - want).abs().max().item() < 1e-10


def test_attend_autograd_matches_kernel_backward():
    rng = random.Random(11)
    shape, kw, cu_q, cu_k = _case(rng)
    q, k, v, dout = _tensors(shape, 5)
    call = _call(kw, cu_q, cu_k)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attend(qq, kk, vv, call, blocks=SMALL)
    out.backward(dout)
    kernel = TorchKernel(blocks=SMALL)
    o2, lse = kernel.forward(q, k, v, call)
    assert torch.equal(out.detach(), o2)
    for got, want in zip(kernel.backward(dout, q, k, v, o2, lse, call), (qq.grad, kk.grad, vv.grad)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def _dense_masked(q, k, v, allowed, scale):
    """float64 ``[B, Tq, Hq, D]`` attention under an explicit ``allowed [Tq, Tk]`` (the judge for a split)."""
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(g, 2)) * scale
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True).detach().nan_to_num(0.0, neginf=0.0)
    p = torch.exp(s - m)
    tot = p.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", p / torch.where(tot > 0, tot, 1.0), v.repeat_interleave(g, 2))
    return out


@pytest.mark.parametrize("hkv", [1, 2])
def test_backward_with_merged_lse_sums_to_full_gradient(hkv):
    """Ring attention's contract: per-block backward with the merged out/lse sums to the full gradient."""
    B, T, Tp, D, hq = 2, 21, 13, 8, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, hq, D, generator=g, dtype=F64)
    k_prev, v_prev = (torch.randn(B, Tp, hkv, D, generator=g, dtype=F64) for _ in range(2))
    k_self, v_self = (torch.randn(B, T, hkv, D, generator=g, dtype=F64) for _ in range(2))
    dout = torch.randn(B, T, hq, D, generator=g, dtype=F64)
    scale = 0.4
    kernel = TorchKernel(blocks=SMALL)
    # block A: earlier keys, non-causal; block B: the diagonal block, causal (Tq == Tk)
    call_a = KernelCall(scale=scale, causal=False)
    call_b = KernelCall(scale=scale, causal=True)
    o_a, l_a = kernel.forward(q, k_prev, v_prev, call_a)
    o_b, l_b = kernel.forward(q, k_self, v_self, call_b)
    lse = torch.logaddexp(l_a, l_b)
    w_a = torch.exp(l_a - lse).transpose(1, 2)[..., None]
    w_b = torch.exp(l_b - lse).transpose(1, 2)[..., None]
    out = w_a * o_a + w_b * o_b
    dq_a, dk_a, dv_a = kernel.backward(dout, q, k_prev, v_prev, out, lse, call_a)
    dq_b, dk_b, dv_b = kernel.backward(dout, q, k_self, v_self, out, lse, call_b)
    # full problem: bottom-right causal over [k_prev, k_self]
    qq = q.clone().requires_grad_(True)
    kk = torch.cat([k_prev, k_self], 1).requires_grad_(True)
    vv = torch.cat([v_prev, v_self], 1).requires_grad_(True)
    full, full_lse = twins.attention(qq, kk, vv, scale=scale, causal=True)
    full.backward(dout)
    assert (out - full.detach()).abs().max() < 1e-12
    assert (lse - full_lse.detach()).abs().max() < 1e-12
    assert (dq_a + dq_b - qq.grad).abs().max() < 1e-10
    assert (torch.cat([dk_a, dk_b], 1) - kk.grad).abs().max() < 1e-10
    assert (torch.cat([dv_a, dv_b], 1) - vv.grad).abs().max() < 1e-10


def test_backward_with_merged_lse_and_empty_rows():
    """A block in which some rows see nothing (lse -inf there) still gives its exact share."""
    T, Tp, H, D = 17, 9, 2, 4
    g = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(T, H, D, generator=g, dtype=F64) for _ in range(2))
    k_prev, v_prev = (torch.randn(Tp, H, D, generator=g, dtype=F64) for _ in range(2))
    k_self, v_self = (torch.randn(T, H, D, generator=g, dtype=F64) for _ in range(2))
    kernel = TorchKernel(blocks=SMALL)
    # block A (varlen): queries 0..4 form a segment with no keys -> empty rows; 5.. see all earlier keys
    call_a = KernelCall(
        scale=0.5,
        causal=False,
        cu_seqlens_q=torch.tensor([0, 5, T], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 0, Tp], dtype=torch.int32),
    )
    call_b = KernelCall(scale=0.5, causal=True)
    o_a, l_a = kernel.forward(q, k_prev, v_prev, call_a)
    assert torch.isneginf(l_a[:, :5]).all() and (o_a[:5] == 0).all()
    o_b, l_b = kernel.forward(q[None], k_self[None], v_self[None], call_b)
    o_b, l_b = o_b[0], l_b[0]
    lse = torch.logaddexp(l_a, l_b)
    out = torch.exp(l_a - lse).T[..., None] * o_a + torch.exp(l_b - lse).T[..., None] * o_b
    dq_a, dk_a, dv_a = kernel.backward(dout, q, k_prev, v_prev, out, lse, call_a)
    dq_b, dk_b, dv_b = kernel.backward(
        dout[None], q[None], k_self[None], v_self[None], out[None], lse[None], call_b
    )
    allowed = torch.zeros(T, Tp + T, dtype=torch.bool)
    allowed[5:, :Tp] = True
    allowed[:, Tp:] = torch.ones(T, T, dtype=torch.bool).tril()
    qq = q[None].clone().requires_grad_(True)
    kk = torch.cat([k_prev, k_self])[None].requires_grad_(True)
    vv = torch.cat([v_prev, v_self])[None].requires_grad_(True)
    full = _dense_masked(qq, kk, vv, allowed, 0.5)
    full.backward(dout[None])
    assert (out - full[0].detach()).abs().max() < 1e-12
    assert (dq_a + dq_b[0] - qq.grad[0]).abs().max() < 1e-10
    assert (torch.cat([dk_a, dk_b[0]]) - kk.grad[0]).abs().max() < 1e-10
    assert (torch.cat([dv_a, dv_b[0]]) - vv.grad[0]).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes_and_lse_float32(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 19, 2, 8, generator=g).to(dtype) for _ in range(3))
    out, lse = TorchKernel(blocks=SMALL).forward(q, k, v, KernelCall(scale=0.3, window=(4, 0)))
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 2, 19)
    r_out, r_lse = ref.attention(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), scale=0.3, window=(4, 0)
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert np.abs(out.double().numpy() - r_out).max() < tol
    assert np.abs(lse.double().numpy() - r_lse).max() < 1e-5


FLEX_CASES = [
    # (shape (B or None, Tq, Tk, Hq, Hkv, D), kernel kwargs, cu_q, cu_k)
    ((2, 200, 330, 4, 2, 16), dict(scale=0.3, causal=True, window=(70, 0)), None, None),
    ((1, 260, 260, 2, 1, 16), dict(scale=0.5, causal=False, window=(40, 25)), None, None),
    (
        (None, 290, 340, 4, 2, 16),
        dict(scale=0.3, causal=True, window=(-1, -1)),
        [0, 5, 5, 150, 290],
        [0, 40, 41, 200, 340],
    ),
    ((None, 300, 300, 2, 2, 16), dict(scale=0.4, causal=True, window=(33, 0)), [0, 1, 129, 130, 300], None),
]


@pytest.mark.parametrize("case", FLEX_CASES, ids=["dense-window", "two-sided", "docs-qk", "docs-window"])
def test_flex_block_mask_forward_on_cpu(case):
    """The CUDA path's BlockMask + mask_mod, run through FlexAttention's unfused CPU forward."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    shape, kw, cu_q, cu_k = case
    cu_k = cu_q if cu_k is None else cu_k
    q, k, v, _ = _tensors(shape, 3, dtype=torch.float32)
    out, lse = TorchKernel(impl="flex").forward(q, k, v, _call(kw, cu_q, cu_k))
    r_out, r_lse = ref.attention(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), **kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    assert np.abs(out.double().numpy() - r_out).max() < 1e-4
    fin = np.isfinite(r_lse)
    assert np.array_equal(np.isneginf(lse.numpy()), ~fin)
    assert np.abs(lse.double().numpy()[fin] - r_lse[fin]).max(initial=0.0) < 1e-4


def test_flex_kv_cache_mask_on_cpu():
    """Per-row key validity (KV cache) in the FlexAttention block mask, over the whole cache."""
    B, S, n, H, D = 3, 300, 2, 2, 16
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, n, H, D, generator=g)
    kc, vc = (torch.randn(B, S, H, D, generator=g) for _ in range(2))
    leftpad, start = torch.tensor([0, 5, 140]), 150
    call = KernelCall(scale=0.25, window=(63, 0))
    out = attend(q, kc, vc, call, q_start=start, key_lo=leftpad, key_hi=start + n, impl="flex")
    bw = attend(q, kc, vc, call, q_start=start, key_lo=leftpad, key_hi=start + n, impl="blockwise")
    used = start + n
    key_valid = np.arange(used)[None, :] >= leftpad.numpy()[:, None]
    r_out, _ = ref.attention(
        q.double().numpy(),
        kc[:, :used].double().numpy(),
        vc[:, :used].double().numpy(),
        scale=0.25,
        window=(63, 0),
        key_valid=key_valid,
    )
    assert np.abs(out.double().numpy() - r_out).max() < 1e-5
    assert np.abs(bw.double().numpy() - r_out).max() < 1e-5


def test_kernel_errors():
    kernel = TorchKernel()
    q = torch.randn(2, 5, 2, 4)
    with pytest.raises(ValueError, match="dropout_seed"):
        kernel.forward(q, q, q, KernelCall(scale=1.0, dropout_p=0.1))
    with pytest.raises(ValueError, match=r"4-D \[B, T, H, D\]"):
        kernel.forward(q[0], q[0], q[0], KernelCall(scale=1.0))
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="varlen"):
        kernel.forward(q, q, q, KernelCall(scale=1.0, cu_seqlens_q=cu, cu_seqlens_k=cu))
    with pytest.raises(ValueError, match="impl="):
        TorchKernel(impl="cuda_magic")
    with pytest.raises(ValueError, match="impl="):
        attend(q, q, q, KernelCall(scale=1.0), impl="cuda_magic")


def _block_sets(bm) -> tuple[set, set]:
    """(partial, full) tile sets ``{(b, qb, kb)}`` listed by a FlexAttention BlockMask (head 0)."""
    out = []
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        tiles = set()
        if num is not None:
            for b in range(num.shape[0]):
                for qb in range(num.shape[2]):
                    tiles |= {(b, qb, int(kb)) for kb in idx[b, 0, qb, : int(num[b, 0, qb])]}
        out.append(tiles)
    return out[0], out[1]


@pytest.mark.parametrize(
    "kw,cu",
    [
        (dict(causal=True, window=(-1, -1)), None),
        (dict(causal=True, window=(200, 0)), None),
        (dict(causal=False, window=(130, 70)), None),
        (dict(causal=True, window=(300, 0)), [0, 100, 101, 600, 700, 1000]),
    ],
)
def test_flex_block_lists_match_create_block_mask(kw, cu):
    """Our from_kv_blocks listing covers exactly the tiles FlexAttention's own dense evaluation finds."""
    from torch.nn.attention.flex_attention import create_block_mask

    from olmo_attn.ops.flex import build_block_mask, make_mask_mod
    from olmo_attn.ops.masking import build_mask_index

    T = 1000
    call = _call(dict(scale=1.0, **kw), cu, cu)
    index = build_mask_index(call, tq=T, tk=T, device="cpu")
    ours = build_block_mask(index)
    theirs = create_block_mask(make_mask_mod(index), 1, 1, T, T, device="cpu")
    our_partial, our_full = _block_sets(ours)
    their_partial, their_full = _block_sets(theirs)
    assert our_full <= their_full  # a tile we skip the mask on is truly full
    assert their_partial | their_full <= our_partial | our_full  # no visible tile is dropped
    if cu is None:  # exact without segments
        assert (our_partial, our_full) == (their_partial, their_full)
    # listed indices are ascending within each row (FlexAttention walks them in order)
    for b, qb in {(b, qb) for b, qb, _ in our_partial}:
        row = [kb for bb, qq, kb in sorted(our_partial) if (bb, qq) == (b, qb)]
        assert row == sorted(row)


@pytest.mark.slow
def test_compiled_flex_on_cpu_respects_block_lists():
    """Compiled FlexAttention (CPU inference kernel) skips unlisted tiles: our lists must be complete."""
    from olmo_attn.ops import flex as flex_ops
    from olmo_attn.ops.masking import build_mask_index

    T, H, D = 700, 2, 16
    cu = [0, 150, 151, 500, 700]
    call = _call(dict(scale=0.25, causal=True, window=(180, 0)), cu, cu)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
    index = build_mask_index(call, tq=T, tk=T, device="cpu")
    bm = flex_ops.build_block_mask(index)
    compiled = torch.compile(flex_ops.flex_attention_fn(), dynamic=False)
    out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=0.25)
    r_out, _ = ref.attention(
        q[0].double().numpy(),
        k[0].double().numpy(),
        v[0].double().numpy(),
        scale=0.25,
        window=(180, 0),
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
    )
    assert np.abs(out.transpose(1, 2)[0].double().numpy() - r_out).max() < 1e-4


def test_blockwise_ignores_autocast():
    """Under CPU bf16 autocast the kernel still accumulates in float32 (same result as without)."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=g) for _ in range(3))
    call = KernelCall(scale=0.3, window=(9, 0))
    plain = attend(q, k, v, call, blocks=SMALL, impl="blockwise")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attend(q, k, v, call, blocks=SMALL, impl="blockwise")
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)


def test_flex_kernel_backward_math_with_a_differentiable_stand_in(monkeypatch):
    """The CUDA kernel backward (recompute + ``grad_o = w·dout``, ``grad_lse = w·(rowsum(dout∘o_blk) -
    rowsum(dout∘out))``) checked on CPU: FlexAttention is replaced by the float64 autograd twin."""
    from olmo_attn.ops import flex as flex_ops

    B, T, Tp, hq, hkv, D = 1, 11, 7, 4, 2, 8
    g = torch.Generator().manual_seed(13)
    q, dout = (torch.randn(B, T, hq, D, generator=g, dtype=F64) for _ in range(2))
    kp, vp = (torch.randn(B, Tp, hkv, D, generator=g, dtype=F64) for _ in range(2))
    ks, vs = (torch.randn(B, T, hkv, D, generator=g, dtype=F64) for _ in range(2))

    def stand_in(q, k, v, causal, *, scale):  # same signature/layout as flex_forward (block mask -> causal)
        return twins.attention(q, k, v, scale=scale, causal=causal)

    monkeypatch.setattr(flex_ops, "flex_forward", stand_in)
    o_a, l_a = twins.attention(q, kp, vp, scale=0.3, causal=False)
    o_b, l_b = twins.attention(q, ks, vs, scale=0.3, causal=True)
    lse = torch.logaddexp(l_a, l_b)
    out = (
        torch.exp(l_a - lse).transpose(1, 2)[..., None] * o_a
        + torch.exp(l_b - lse).transpose(1, 2)[..., None] * o_b
    )
    ga = flex_ops.flex_kernel_backward(dout, q, kp, vp, out, lse, False, scale=0.3)
    gb = flex_ops.flex_kernel_backward(dout, q, ks, vs, out, lse, True, scale=0.3)
    qq = q.clone().requires_grad_(True)
    kk = torch.cat([kp, ks], 1).requires_grad_(True)
    vv = torch.cat([vp, vs], 1).requires_grad_(True)
    full, _ = twins.attention(qq, kk, vv, scale=0.3, causal=True)
    full.backward(dout)
    assert (ga[0] + gb[0] - qq.grad).abs().max() < 1e-10
    assert (torch.cat([ga[1], gb[1]], 1) - kk.grad).abs().max() < 1e-10
    assert (torch.cat([ga[2], gb[2]], 1) - vv.grad).abs().max() < 1e-10
