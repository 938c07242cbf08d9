"""RoPE against ``reference.rope`` (forward) and ``reference.twins`` (gradients)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from conformance import baseline
from conformance.tolerances import max_error_budget
from olmo_attn import (
    ABFRoPEScalingConfig,
    BufferCache,
    ComplexRotaryEmbedding,
    ConfigurationError,
    FusedRotaryEmbedding,
    PIRoPEScalingConfig,
    RoPEConfig,
    RoPEScalingConfig,
    RoPEType,
    RotaryEmbedding,
    StepwiseRoPEScalingConfig,
    YaRNRoPEScalingConfig,
    compute_inv_freqs,
    document_position_ids,
)
from reference import rope as ref_rope
from reference import twins

SCALINGS = [
    None,
    ABFRoPEScalingConfig(attention_rescale_factor=1.25, new_theta=2_000_000),
    PIRoPEScalingConfig(attention_rescale_factor=0.9, factor=3.0),
    StepwiseRoPEScalingConfig(
        factor=8.0, low_freq_proportion=0.1, high_freq_proportion=0.3, old_context_len=64
    ),
    YaRNRoPEScalingConfig(factor=4.0, beta_fast=16, beta_slow=2, old_context_len=32),
]
_REF_NAMES = {
    ABFRoPEScalingConfig: "abf",
    PIRoPEScalingConfig: "pi",
    StepwiseRoPEScalingConfig: "stepwise",
    YaRNRoPEScalingConfig: "yarn",
}


def ref_scaling(scaling: RoPEScalingConfig | None) -> dict | None:
    """Our scaling config as the reference's ``{"type": ..., **fields}``."""
    if scaling is None:
        return None
    return {"type": _REF_NAMES[type(scaling)], **dataclasses.asdict(scaling)}


def _id(s) -> str:
    return "none" if s is None else type(s).__name__


