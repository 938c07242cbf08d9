"""Counter-based dropout: a pure function of (seed, b, h, i, j), matched by the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference.attention as ref
import reference.twins as twins
from olmo_attn.backends.torch_backend import TorchAttentionBackend
from olmo_attn.ops.dropout import keep_mask, keep_tile, new_seed
from olmo_attn.ops.kernel import KernelCall
from olmo_attn.ops.torch_kernel import BlockSizes, TorchKernel

F64 = torch.float64
SMALL = BlockSizes(block_q=8, block_k=4, max_run=12)


def test_keep_mask_is_a_pure_function_of_indices():
    full = keep_mask(1234, 2, 3, 40, 50, 0.3)
    assert full.shape == (2, 3, 40, 50) and full.dtype == torch.bool
    assert torch.equal(full, keep_mask(1234, 2, 3, 40, 50, 0.3))
    tile = keep_tile(
        1234, 0.3, torch.tensor([1]), torch.tensor([2, 0]), torch.arange(10, 17), torch.arange(33, 41)
    )
    assert torch.equal(tile[0, 0], full[1, 2, 10:17, 33:41])
    assert torch.equal(tile[0, 1], full[1, 0, 10:17, 33:41])
    shifted = keep_mask(1234, 2, 3, 10, 8, 0.3, q_offset=30, k_offset=42)
    assert torch.equal(shifted, full[:, :, 30:40, 42:50])
    assert not torch.equal(full, keep_mask(1235, 2, 3, 40, 50, 0.3))
    assert not torch.equal(full, keep_mask(1234 + 2**32, 2, 3, 40, 50, 0.3))  # high seed bits matter


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    m = keep_mask(new_seed(), 2, 4, 256, 256, p).to(torch.float64)
    n = m.numel()
    assert abs(m.mean().item() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n) + 1e-12
    if p > 0:
        # no row/column structure: per-row keep rates scatter like independent coin flips
        rows = m.mean(dim=-1).flatten()
        assert rows.std().item() < 2 * np.sqrt(p * (1 - p) / 256)
        # neighbouring keys are uncorrelated
        a, b = m[..., :-1].flatten(), m[..., 1:].flatten()
        corr = np.corrcoef(a.numpy(), b.numpy())[0, 1]
        assert abs(corr) < 0.02


@pytest.mark.parametrize("varlen", [False, True])
def test_kernel_dropout_matches_reference_with_the_same_mask(varlen):
    p, seed, scale = 0.3, 77, 0.4
    g = torch.Generator().manual_seed(0)
    if varlen:
        cu = [0, 9, 10, 31]
        q, dout = (torch.randn(31, 4, 8, generator=g, dtype=F64) for _ in range(2))
        k, v = (torch.randn(31, 2, 8, generator=g, dtype=F64) for _ in range(2))
        cu_t = torch.tensor(cu, dtype=torch.int32)
        call = KernelCall(
            scale=scale, window=(5, 0), cu_seqlens_q=cu_t, cu_seqlens_k=cu_t, dropout_p=p, dropout_seed=seed
        )
        keep = keep_mask(seed, 1, 4, 31, 31, p)
        ref_kw = dict(scale=scale, window=(5, 0), cu_seqlens_q=cu, cu_seqlens_k=cu, dropout_p=p)
        keep_ref = keep
    else:
        q, dout = (torch.randn(2, 23, 4, 8, generator=g, dtype=F64) for _ in range(2))
        k, v = (torch.randn(2, 23, 2, 8, generator=g, dtype=F64) for _ in range(2))
        call = KernelCall(scale=scale, dropout_p=p, dropout_seed=seed)
        keep_ref = keep_mask(seed, 2, 4, 23, 23, p)
        ref_kw = dict(scale=scale, dropout_p=p)
    kernel = TorchKernel(blocks=SMALL)
    out, lse = kernel.forward(q, k, v, call)
    r_out, r_lse = ref.attention(q.numpy(), k.numpy(), v.numpy(), keep_mask=keep_ref.numpy(), **ref_kw)
    assert np.abs(out.numpy() - r_out).max() < 1e-10
    assert np.abs(lse.numpy() - r_lse).max() < 1e-10  # lse is computed before dropout
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    t_out, _ = twins.attention(qq, kk, vv, keep_mask=keep_ref, **ref_kw)
    t_out.backward(dout)
    for got, want in zip(kernel.backward(dout, q, k, v, out, lse, call), (qq.grad, kk.grad, vv.grad)):
        assert (got - want).abs().max().item() < 1e-10
    # the result does depend on the mask
    no_drop, _ = kernel.forward(q, k, v, KernelCall(**{**call.__dict__, "dropout_p": 0.0}))
    assert (no_drop - out).abs().max() > 1e-3


def test_backend_dropout_only_in_training_mode():
    torch.manual_seed(0)
    B, T, H, D = 2, 24, 4, 8
    q, k, v = (torch.randn(B, T, h, D, dtype=F64) for h in (H, 2, 2))
    plain = TorchAttentionBackend(head_dim=D, n_heads=H, n_kv_heads=2, window_size=(7, 0))
    drop = TorchAttentionBackend(head_dim=D, n_heads=H, n_kv_heads=2, window_size=(7, 0), dropout_p=0.4)
    drop.eval()
    assert torch.equal(drop((q, k, v)), plain((q, k, v)))
    drop.train()
    a, b = drop((q, k, v)), drop((q, k, v))
    assert not torch.allclose(a, plain((q, k, v)))
    assert not torch.equal(a, b)  # a fresh seed per call
    # documents path and plain causal (no window) path also drop in training mode
    causal = TorchAttentionBackend(head_dim=D, n_heads=H, n_kv_heads=2, dropout_p=0.4).train()
    cu = torch.tensor([0, 10, 48], dtype=torch.int32)
    assert not torch.allclose(
        causal((q, k, v)), TorchAttentionBackend(head_dim=D, n_heads=H, n_kv_heads=2)((q, k, v))
    )
    assert torch.isfinite(causal((q, k, v), cu_doc_lens=cu)).all()


def test_backend_dropout_gradients_finite_and_unbiased_in_expectation():
    """E[dropout(P)] = P: averaging many dropout outputs approaches the no-dropout output."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=F64, requires_grad=True) for _ in range(3))
    drop = TorchAttentionBackend(head_dim=8, n_heads=2, dropout_p=0.2, window_size=(5, 0)).train()
    plain = TorchAttentionBackend(head_dim=8, n_heads=2, window_size=(5, 0))
    mean = sum(drop((q, k, v)) for _ in range(300)) / 300
    assert (mean - plain((q, k, v))).abs().max().item() < 0.12
    drop((q, k, v)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keep_mask_bits_identical_on_cuda():
    seed = 2**40 + 12345
    assert torch.equal(
        keep_mask(seed, 2, 8, 128, 300, 0.25, device="cuda").cpu(), keep_mask(seed, 2, 8, 128, 300, 0.25)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_runs_the_blockwise_kernel_with_the_same_bits():
    """CUDA dropout outside plain causal: blockwise kernel on the GPU, same keep bits as on CPU."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 150, 4, 16, generator=g) for _ in range(4))
    call = KernelCall(scale=0.25, window=(40, 0), dropout_p=0.2, dropout_seed=99)
    kernel = TorchKernel()
    out_c, lse_c = kernel.forward(q, k, v, call)
    out_g, lse_g = kernel.forward(q.cuda(), k.cuda(), v.cuda(), call)
    assert (out_g.cpu() - out_c).abs().max() < 1e-4 and (lse_g.cpu() - lse_c).abs().max() < 1e-4
    grads_c = kernel.backward(dout, q, k, v, out_c, lse_c, call)
    grads_g = kernel.backward(dout.cuda(), q.cuda(), k.cuda(), v.cuda(), out_g, lse_g, call)
    for a, b in zip(grads_c, grads_g):
        assert (a - b.cpu()).abs().max() < 1e-3


def test_dropout_probability_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"dropout p=1\.0 must be in \[0, 1\)"):
        keep_mask(0, 1, 1, 2, 2, 1.0)
    with pytest.raises(ValueError, match="must be in"):
        keep_mask(0, 1, 1, 2, 2, -0.1)
