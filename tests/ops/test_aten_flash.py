"""TorchKernel's bundled-flash path (``aten._flash_attention_forward/_backward``).

CPU: the argument translation (dense -> varlen segments, windows, LSE layout and its +inf rows)
against a float64 emulation of the flash varlen ops' documented semantics, judged by the blockwise
kernel. GPU: the real ops against FlexAttention in bf16.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from olmo_attn.ops import aten_flash
from olmo_attn.ops.kernel import KernelCall
from olmo_attn.ops.torch_kernel import TorchKernel

F64 = torch.float64


def _allowed(tq: int, tk: int, causal: bool, left: int, right: int) -> torch.Tensor:
    """flash-attn 2's mask for one segment: bottom-right aligned, ``-1`` = unbounded side."""
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    m = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        m &= j <= i
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m


class FakeFlash:
    """Float64 stand-ins for the two aten ops (varlen layout only, as the adapter calls them)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def _segments(self, q, k, v, cu_q, cu_k, causal, left, right, scale):
        g = q.shape[1] // k.shape[1]
        for s in range(cu_q.numel() - 1):
            qa, qb, ka, kb = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            qs = q[qa:qb].transpose(0, 1)  # [Hq, tq, D]
            ks = k[ka:kb].repeat_interleave(g, dim=1).transpose(0, 1)
            vs = v[ka:kb].repeat_interleave(g, dim=1).transpose(0, 1)
            allowed = _allowed(qb - qa, kb - ka, causal, left, right)
            scores = (qs @ ks.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
            yield (qa, qb, ka, kb), qs, ks, vs, allowed, scores

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, p, causal, return_debug_mask=False, **kw):
        self.calls.append({"op": "fwd", "q": tuple(q.shape), "cu_q": cu_q.tolist(), "cu_k": cu_k.tolist(),
                           "max_q": max_q, "max_k": max_k, "causal": causal, **kw})  # fmt: skip
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and p == 0.0
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), math.inf, dtype=F64)
        args = (kw["window_size_left"], kw["window_size_right"], kw["scale"])
        for (qa, qb, _, _), _, _, vs, _, scores in self._segments(q, k, v, cu_q, cu_k, causal, *args):
            m = torch.logsumexp(scores, dim=-1)  # [Hq, tq]; -inf on empty rows
            p_ = torch.exp(scores - m[..., None]).nan_to_num(0.0)
            out[qa:qb] = (p_ @ vs).transpose(0, 1)
            lse[:, qa:qb] = m.masked_fill(torch.isneginf(m), math.inf)  # flash: +inf on empty rows
        return out, lse, torch.zeros(2), torch.empty(0), torch.empty(0)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, p, causal, rng, unused, **kw):
        self.calls.append({"op": "bwd", "causal": causal, **kw})
        assert lse.shape == (q.shape[1], q.shape[0]) and not torch.isneginf(lse).any()
        g = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        args = (kw["window_size_left"], kw["window_size_right"], kw["scale"])
        for (qa, qb, ka, kb), qs, ks, vs, _, scores in self._segments(q, k, v, cu_q, cu_k, causal, *args):
            pr = torch.exp(scores - lse[:, qa:qb, None])  # [Hq, tq, tk]
            do, o = dout[qa:qb].transpose(0, 1), out[qa:qb].transpose(0, 1)
            ds = pr * (do @ vs.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
            dq[qa:qb] = (ds @ ks * kw["scale"]).transpose(0, 1)
            dks = (ds.transpose(-1, -2) @ qs * kw["scale"]).transpose(0, 1)  # [tk, Hq, D]
            dvs = (pr.transpose(-1, -2) @ do).transpose(0, 1)
            dk[ka:kb] = dks.unflatten(1, (-1, g)).sum(2)
            dv[ka:kb] = dvs.unflatten(1, (-1, g)).sum(2)
        return dq, dk, dv


@pytest.fixture
def fake(monkeypatch) -> FakeFlash:
    f = FakeFlash()
    monkeypatch.setattr(aten_flash, "_forward_op", lambda: f.forward)
    monkeypatch.setattr(aten_flash, "_backward_op", lambda: f.backward)
    return f


def _problem(rng: random.Random, seed: int):
    hkv = rng.choice([1, 2])
    hq, d = hkv * rng.choice([1, 3]), 8
    kw = dict(scale=rng.uniform(0.2, 0.8), causal=rng.random() < 0.7,
              window=(rng.choice([-1, 0, 3, 11]), rng.choice([-1, 0, 2])))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    if rng.random() < 0.5:  # dense, Tq != Tk allowed (rows with no key when causal and Tq > Tk)
        b, tq, tk = rng.randint(1, 2), rng.randint(1, 30), rng.randint(1, 30)
        lq, lk, call = (b, tq), (b, tk), KernelCall(**kw)
    else:
        tq, tk, n = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 4)
        cu_q = [0, *sorted(rng.randint(0, tq) for _ in range(n - 1)), tq]
        cu_k = [0, *sorted(rng.randint(0, tk) for _ in range(n - 1)), tk]
        lq, lk = (tq,), (tk,)
        call = KernelCall(**kw, cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
                          cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32))  # fmt: skip
    mk = lambda lead, h: torch.randn(*lead, h, d, generator=g, dtype=F64)
    return call, mk(lq, hq), mk(lk, hkv), mk(lk, hkv), mk(lq, hq)


@pytest.mark.parametrize("seed", range(40))
def test_translation_matches_blockwise(seed, fake):
    call, q, k, v, dout = _problem(random.Random(seed), seed)
    ref = TorchKernel(impl="blockwise")
    out_r, lse_r = ref.forward(q, k, v, call)
    out, lse = TorchKernel(impl="flash").forward(q, k, v, call)
    assert lse.shape == lse_r.shape and out.shape == out_r.shape
    torch.testing.assert_close(out, out_r, atol=1e-12, rtol=1e-10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_r))  # empty rows: -inf, ours
    fin = torch.isfinite(lse_r)
    torch.testing.assert_close(lse[fin], lse_r[fin], atol=1e-12, rtol=1e-10)
    grads_r = ref.backward(dout, q, k, v, out_r, lse_r, call)
    grads = TorchKernel(impl="flash").backward(dout, q, k, v, out_r, lse_r, call)
    for got, want in zip(grads, grads_r, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9)


def test_window_and_segments_reach_the_op(fake):
    q, k = torch.randn(2, 5, 4, 8, dtype=F64), torch.randn(2, 7, 2, 8, dtype=F64)
    TorchKernel(impl="flash").forward(q, k, k, KernelCall(scale=0.5, causal=True, window=(3, -1)))
    c = fake.calls[-1]
    assert c["cu_q"] == [0, 5, 10] and c["cu_k"] == [0, 7, 14] and (c["max_q"], c["max_k"]) == (5, 7)
    assert (c["window_size_left"], c["window_size_right"], c["causal"]) == (3, 0, True)
    TorchKernel(impl="flash").forward(q, k, k, KernelCall(scale=0.5, causal=False, window=(3, 2)))
    assert (fake.calls[-1]["window_size_left"], fake.calls[-1]["window_size_right"]) == (3, 2)


def test_unexpected_lse_layout_is_an_error(monkeypatch):
    def padded(q, k, v, cu_q, *a, **kw):  # the older padded [n_seg, Hq, max_q] layout
        return torch.zeros_like(q), torch.zeros(cu_q.numel() - 1, q.shape[1], 4), None, None, None

    monkeypatch.setattr(aten_flash, "_forward_op", lambda: padded)
    q = torch.randn(1, 4, 2, 8, dtype=F64)
    with pytest.raises(RuntimeError, match="OLMO_ATTN_TORCH_LSE_KERNEL=flex"):
        aten_flash.aten_flash_forward(q, q, q, KernelCall(scale=1.0))


def test_not_chosen_off_cuda():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert not aten_flash.aten_flash_supported(q, KernelCall(scale=1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (100, 0)])
def test_gpu_bf16_matches_flex(varlen, window):
    g = torch.Generator().manual_seed(3)
    T, Hq, Hkv, D = 700, 8, 2, 128
    mk = lambda h: torch.randn(T, h, D, generator=g).to("cuda", torch.bfloat16)
    q, k, v, dout = mk(Hq), mk(Hkv), mk(Hkv), mk(Hq)
    if varlen:
        cu = torch.tensor([0, 1, 260, 700], dtype=torch.int32, device="cuda")
        call = KernelCall(scale=D**-0.5, window=window, cu_seqlens_q=cu, cu_seqlens_k=cu)
    else:
        q, k, v, dout = (t[None] for t in (q, k, v, dout))
        call = KernelCall(scale=D**-0.5, window=window)
    assert aten_flash.aten_flash_supported(q, call)
    res = {}
    for impl in ("flash", "flex"):
        kern = TorchKernel(impl=impl)
        out, lse = kern.forward(q, k, v, call)
        res[impl] = (out.float(), lse, *(x.float() for x in kern.backward(dout, q, k, v, out, lse, call)))
    for a, b in zip(res["flash"], res["flex"], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