# ----- inverse frequencies and HF configs ------------------------------------------------------
@pytest.mark.parametrize("scaling", SCALINGS, ids=_id)
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_inverse_frequencies_match_reference(scaling, dim):
    theta = 10_000
    want, want_rescale = ref_rope.inv_freq(theta, dim, ref_scaling(scaling))
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        if scaling is None:
            got, rescale = compute_inv_freqs(theta, dim, "cpu", dtype), 1.0
        else:
            got, rescale = scaling.compute_scaled_inv_freq(theta, dim, "cpu", dtype)
        assert got.dtype == dtype and got.shape == (dim // 2,)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=0)
        assert rescale == pytest.approx(want_rescale, rel=1e-15)


@pytest.mark.parametrize("scaling", SCALINGS[2:], ids=_id)
def test_to_hf_config_matches_reference(scaling):
    assert scaling.to_hf_config() == pytest.approx(ref_rope.as_scaling(ref_scaling(scaling)).to_hf_config())


def test_abf_has_no_hf_equivalent_and_invalid_stepwise_proportions():
    with pytest.raises(NotImplementedError, match="rope_theta"):
        ABFRoPEScalingConfig().to_hf_config()
    with pytest.raises(ConfigurationError, match="low_freq_proportion"):
        StepwiseRoPEScalingConfig(low_freq_proportion=1.0).compute_scaled_inv_freq(10_000, 64, "cpu")
    with pytest.raises(ConfigurationError, match="high_freq_proportion"):
        StepwiseRoPEScalingConfig(high_freq_proportion=0.0).to_hf_config()


def test_scaling_properties_from_olmo_core_suite():
    q = torch.randn(1, 16, 2, 128)
    k = torch.randn(1, 16, 2, 128)
    vanilla = RotaryEmbedding(head_size=128, theta=500_000)(q, k, head_first=False)
    same = RotaryEmbedding(head_size=128, theta=500_000, scaling=ABFRoPEScalingConfig(new_theta=500_000))
    torch.testing.assert_close(same(q, k, head_first=False), vanilla, rtol=1e-5, atol=1e-6)
    pi1 = RotaryEmbedding(head_size=128, scaling=PIRoPEScalingConfig(factor=1.0))(q, k, head_first=False)
    torch.testing.assert_close(pi1, vanilla, rtol=0, atol=0)
    for s in (PIRoPEScalingConfig(factor=2.0), YaRNRoPEScalingConfig(), ABFRoPEScalingConfig()):
        assert not torch.allclose(
            RotaryEmbedding(head_size=128, scaling=s)(q, k, head_first=False)[0], vanilla[0]
        )
    inv = StepwiseRoPEScalingConfig().compute_scaled_inv_freq(500_000, 128, "cpu")[0]
    base = compute_inv_freqs(500_000, 128, "cpu")
    assert inv[0] == base[0] and inv[-1] != base[-1]  # high band kept, low band scaled
    # the rescale factor multiplies every rotated channel exactly
    r1 = RotaryEmbedding(head_size=128, scaling=ABFRoPEScalingConfig(attention_rescale_factor=1.0))
    r15 = RotaryEmbedding(head_size=128, scaling=ABFRoPEScalingConfig(attention_rescale_factor=1.5))
    torch.testing.assert_close(r15(q, k, head_first=False)[0], 1.5 * r1(q, k, head_first=False)[0])


# ----- RotaryEmbedding / ComplexRotaryEmbedding against the reference ---------------------------
def _rope_cases():
    for variant in ("default", "complex"):
        for scaling in SCALINGS if variant == "default" else [None]:
            for partial in (1.0, 0.5):
                yield variant, scaling, partial


POSITIONS = {
    "aligned": {},
    "start_pos": {"start_pos": 3},
    "docs": {"cu_doc_lens": [0, 3, 9, 11, 16, 24]},  # B=2, T=12; a document spans both rows
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("positions", list(POSITIONS))
@pytest.mark.parametrize(
    "variant,scaling,partial",
    list(_rope_cases()),
    ids=lambda v: _id(v) if not isinstance(v, (str, float)) else str(v),
)
def test_rope_matches_reference(variant, scaling, partial, positions, dtype):
    gen = torch.Generator().manual_seed(7)
    B, T, H, Hkv, D = 2, 12, 4, 2, 16
    theta = 10_000
    q64 = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k64 = torch.randn(B, T, Hkv, D, generator=gen, dtype=torch.float64)
    pos_kw = dict(POSITIONS[positions])
    cfg = RoPEConfig(name=variant, theta=theta, scaling=scaling, partial_rotary_factor=partial)
    rope = cfg.build(D)
    call_kw = dict(pos_kw)
    if "cu_doc_lens" in call_kw:
        call_kw["cu_doc_lens"] = torch.tensor(call_kw["cu_doc_lens"], dtype=torch.int32)
    q, k = q64.to(dtype).clone().requires_grad_(), k64.to(dtype).clone().requires_grad_()
    out_q, out_k = rope(q, k, head_first=False, **call_kw)
    assert out_q.dtype == dtype and out_q.shape == q.shape and out_k.shape == k.shape

    # reference: per-document complex RoPE = complex RoPE applied to each document separately
    ref_kw = dict(theta=theta, scaling=ref_scaling(scaling), partial_rotary_factor=partial)
    qt, kt = q64.clone().requires_grad_(), k64.clone().requires_grad_()
    if variant == "complex" and positions == "docs":
        cu = pos_kw["cu_doc_lens"]
        outs = [
            twins.apply_rope(
                qt.reshape(1, B * T, H, D)[:, a:b],
                kt.reshape(1, B * T, Hkv, D)[:, a:b],
                variant="complex",
                **ref_kw,
            )
            for a, b in itertools.pairwise(cu)
        ]
        ref_q = torch.cat([o[0] for o in outs], 1).reshape(B, T, H, D)
        ref_k = torch.cat([o[1] for o in outs], 1).reshape(B, T, Hkv, D)
    else:
        ref_q, ref_k = twins.apply_rope(qt, kt, variant=variant, **ref_kw, **pos_kw)
        np_q, _ = ref_rope.apply_rope(q64.numpy(), k64.numpy(), variant=variant, **ref_kw, **pos_kw)
        np.testing.assert_allclose(ref_q.detach().numpy(), np_q, rtol=0, atol=1e-13)  # twin == NumPy
    dq = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    dk = torch.randn(k.shape, generator=gen, dtype=torch.float64)
    (out_q.double() * dq).sum().add((out_k.double() * dk).sum()).backward()
    (ref_q * dq).sum().add((ref_k * dk).sum()).backward()
    pairs = [
        ("q", out_q.detach(), ref_q.detach()),
        ("k", out_k.detach(), ref_k.detach()),
        ("dq", q.grad, qt.grad),
        ("dk", k.grad, kt.grad),
    ]
    if dtype == torch.float64:
        for name, got, want in pairs:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
        return
    # float32 budget. The tables are float32 by design (OLMo-core and HF compute the angles
    # p * inv_freq in float32, and identical weights must give identical outputs), so the plain
    # float32 baseline rotates with the module's own float32 tables; their accuracy is checked
    # against the reference in float64 above and in test_inverse_frequencies_match_reference.
    if positions == "docs":
        q_pos = k_pos = ref_rope.document_positions(pos_kw["cu_doc_lens"], B * T).reshape(B, T)
    else:
        qp, kp = ref_rope.rope_positions(T, T, start_pos=pos_kw.get("start_pos"))
        q_pos, k_pos = np.tile(qp, (B, 1)), np.tile(kp, (B, 1))
    tables = rope.get_buffers(int(max(q_pos.max(), k_pos.max())) + 1, "cpu")
    if variant == "complex":
        sin_t, cos_t = tables.freqs_cis.imag, tables.freqs_cis.real
    else:
        sin_t, cos_t = tables.pos_sin, tables.pos_cos
    sq, cq, sk, ck = (
        t[torch.as_tensor(p)][:, :, None]
        for t, p in ((sin_t, q_pos), (cos_t, q_pos), (sin_t, k_pos), (cos_t, k_pos))
    )
    rot = baseline.rotate_complex if variant == "complex" else baseline.rotate_half
    ql, kl = q64.to(dtype).clone().requires_grad_(), k64.to(dtype).clone().requires_grad_()
    low_q, low_k = rot(ql, sq, cq), rot(kl, sk, ck)
    (low_q.double() * dq).sum().add((low_k.double() * dk).sum()).backward()
    lows = {"q": low_q.detach(), "k": low_k.detach(), "dq": ql.grad, "dk": kl.grad}
    for name, got, want in pairs:
        verdict = max_error_budget(name, got, want, lows[name], dtype)
        assert verdict.passed, verdict.message


@pytest.mark.parametrize("variant", ["default", "complex"])
def test_head_first_equals_sequence_first(variant):
    rope = RoPEConfig(name=variant).build(16)
    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)
    sf_q, sf_k = rope(q, k, head_first=False)
    hf_q, hf_k = rope(q.transpose(1, 2), k.transpose(1, 2), head_first=True)
    torch.testing.assert_close(hf_q.transpose(1, 2), sf_q, rtol=0, atol=0)
    torch.testing.assert_close(hf_k.transpose(1, 2), sf_k, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["default", "complex"])
def test_queries_align_to_the_end_of_the_keys(variant):
    rope = RoPEConfig(name=variant).build(16)
    q, k = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    full_q, full_k = rope(q, k, head_first=False)
    last_q, same_k = rope(q[:, -1:], k, head_first=False)
    torch.testing.assert_close(last_q, full_q[:, -1:], rtol=0, atol=0)
    torch.testing.assert_close(same_k, full_k, rtol=0, atol=0)
    # start_pos=0 is the default placement; start_pos=p rotates both by rows [p, p+T)
    torch.testing.assert_close(rope(q, k, head_first=False, start_pos=0)[0], full_q, rtol=0, atol=0)
    tail_q, tail_k = rope(q[:, 4:], k[:, 4:], head_first=False, start_pos=torch.tensor(4, dtype=torch.int32))
    torch.testing.assert_close(tail_q, full_q[:, 4:], rtol=0, atol=0)
    torch.testing.assert_close(tail_k, full_k[:, 4:], rtol=0, atol=0)


def test_partial_rotary_leaves_trailing_channels_untouched():
    rope = RotaryEmbedding(head_size=16, partial_rotary_factor=0.25)
    assert rope.rotary_dim == 4
    q, k = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    out_q, out_k = rope(q, k, head_first=False)
    assert torch.equal(out_q[..., 4:], q[..., 4:]) and torch.equal(out_k[..., 4:], k[..., 4:])
    assert not torch.equal(out_q[:, 1:, :, :4], q[:, 1:, :, :4])


def test_per_document_positions_equal_per_document_application():
    rope = RotaryEmbedding(head_size=8, theta=1_000)
    doc_lens = [[3, 5, 4], [6, 2, 4]]  # OLMo-core's test layout, B=2, T=12
    B, T = 2, 12
    q, k = torch.randn(B, T, 2, 8), torch.randn(B, T, 1, 8)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(np.ravel(doc_lens))]), dtype=torch.int32)
    out_q, out_k = rope(q, k, head_first=False, cu_doc_lens=cu)
    for b in range(B):
        start = 0
        for n in doc_lens[b]:
            sq, sk = rope(q[b : b + 1, start : start + n], k[b : b + 1, start : start + n], head_first=False)
            torch.testing.assert_close(out_q[b : b + 1, start : start + n], sq, rtol=0, atol=0)
            torch.testing.assert_close(out_k[b : b + 1, start : start + n], sk, rtol=0, atol=0)
            start += n


