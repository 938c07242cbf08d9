"""Bad forward inputs: each raises a typed error naming the argument, or computes the right result."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from olmo_attn.attention import Attention, FusedAttention, GateConfig, NormalizedAttention
from olmo_attn.buffer_cache import BufferCache
from olmo_attn.exceptions import InvalidInputError, InvalidInputTypeError, OLMoAttnError
from olmo_attn.norm import LayerNormConfig
from olmo_attn.rope import (
    ComplexRotaryEmbedding,
    FusedRotaryEmbedding,
    RoPEConfig,
    RotaryEmbedding,
    YaRNRoPEScalingConfig,
)

D_MODEL, N_HEADS = 32, 4
HEAD = D_MODEL // N_HEADS


def _int32(values: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _attention(**kw: Any) -> Attention:
    torch.manual_seed(0)
    return Attention(d_model=D_MODEL, n_heads=N_HEADS, backend="torch", **kw)


MODULES: dict[str, Callable[[], torch.nn.Module]] = {
    "attention": lambda: _attention(rope=RoPEConfig()),
    "fused": lambda: FusedAttention(d_model=D_MODEL, n_heads=N_HEADS, rope=RoPEConfig(name="fused")),
    "normalized": lambda: NormalizedAttention(d_model=D_MODEL, n_heads=N_HEADS, rope=RoPEConfig()),
}


def _raises(exc: type[Exception], call: Callable[[], Any], *needles: str) -> str:
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, OLMoAttnError)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ----- x ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODULES))
def test_x_of_wrong_width_names_x_and_d_model(kind: str) -> None:
    m = MODULES[kind]()
    msg = _raises(InvalidInputError, lambda: m(torch.randn(2, 5, D_MODEL - 1)), "x", f"d_model={D_MODEL}")
    assert f"[B, T, {D_MODEL}]" in msg


@pytest.mark.parametrize("kind", list(MODULES))
def test_integer_x_is_a_type_error(kind: str) -> None:
    m = MODULES[kind]()
    _raises(InvalidInputTypeError, lambda: m(torch.ones(2, 5, D_MODEL, dtype=torch.long)), "x", "int64")


@pytest.mark.parametrize("kind", list(MODULES))
def test_x_dtype_other_than_parameters_is_a_type_error(kind: str) -> None:
    m = MODULES[kind]()
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    _raises(InvalidInputTypeError, lambda: m(x), "x", "float64", "float32", "autocast")
    # the fix in the message works: the module converted to float64 runs
    assert m.to(torch.float64)(x).dtype == torch.float64


def test_x_not_3d_or_not_a_tensor() -> None:
    m = _attention()
    _raises(InvalidInputError, lambda: m(torch.randn(5, D_MODEL)), "x", "(5, 32)", "unsqueeze")
    _raises(InvalidInputTypeError, lambda: m([[0.0] * D_MODEL]), "x", "list")


def test_other_float_dtype_under_autocast_is_accepted() -> None:
    m = _attention()
    x = torch.randn(2, 5, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())
    assert out.shape == (2, 5, D_MODEL)
    torch.testing.assert_close(out.float(), m(x), atol=0.1, rtol=0.1)


# ----- empty batch / sequence -------------------------------------------------------------------------
EMPTY_MODULES = {
    **MODULES,
    "attention-gate-qknorm": lambda: _attention(
        rope=RoPEConfig(), gate=GateConfig(), qk_norm=LayerNormConfig(name="rms")
    ),
}


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B=0", "T=0"])
@pytest.mark.parametrize("kind", list(EMPTY_MODULES))
def test_empty_input_gives_empty_output_and_zero_gradients(kind: str, shape: tuple[int, int]) -> None:
    m = EMPTY_MODULES[kind]()
    x = torch.randn(*shape, D_MODEL, requires_grad=True)
    out = m(x)
    assert out.shape == (*shape, D_MODEL) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) == 0, name


def test_empty_input_under_autocast_has_the_autocast_dtype() -> None:
    m = _attention()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(0, 3, D_MODEL)).dtype == m(torch.randn(1, 3, D_MODEL)).dtype


def test_empty_step_with_kv_cache_leaves_cache_untouched() -> None:
    m = _attention(rope=RoPEConfig())
    m.init_kv_cache_manager(2, 8)
    x = torch.randn(2, 3, D_MODEL)
    m(x)
    assert m(torch.randn(2, 0, D_MODEL)).shape == (2, 0, D_MODEL)
    assert m.kv_cache_manager is not None and m.kv_cache_manager.seqlen == 3
    _raises(InvalidInputError, lambda: m(torch.randn(0, 1, D_MODEL)), "batch size 0", "batch_size=2")


# ----- local_k_slice -------------------------------------------------------------------------------------
def _llama3_args() -> dict[str, Any]:
    # 8 query tokens (B=2, T=4) in two segments; the keys of the segments are keys [2, 8) of the 8
    return dict(cu_doc_lens_q=_int32([0, 4, 8]), cu_doc_lens_k=_int32([0, 3, 6]))


@pytest.mark.parametrize(
    ("bad", "exc", "needles"),
    [
        (slice(0, 1000), InvalidInputError, ["local_k_slice", "1000", "8 keys"]),
        (slice(0, 8, 2), InvalidInputError, ["local_k_slice", "step 2"]),
        (slice(-100, None), InvalidInputError, ["local_k_slice", "-100"]),
        (slice(5, 5), InvalidInputError, ["local_k_slice", "no keys"]),
        (slice(6, 2), InvalidInputError, ["local_k_slice", "no keys"]),
        ((2, 8), InvalidInputTypeError, ["local_k_slice", "tuple"]),
        (slice(0.5, 8), InvalidInputTypeError, ["local_k_slice.start", "0.5"]),
        (slice(True, 8), InvalidInputTypeError, ["local_k_slice.start"]),
    ],
    ids=["past-end", "stepped", "before-start", "empty", "reversed", "tuple", "float", "bool"],
)
def test_bad_local_k_slice_is_typed(bad: Any, exc: type[Exception], needles: list[str]) -> None:
    m = _attention()
    _raises(exc, lambda: m(torch.randn(2, 4, D_MODEL), **_llama3_args(), local_k_slice=bad), *needles)


def _reference_llama3(
    m: Attention, x: torch.Tensor, a: int, cu_q: list[int], cu_k: list[int]
) -> torch.Tensor:
    """float64 reference: query segment i attends key segment i (keys ``a + cu_k``) bottom-right
    causally; a query without a visible key contributes zeros."""
    B, T, _ = x.shape
    q = m.w_q(x).reshape(B * T, N_HEADS, HEAD)
    k = m.w_k(x).reshape(B * T, N_HEADS, HEAD)[a:]
    v = m.w_v(x).reshape(B * T, N_HEADS, HEAD)[a:]
    out = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        tq, tk = q1 - q0, k1 - k0
        for t in range(tq):
            visible = [k0 + j for j in range(tk) if j <= t + tk - tq]
            if not visible:
                continue
            scores = torch.einsum("hd,jhd->hj", q[q0 + t], k[visible]) / math.sqrt(HEAD)
            out[q0 + t] = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[visible])
    return m.w_out(out.reshape(B, T, -1))


@pytest.mark.parametrize("given", [slice(-6, None), slice(2, None), slice(-6, 8), slice(2, 8, 1)])
def test_local_k_slice_negative_and_open_bounds_compute_the_right_result(given: slice) -> None:
    m = _attention(dtype=torch.float64)
    x = torch.randn(2, 4, D_MODEL, dtype=torch.float64)
    out = m(x, **_llama3_args(), local_k_slice=given)
    ref = _reference_llama3(m, x, 2, [0, 4, 8], [0, 3, 6])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ----- RoPE tables ---------------------------------------------------------------------------------------
def test_half_width_tables_for_full_rotary_rope_raise() -> None:
    m = _attention(rope=RoPEConfig())
    x = torch.randn(1, 6, D_MODEL)
    half = torch.randn(6, HEAD // 2)
    _raises(InvalidInputError, lambda: m(x, pos_sin=half, pos_cos=half), "pos_sin", "partial_rotary_factor")


def test_half_width_tables_for_partial_rope_are_used() -> None:
    m = _attention(rope=RoPEConfig(partial_rotary_factor=0.5))
    x = torch.randn(1, 6, D_MODEL)
    assert m.rope is not None
    tables = m.rope.get_buffers(6, "cpu")
    assert tables.pos_sin is not None and tables.pos_sin.shape == (6, HEAD // 2)
    torch.testing.assert_close(m(x, pos_sin=tables.pos_sin, pos_cos=tables.pos_cos), m(x), rtol=0, atol=0)


def test_too_wide_tables_raise() -> None:
    m = _attention(rope=RoPEConfig())
    wide = torch.randn(6, 2 * HEAD)
    _raises(
        InvalidInputError,
        lambda: m(torch.randn(1, 6, D_MODEL), pos_sin=wide, pos_cos=wide),
        "pos_sin",
        str(2 * HEAD),
        f"width {HEAD}",
    )


@pytest.mark.parametrize("which", ["pos_sin", "pos_cos"])
def test_one_table_without_the_other_raises_naming_both(which: str) -> None:
    m = _attention(rope=RoPEConfig())
    table = torch.randn(6, HEAD)
    _raises(InvalidInputError, lambda: m(torch.randn(1, 6, D_MODEL), **{which: table}), "pos_sin", "pos_cos")


def test_table_rank_dtype_and_mismatched_shapes() -> None:
    rope = RotaryEmbedding(head_size=HEAD)
    q = torch.randn(1, 6, 2, HEAD)
    t = torch.randn(6, HEAD)
    _raises(InvalidInputError, lambda: rope(q, q, False, pos_sin=t[None], pos_cos=t[None]), "pos_sin", "2-D")
    _raises(InvalidInputTypeError, lambda: rope(q, q, False, pos_sin=t.long(), pos_cos=t), "pos_sin", "int64")
    _raises(InvalidInputError, lambda: rope(q, q, False, pos_sin=t, pos_cos=t[:5]), "pos_sin", "pos_cos")


def test_fused_and_complex_tables_are_checked() -> None:
    fused = FusedRotaryEmbedding(head_size=HEAD)
    qkv = torch.randn(1, 6, 3, 2, HEAD)
    full = torch.randn(6, HEAD)
    _raises(InvalidInputError, lambda: fused(qkv, pos_sin=full, pos_cos=full), "pos_sin", f"D/2={HEAD // 2}")
    _raises(InvalidInputError, lambda: fused(qkv, pos_sin=full[:, : HEAD // 2]), "pos_sin", "pos_cos")
    cplx = ComplexRotaryEmbedding(head_size=HEAD)
    q = torch.randn(1, 6, 2, HEAD)
    _raises(
        InvalidInputTypeError, lambda: cplx(q, q, False, freqs_cis=torch.randn(6, HEAD // 2)), "freqs_cis"
    )
    wrong = torch.ones(6, HEAD, dtype=torch.complex64)
    _raises(InvalidInputError, lambda: cplx(q, q, False, freqs_cis=wrong), "freqs_cis", f"r/2={HEAD // 2}")


# ----- cache_leftpad and the KV cache ----------------------------------------------------------------
def test_cache_leftpad_without_kv_cache_raises() -> None:
    m = _attention()
    _raises(
        InvalidInputError,
        lambda: m(torch.randn(2, 4, D_MODEL), cache_leftpad=_int32([1, 0])),
        "cache_leftpad",
        "init_kv_cache_manager",
    )


@pytest.mark.parametrize(
    ("leftpad", "max_seq_len", "exc", "needles"),
    [
        ([5, 0], 16, InvalidInputError, ["cache_leftpad[0]=5", "prompt length T=4"]),
        ([0, 12], 10, InvalidInputError, ["cache_leftpad[1]=12", "max_seq_len=10"]),
        ([-1, 0], 16, InvalidInputError, ["cache_leftpad[0]=-1"]),
        ([1.0, 0.0], 16, InvalidInputTypeError, ["cache_leftpad", "float32"]),
        ([1, 0, 0], 16, InvalidInputError, ["cache_leftpad", "(2,)"]),
    ],
    ids=["past-prompt", "past-max-seq-len", "negative", "float", "wrong-shape"],
)
def test_bad_cache_leftpad_at_prefill(leftpad: list, max_seq_len: int, exc: type, needles: list[str]) -> None:
    m = _attention(rope=RoPEConfig())
    m.init_kv_cache_manager(2, max_seq_len)
    _raises(exc, lambda: m(torch.randn(2, 4, D_MODEL), cache_leftpad=torch.tensor(leftpad)), *needles)


def test_cache_leftpad_changed_at_decode_raises_and_equal_is_kept() -> None:
    m = _attention(rope=RoPEConfig())
    m.init_kv_cache_manager(2, 8)
    manager = m.kv_cache_manager
    assert manager is not None
    prompt, step = torch.randn(2, 4, D_MODEL), torch.randn(2, 1, D_MODEL)
    m(prompt, cache_leftpad=_int32([2, 0]))
    _raises(InvalidInputError, lambda: m(step, cache_leftpad=_int32([1, 0])), "cache_leftpad", "[2, 0]")
    assert manager.seqlen == 4 and manager.cache_leftpad.tolist() == [2, 0]  # nothing recorded
    with_same = m(step, cache_leftpad=_int32([2, 0]))
    # a fresh generation with the same prompt and no leftpad at the step gives the same output
    manager.zero_cache()
    m(prompt, cache_leftpad=_int32([2, 0]))
    torch.testing.assert_close(m(step), with_same, rtol=0, atol=0)
    # after zero_cache a new prompt may record a different padding
    manager.zero_cache()
    m(prompt, cache_leftpad=_int32([0, 3]))
    assert manager.cache_leftpad.tolist() == [0, 3]


def test_leftpad_value_checks_skipped_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _attention()
    m.init_kv_cache_manager(2, 8)
    assert m.kv_cache_manager is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    m.kv_cache_manager.check_leftpad(_int32([7, 0]), 4)  # a data-dependent check: skipped
    with pytest.raises(InvalidInputError, match="cache_leftpad"):  # shape checks still run
        m.kv_cache_manager.check_leftpad(_int32([7]), 4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(cu_doc_lens=_int32([0, 3, 8])), "cu_doc_lens"),
        (dict(cu_doc_lens_q=_int32([0, 8]), cu_doc_lens_k=_int32([0, 8])), "cu_doc_lens_q"),
        (dict(max_doc_len=4), "max_doc_len"),
        (dict(local_k_slice=slice(0, 8)), "local_k_slice"),
    ],
    ids=["cu_doc_lens", "cu_doc_lens_q", "max_doc_len", "local_k_slice"],
)
def test_documents_with_kv_cache_name_the_document_argument(kwargs: dict, name: str) -> None:
    m = _attention(rope=RoPEConfig())
    m.init_kv_cache_manager(2, 8)
    msg = _raises(InvalidInputError, lambda: m(torch.randn(2, 4, D_MODEL), **kwargs), name, "KV cache")
    assert "start_pos" not in msg
    assert m.kv_cache_manager is not None and m.kv_cache_manager.seqlen == 0


# ----- cu_doc_lens -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODULES))
def test_meta_cu_doc_lens_is_typed(kind: str) -> None:
    m = MODULES[kind]()
    meta = _int32([0, 4, 8], device="meta")
    _raises(InvalidInputError, lambda: m(torch.randn(2, 4, D_MODEL), cu_doc_lens=meta), "cu_doc_lens", "meta")


def test_cu_doc_lens_errors_are_typed() -> None:
    m = _attention()
    x = torch.randn(2, 4, D_MODEL)
    _raises(InvalidInputTypeError, lambda: m(x, cu_doc_lens=[0, 4, 8]), "cu_doc_lens", "list")
    _raises(InvalidInputTypeError, lambda: m(x, cu_doc_lens=torch.tensor([0, 4, 8])), "cu_doc_lens", "int32")
    _raises(InvalidInputError, lambda: m(x, cu_doc_lens=_int32([0, 4, 7])), "cu_doc_lens[-1]=7")
    _raises(
        InvalidInputError,
        lambda: m(x, cu_doc_lens_q=_int32([0, 4, 8]), cu_doc_lens_k=_int32([0, 8])),
        "cu_doc_lens_q",
        "cu_doc_lens_k",
    )


# ----- BufferCache shared between differently configured layers ------------------------------------
def _layer(kind: str, cache: BufferCache | None, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    theta = 10_000
    if kind == "fused-16":
        return FusedAttention(d_model=64, n_heads=4, rope=RoPEConfig(name="fused", theta=theta), cache=cache)
    head_dim, name, extra = {
        "default-8": (8, "default", {}),
        "default-16": (16, "default", {}),
        "complex-16": (16, "complex", {}),
        "partial-16": (16, "default", dict(partial_rotary_factor=0.5)),
        "yarn-16": (16, "default", dict(scaling=YaRNRoPEScalingConfig(factor=4.0, old_context_len=4))),
    }[kind]
    rope = RoPEConfig(name=name, theta=theta, **extra)
    return Attention(d_model=64, n_heads=4, head_dim=head_dim, rope=rope, backend="torch", cache=cache)


PAIRS = [
    ("default-8", "default-16"),  # same kind, different head dims
    ("default-8", "fused-16"),  # default r=8 and fused D/2=8: same table width, different frequencies
    ("default-16", "complex-16"),
    ("default-16", "partial-16"),
    ("default-16", "yarn-16"),
]


@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("pair", PAIRS, ids=["-vs-".join(p) for p in PAIRS])
def test_shared_buffer_cache_serves_each_layer_its_own_tables(pair: tuple[str, str], order: str) -> None:
    kinds = pair if order == "ab" else pair[::-1]
    x = torch.randn(2, 12, 64)
    shared = BufferCache()
    layers = [_layer(kind, shared, seed) for seed, kind in enumerate(kinds)]
    alone = [_layer(kind, None, seed) for seed, kind in enumerate(kinds)]
    for _ in range(2):  # the second round reads the tables the first one cached
        for with_shared, unshared in zip(layers, alone, strict=True):
            torch.testing.assert_close(with_shared(x), unshared(x), rtol=0, atol=0)
    assert len(shared.namespaces()) >= 2


def test_cache_keeps_tables_per_dtype_and_device() -> None:
    cache = BufferCache()
    rope = RotaryEmbedding(head_size=HEAD, cache=cache)
    cpu32 = rope.get_buffers(8, "cpu").pos_sin
    meta = rope.get_buffers(8, "meta").pos_sin  # a meta table must not replace the CPU one
    assert meta is not None and meta.device.type == "meta"
    again = rope.get_buffers(8, "cpu").pos_sin
    assert again is not None and again.device.type == "cpu" and torch.equal(again, cpu32)
    q = torch.randn(1, 8, 2, HEAD, dtype=torch.float64)
    out, _ = rope(q, q, head_first=False)  # float64 tables under their own key
    ref, _ = RotaryEmbedding(head_size=HEAD)(q, q, head_first=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(rope.get_buffers(8, "cpu").pos_sin, cpu32)