def test_document_position_ids_and_buffers_for_positions():
    cu = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    pos = document_position_ids(cu, 12)
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1]  # past cu[-1]: counts from cu[-1]
    assert pos.tolist() == ref_rope.document_positions(cu.tolist(), 12).tolist()
    for variant in ("default", "complex", "fused"):
        rope = RoPEConfig(name=variant).build(8)
        full = rope.get_buffers(16, "cpu")
        rows = rope.get_buffers_for_positions(pos, "cpu")
        for name in ("pos_sin", "pos_cos", "freqs_cis"):
            want = getattr(full, name)
            if want is not None:
                assert torch.equal(getattr(rows, name), want[pos]), (variant, name)
    with pytest.raises(ValueError, match="1-D"):
        document_position_ids(torch.tensor([[0, 2]]), 2)
    with pytest.raises(ValueError, match=">= 0"):
        RotaryEmbedding(head_size=8).get_buffers_for_positions(torch.tensor([-1, 0]), "cpu")


@pytest.mark.parametrize("variant", ["default", "complex"])
def test_context_parallel_rows_reproduce_per_document_rope(variant):
    """CP contract: rows built from per-document positions before sharding, passed per local token,
    give every token the rotation of the unsharded per-document run (any sharding order)."""
    rope = RoPEConfig(name=variant).build(8)
    T = 16
    cu = torch.tensor([0, 5, 11, 16], dtype=torch.int32)
    q, k = torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8)
    full_q, full_k = rope(q, k, head_first=False, cu_doc_lens=cu)
    rows = rope.get_buffers_for_positions(document_position_ids(cu, T), "cpu")
    shard = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15])  # zig-zag rank 0 of 2
    kw = (
        {"freqs_cis": rows.freqs_cis[shard]}
        if variant == "complex"
        else {"pos_sin": rows.pos_sin[shard], "pos_cos": rows.pos_cos[shard]}
    )
    local_q, local_k = rope(q[:, shard], k[:, shard], head_first=False, **kw)
    torch.testing.assert_close(local_q, full_q[:, shard], rtol=0, atol=0)
    torch.testing.assert_close(local_k, full_k[:, shard], rtol=0, atol=0)


# ----- FusedRotaryEmbedding --------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [None, YaRNRoPEScalingConfig(factor=2.0)], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_equals_default_rope_and_reference(scaling, dtype):
    fused = FusedRotaryEmbedding(head_size=16, theta=10_000, scaling=scaling)
    plain = RotaryEmbedding(head_size=16, theta=10_000, scaling=scaling)
    qkv = torch.randn(2, 6, 3, 4, 16, dtype=torch.float64).to(dtype)
    for start in (None, 5):
        out = fused(qkv.clone(), start_pos=start)
        pq, pk = plain(qkv[:, :, 0], qkv[:, :, 1], head_first=False, start_pos=start)
        assert out.dtype == dtype
        torch.testing.assert_close(out[:, :, 0], pq, rtol=0, atol=0)
        torch.testing.assert_close(out[:, :, 1], pk, rtol=0, atol=0)
        assert torch.equal(out[:, :, 2], qkv[:, :, 2])
        if dtype == torch.float64:
            want = ref_rope.apply_rope_packed(
                qkv.numpy(), theta=10_000, scaling=ref_scaling(scaling), start_pos=start
            )
            np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-12)


def test_fused_rope_in_place_contract():
    fused = FusedRotaryEmbedding(head_size=8)
    x = torch.randn(1, 4, 3, 2, 8)
    same = fused(x)
    assert same is x  # float32 input with full precision: rotated in place
    x16 = torch.randn(1, 4, 3, 2, 8, dtype=torch.bfloat16)
    before = x16.clone()
    out = fused(x16)
    assert out is not x16 and torch.equal(x16, before)  # promoted copy, caller's tensor untouched
    low = FusedRotaryEmbedding(head_size=8, full_precision=False)
    assert low(x16) is x16  # full_precision=False: in place in bf16
    # autograd flows through the in-place write
    w = torch.randn(8, 48, requires_grad=True)
    qkv = (torch.randn(1, 4, 8) @ w).view(1, 4, 3, 2, 8)
    fused(qkv).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_fused_rope_documents_and_errors():
    fused = FusedRotaryEmbedding(head_size=8)
    plain = RotaryEmbedding(head_size=8)
    qkv = torch.randn(2, 6, 3, 2, 8)
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
    out = fused(qkv.clone(), cu_doc_lens=cu)
    pq, pk = plain(qkv[:, :, 0], qkv[:, :, 1], head_first=False, cu_doc_lens=cu)
    torch.testing.assert_close(out[:, :, 0], pq, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 1], pk, rtol=0, atol=0)
    with pytest.raises(ConfigurationError, match="partial_rotary_factor"):
        FusedRotaryEmbedding(head_size=8, partial_rotary_factor=0.5)
    with pytest.raises(RuntimeError, match="freqs_cis"):
        fused(qkv, freqs_cis=torch.ones(6, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, D\]"):
        fused(qkv[:, :, 0])
    with pytest.raises(RuntimeError, match="shorter"):
        fused(qkv, pos_sin=torch.zeros(3, 4), pos_cos=torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="mutually exclusive"):
        fused(qkv, start_pos=1, cu_doc_lens=cu)


# ----- buffers, caching, errors ----------------------------------------------------------------
def test_buffers_cached_reused_and_extended():
    cache = BufferCache()
    rope = RotaryEmbedding(head_size=8, cache=cache)
    b8 = rope.get_buffers(8, "cpu")
    assert b8.pos_sin.shape == (8, 8) and b8.freqs_cis is None
    b4 = rope.get_buffers(4, "cpu")
    assert b4.pos_sin.data_ptr() == b8.pos_sin.data_ptr() and b4.pos_sin.shape == (4, 8)  # sliced view
    b16 = rope.get_buffers(16, "cpu")
    assert b16.pos_sin.shape == (16, 8) and torch.equal(b16.pos_sin[:8], b8.pos_sin)
    rope.warmup_cache(32, "cpu")
    (ns,) = cache.namespaces()
    assert cache.with_namespace(ns)["rope_pos_sin"].shape[0] == 32
    q, k = torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    torch.testing.assert_close(rope(q, k), rope(q, k), rtol=0, atol=0)  # repeated calls identical
    fused = FusedRotaryEmbedding(head_size=8)
    assert fused.get_buffers(4, "cpu").pos_sin.shape == (4, 4)
    assert fused.get_buffers(2, "cpu").pos_sin.shape == (4, 4)  # fused returns the longer copy unsliced
    assert ComplexRotaryEmbedding(head_size=8).get_buffers(5, "cpu").freqs_cis.dtype == torch.complex64


def test_rope_modules_have_no_parameters_or_buffers():
    for variant in RoPEType:
        rope = RoPEConfig(name=variant).build(8)
        assert list(rope.parameters()) == [] and rope.state_dict() == {}


def test_passed_buffers_are_used_and_checked():
    rope = RotaryEmbedding(head_size=8)
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    tables = rope.get_buffers(10, "cpu")
    out = rope(q, k, head_first=False, start_pos=2, pos_sin=tables.pos_sin, pos_cos=tables.pos_cos)
    rows = rope.get_buffers(6, "cpu")
    torch.testing.assert_close(out, rope(q, k, head_first=False, start_pos=2), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="shorter than required"):
        rope(q, k, head_first=False, start_pos=4, pos_sin=rows.pos_sin, pos_cos=rows.pos_cos)


def test_low_precision_rotation_when_not_full_precision():
    rope = RotaryEmbedding(head_size=8, full_precision=False)
    q = torch.randn(1, 5, 2, 8).to(torch.bfloat16)
    out_q, _ = rope(q, q, head_first=False)
    tables = rope.get_buffers(5, "cpu")
    sin, cos = (
        tables.pos_sin.to(torch.bfloat16)[None, :, None],
        tables.pos_cos.to(torch.bfloat16)[None, :, None],
    )
    x1, x2 = q.chunk(2, -1)
    assert torch.equal(out_q, q * cos + torch.cat((-x2, x1), -1) * sin)
    # complex RoPE also runs in bf16 (OLMo-core's view_as_complex cannot)
    cq, _ = ComplexRotaryEmbedding(head_size=8, full_precision=False)(q, q, head_first=False)
    assert cq.dtype == torch.bfloat16


def test_rope_input_errors():
    rope = RotaryEmbedding(head_size=8)
    q = torch.randn(1, 4, 1, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="freqs_cis"):
        rope(q, q, freqs_cis=torch.ones(4, 4, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="mutually exclusive"):
        rope(q, q, head_first=False, start_pos=0, cu_doc_lens=cu)
    with pytest.raises(RuntimeError, match="q_len == k_len"):
        rope(q[:, :2], q, head_first=False, cu_doc_lens=cu)
    with pytest.raises(TypeError, match="int32"):
        rope(q, q, head_first=False, cu_doc_lens=cu.long())
    with pytest.raises(ValueError, match="must equal"):
        rope(q, q, head_first=False, cu_doc_lens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="start_pos"):
        rope(q, q, head_first=False, start_pos=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_pos"):
        rope(q, q, head_first=False, start_pos=-1)
    complex_rope = ComplexRotaryEmbedding(head_size=8)
    with pytest.raises(RuntimeError, match="pos_sin"):
        complex_rope(q, q, pos_sin=torch.zeros(4, 8), pos_cos=torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="shorter"):
        complex_rope(q, q, head_first=False, freqs_cis=torch.ones(2, 4, dtype=torch.complex64))


def test_rope_configuration_errors():
    with pytest.raises(ConfigurationError, match="scaling"):
        RoPEConfig(name="complex", scaling=PIRoPEScalingConfig()).build(8)
    with pytest.raises(ConfigurationError, match="even"):
        RotaryEmbedding(head_size=10, partial_rotary_factor=0.5)  # 5 rotated channels
    with pytest.raises(ConfigurationError, match="partial_rotary_factor"):
        RotaryEmbedding(head_size=8, partial_rotary_factor=0.0)
    with pytest.raises(ConfigurationError, match="theta"):
        RotaryEmbedding(head_size=8, theta=0)
    with pytest.raises(ValueError):
        RoPEConfig(name="alibi")  # type: ignore[arg-type]


def test_rope_config_build_turns_type_errors_into_configuration_errors(monkeypatch):
    cfg = RoPEConfig()
    monkeypatch.setattr(
        RoPEConfig, "as_dict", lambda self, **kw: {"name": "default", "no_global_rope": False, "bogus": 1}
    )
    with pytest.raises(ConfigurationError, match="bogus"):
        cfg.build(8)


def test_autocast_is_disabled_for_buffers_and_rotation():
    rope = RotaryEmbedding(head_size=8)
    q = torch.randn(1, 4, 1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = rope(q, q, head_first=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rope(q, q, head_first=False)[0], rtol=0, atol=0)


# ----- config round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("scaling", SCALINGS, ids=_id)
def test_rope_config_round_trips(scaling):
    cfg = RoPEConfig(
        name="default", theta=10_000, scaling=scaling, partial_rotary_factor=0.5, no_global_rope=True
    )
    for data in (cfg.as_dict(), cfg.as_config_dict(), cfg.as_dict(exclude_none=True, json_safe=True)):
        assert RoPEConfig.from_dict(data) == cfg
    assert RoPEConfig.from_json(cfg.to_json()) == cfg
    assert RoPEConfig.from_yaml(cfg.to_yaml()) == cfg


def test_scaling_from_dict_dispatch():
    olmo_core_shape = {"_CLASS_": "olmo_core.nn.rope.PIRoPEScalingConfig", "factor": 4.0}
    assert RoPEScalingConfig.from_dict(olmo_core_shape) == PIRoPEScalingConfig(factor=4.0)
    assert RoPEScalingConfig.from_dict({"new_theta": 10}) == ABFRoPEScalingConfig(new_theta=10)
    assert RoPEScalingConfig.from_dict({"beta_fast": 8}) == YaRNRoPEScalingConfig(beta_fast=8)
    # older OLMo-core YaRN dicts carry a derived attention_rescale_factor: dropped on load
    yarn = {"_CLASS_": "x.YaRNRoPEScalingConfig", "factor": 2.0, "attention_rescale_factor": 1.07}
    assert RoPEScalingConfig.from_dict(yarn) == YaRNRoPEScalingConfig(factor=2.0)
    with pytest.raises(ConfigurationError, match="cannot tell"):
        RoPEScalingConfig.from_dict({"factor": 2.0})
    with pytest.raises(ConfigurationError, match="unknown RoPE scaling class"):
        RoPEScalingConfig.from_dict({"_CLASS_": "a.NTKScaling"})
    with pytest.raises(ConfigurationError, match="got a"):
        PIRoPEScalingConfig.from_dict({"_CLASS_": "a.YaRNRoPEScalingConfig"})
    assert math.isclose(YaRNRoPEScalingConfig(factor=math.e).get_attention_rescale_factor(), 1.1)


def test_complex_rope_module_can_be_moved():
    """``ComplexRotaryEmbedding`` must not shadow ``nn.Module._apply`` (``.to()`` / ``.cuda()`` use it)."""
    from olmo_attn import Attention, RoPEConfig

    attn = Attention(d_model=32, n_heads=2, rope=RoPEConfig(name="complex")).to(torch.float64)
    assert attn(torch.randn(1, 5, 32, dtype=torch.float64)).shape == (1, 5, 32)
