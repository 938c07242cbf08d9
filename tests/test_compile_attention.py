"""``torch.compile(fullgraph=True)`` of ``Attention``, ``FusedAttention`` and ``NormalizedAttention``
on the torch backend (CPU): plain causal, packed documents whose boundaries change between
batches, sliding window and KV-cache decoding each compile to one graph (a graph break fails
``fullgraph=True``; a recompile shows in the frame count) and match eager mode."""

from __future__ import annotations

import time

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from olmo_attn.attention import Attention, FusedAttention, NormalizedAttention
from olmo_attn.kv_cache import KVCacheOverflowError
from olmo_attn.ops import flex as flex_ops
from olmo_attn.ops.torch_kernel import clear_plan_cache
from olmo_attn.rope import RoPEConfig

D_MODEL, B, T = 32, 2, 16
TOL = {"rtol": 1e-5, "atol": 1e-5}
# three layouts of B * T = 32 flattened tokens into four documents (the tensor shape is fixed)
LAYOUTS = ([0, 5, 16, 20, 32], [0, 9, 12, 30, 32], [0, 1, 2, 31, 32])


def _build(kind: str, window: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "attention":
        return Attention(d_model=D_MODEL, n_heads=4, n_kv_heads=2, backend="torch", window_size=window)
    if kind == "fused":
        return FusedAttention(d_model=D_MODEL, n_heads=4, backend="torch")
    return NormalizedAttention(d_model=D_MODEL, n_heads=4, n_kv_heads=2, backend="torch")


def _pair(kind: str, window: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two modules with the same weights: one runs eagerly, the other compiled."""
    return _build(kind, window), _build(kind, window)


def _compile(
    m: torch.nn.Module, backend: str = "aot_eager"
) -> tuple[torch.nn.Module, CompileCounterWithBackend]:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(m, backend=counter, fullgraph=True), counter


def _fwd_bwd(m: torch.nn.Module, x: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Output, input gradient and parameter gradients of ``sum(out ** 2)``."""
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = m(x, **kw)
    y.square().sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, [None if p.grad is None else p.grad.clone() for p in m.parameters()]


def _assert_same(compiled: tuple, eager: tuple) -> None:
    yc, gxc, gpc = compiled
    ye, gxe, gpe = eager
    torch.testing.assert_close(yc, ye, **TOL)
    torch.testing.assert_close(gxc, gxe, rtol=1e-4, atol=1e-5)
    assert len(gpc) == len(gpe)
    for a, b in zip(gpc, gpe, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _reference(m: torch.nn.Module, x: torch.Tensor, cu: list[int] | None, window: int | None) -> torch.Tensor:
    """float64 dense-mask attention of the module's own projections (causal inside each document)."""
    m64 = _build("attention", window).double()
    m64.load_state_dict(m.state_dict())
    x64 = x.double()
    Bx, Tx, _ = x64.shape
    H, Hkv, Dh = m64.n_heads, m64.n_kv_heads, m64.head_dim
    q = m64.w_q(x64).view(Bx * Tx, H, Dh)
    k = m64.w_k(x64).view(Bx * Tx, Hkv, Dh).repeat_interleave(H // Hkv, dim=1)
    v = m64.w_v(x64).view(Bx * Tx, Hkv, Dh).repeat_interleave(H // Hkv, dim=1)
    i = torch.arange(Bx * Tx)
    cuts = torch.tensor(cu) if cu is not None else torch.arange(0, Bx * Tx + 1, Tx)
    doc = torch.searchsorted(cuts, i, right=True)
    allowed = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    s = torch.einsum("qhd,khd->hqk", q, k) / Dh**0.5
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    att = torch.einsum("hqk,khd->qhd", p, v).reshape(Bx, Tx, H * Dh)
    return m64.w_out(att)


# ----- causal / documents / window: 3 batches, one graph ----------------------------------------
@pytest.mark.parametrize("kind", ["attention", "fused", "normalized"])
def test_causal_one_graph(kind: str) -> None:
    eager, m = _pair(kind)
    cm, counter = _compile(m)
    for _ in range(3):
        x = torch.randn(B, T, D_MODEL)
        _assert_same(_fwd_bwd(cm, x), _fwd_bwd(eager, x))
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind", ["attention", "fused", "normalized"])
@pytest.mark.parametrize("pass_max", [True, False])
def test_documents_one_graph_across_boundaries(kind: str, pass_max: bool) -> None:
    eager, m = _pair(kind)
    cm, counter = _compile(m)
    for layout in LAYOUTS:
        cu = torch.tensor(layout, dtype=torch.int32)
        kw = {"cu_doc_lens": cu, "max_doc_len": 29} if pass_max else {"cu_doc_lens": cu}
        x = torch.randn(B, T, D_MODEL)
        _assert_same(_fwd_bwd(cm, x, **kw), _fwd_bwd(eager, x, **kw))
    assert counter.frame_count == 1


def test_documents_compiled_matches_float64_reference() -> None:
    m = _build("attention")
    cm, counter = _compile(m)
    for layout in LAYOUTS:
        x = torch.randn(B, T, D_MODEL)
        with torch.no_grad():
            y = cm(x, cu_doc_lens=torch.tensor(layout, dtype=torch.int32))
            # the other layouts must not leak in: compare with this layout's own reference
            torch.testing.assert_close(y.double(), _reference(m, x, layout, None), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_sliding_window_one_graph() -> None:
    eager, m = _pair("attention", window=5)
    cm, counter = _compile(m)
    for layout in (None, *LAYOUTS):
        kw = {} if layout is None else {"cu_doc_lens": torch.tensor(layout, dtype=torch.int32)}
        x = torch.randn(B, T, D_MODEL)
        out = _fwd_bwd(cm, x, **kw)
        _assert_same(out, _fwd_bwd(eager, x, **kw))
        torch.testing.assert_close(out[0].double(), _reference(m, x, layout, 5), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2  # one graph without documents, one with


@pytest.mark.parametrize("decode", [False, True])
def test_flex_window_first_compiled_call(monkeypatch: pytest.MonkeyPatch, decode: bool) -> None:
    # AOTAutograd runs a compiled graph's first call under a TorchDispatchMode (its custom-op
    # aliasing check), so our ops' kernels ran with functorch's dispatch keys excluded, and the vmap
    # in FlexAttention's BlockMask (and its eager mask_mod) failed: "Cannot access storage of
    # BatchedTensorImpl" on an H200. CUDA's FlexAttention path, forced on the CPU (uncompiled
    # flex_attention, which has no CPU backward: forward only), from an empty mask cache.
    monkeypatch.setattr(flex_ops, "flex_supported", lambda q, dropout_p: dropout_p == 0.0)
    clear_plan_cache()
    eager, m = _pair("attention", window=5)
    if decode:
        for mod in (eager, m):
            mod.init_kv_cache_manager(B, 8)
    cm, counter = _compile(m)
    with torch.no_grad():
        for n in (4, 1, 1) if decode else (T, T):
            x = torch.randn(B, n, D_MODEL)
            y = cm(x)
            torch.testing.assert_close(y, eager(x), **TOL)
            if not decode:
                torch.testing.assert_close(y.double(), _reference(m, x, None, 5), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == (2 if decode else 1)
    clear_plan_cache()


def test_compiled_documents_still_reject_bad_metadata() -> None:
    # an error inside a traced frame makes Dynamo fall back to eager (fullgraph=True would report
    # that instead of the error): the user still gets the library's message
    torch._dynamo.reset()
    cm = torch.compile(_build("attention"), backend="eager")
    x = torch.randn(B, T, D_MODEL)
    with pytest.raises(TypeError, match=r"cu_doc_lens must have dtype torch\.int32"):
        cm(x, cu_doc_lens=torch.tensor([0, 16, 32], dtype=torch.int64))
    with pytest.raises(ValueError, match="1-D"):
        cm(x, cu_doc_lens=torch.tensor([[0, 16, 32]], dtype=torch.int32))


# ----- KV-cache decoding: prefill, then 5 steps in one graph ------------------------------------
@pytest.mark.parametrize(("kind", "window"), [("attention", None), ("attention", 3), ("normalized", None)])
def test_decoding_one_graph_across_steps(kind: str, window: int | None) -> None:
    eager, m = _pair(kind, window)
    for mod in (eager, m):
        mod.init_kv_cache_manager(B, 12)
    cm, counter = _compile(m)
    with torch.no_grad():
        x = torch.randn(B, 4, D_MODEL)
        torch.testing.assert_close(cm(x), eager(x), **TOL)
        assert counter.frame_count == 1
        for _ in range(5):
            x = torch.randn(B, 1, D_MODEL)
            torch.testing.assert_close(cm(x), eager(x), **TOL)
    assert counter.frame_count == 2  # the prefill's graph and one graph for every decode step
    mc, me = m.kv_cache_manager, eager.kv_cache_manager
    assert mc.seqlen == me.seqlen == 9 and int(mc.cache_seqlens) == 9
    torch.testing.assert_close(mc.k_cache, me.k_cache, **TOL)
    torch.testing.assert_close(mc.v_cache, me.v_cache, **TOL)


def test_decoding_left_padding_and_eager_after_compiled() -> None:
    eager, m = _pair("attention")
    for mod in (eager, m):
        mod.init_kv_cache_manager(B, 10)
    cm, counter = _compile(m)
    leftpad = torch.tensor([2, 0], dtype=torch.int32)
    with torch.no_grad():
        x = torch.randn(B, 4, D_MODEL)
        torch.testing.assert_close(cm(x, cache_leftpad=leftpad), eager(x, cache_leftpad=leftpad), **TOL)
        for _ in range(3):
            x = torch.randn(B, 1, D_MODEL)
            torch.testing.assert_close(cm(x), eager(x), **TOL)
        # eager calls on the module a compiled forward advanced see the right position
        x = torch.randn(B, 1, D_MODEL)
        torch.testing.assert_close(m(x), eager(x), **TOL)
    assert counter.frame_count == 2
    assert m.kv_cache_manager.seqlen == eager.kv_cache_manager.seqlen == 8


def test_decoding_gradient_to_queries() -> None:
    eager, m = _pair("attention")
    for mod in (eager, m):
        mod.init_kv_cache_manager(B, 8)
    cm, counter = _compile(m)
    for n in (3, 1, 1, 1):
        x = torch.randn(B, n, D_MODEL)
        _assert_same(_fwd_bwd(cm, x), _fwd_bwd(eager, x))
    assert counter.frame_count == 2


def test_compiled_decoding_overflow_raises() -> None:
    m = _build("attention")
    m.init_kv_cache_manager(B, 3)
    cm, _ = _compile(m, backend="eager")
    with torch.no_grad():
        cm(torch.randn(B, 2, D_MODEL))
        cm(torch.randn(B, 1, D_MODEL))
        with pytest.raises(KVCacheOverflowError, match="max_seq_len=3"):
            cm(torch.randn(B, 1, D_MODEL))
    assert m.kv_cache_manager.seqlen == 3


# ----- RoPE: positions gathered on the device ----------------------------------------------------
def _rope_module(kind: str, rope: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "fused":
        return FusedAttention(d_model=D_MODEL, n_heads=4, backend="torch", rope=RoPEConfig(name="fused"))
    cls = Attention if kind == "attention" else NormalizedAttention
    return cls(d_model=D_MODEL, n_heads=4, n_kv_heads=2, backend="torch", rope=RoPEConfig(name=rope))


@pytest.mark.parametrize(
    ("kind", "rope"),
    [("attention", "default"), ("attention", "complex"), ("fused", "fused"), ("normalized", "default")],
)
def test_rope_documents_one_graph_across_boundaries(kind: str, rope: str) -> None:
    eager, m = _rope_module(kind, rope), _rope_module(kind, rope)
    # tables already cached: otherwise the first call fills the RoPE cache and the next call
    # recompiles once on the cache's new contents
    m.rope.warmup_cache(B * T, "cpu")
    cm, counter = _compile(m)
    for layout in LAYOUTS:
        kw = {"cu_doc_lens": torch.tensor(layout, dtype=torch.int32)}
        x = torch.randn(B, T, D_MODEL)
        _assert_same(_fwd_bwd(cm, x, **kw), _fwd_bwd(eager, x, **kw))
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("kind", "rope"), [("attention", "default"), ("attention", "complex"), ("normalized", "default")]
)
def test_rope_decoding_one_graph_across_steps(kind: str, rope: str) -> None:
    eager, m = _rope_module(kind, rope), _rope_module(kind, rope)
    for mod in (eager, m):
        mod.init_kv_cache_manager(B, 10)
    cm, counter = _compile(m)
    with torch.no_grad():
        x = torch.randn(B, 4, D_MODEL)
        torch.testing.assert_close(cm(x), eager(x), **TOL)
        assert counter.frame_count == 1
        for _ in range(5):
            x = torch.randn(B, 1, D_MODEL)
            torch.testing.assert_close(cm(x), eager(x), **TOL)
    assert counter.frame_count == 2


# ----- dropout: the seed is drawn in the graph ---------------------------------------------------
@pytest.mark.parametrize("documents", [False, True])
def test_dropout_compiled_matches_eager_with_same_generator(documents: bool) -> None:
    # eager draws the dropout seed from the CPU generator on the host; the compiled graph draws
    # the same number in the graph (aot_eager runs that randint eagerly): same seed, same output
    def build() -> Attention:
        torch.manual_seed(0)
        return Attention(d_model=D_MODEL, n_heads=4, n_kv_heads=2, backend="torch", dropout=0.5).train()

    eager, m = build(), build()
    cm, counter = _compile(m)
    kw = {"cu_doc_lens": torch.tensor(LAYOUTS[1], dtype=torch.int32)} if documents else {}
    x = torch.randn(B, T, D_MODEL)
    for step in range(2):
        torch.manual_seed(100 + step)
        compiled = _fwd_bwd(cm, x, **kw)
        torch.manual_seed(100 + step)
        _assert_same(compiled, _fwd_bwd(eager, x, **kw))
    with torch.no_grad():
        assert not torch.allclose(compiled[0], eager.eval()(x, **kw))  # dropout did drop
    assert counter.frame_count == 1


# ----- one real inductor compile ------------------------------------------------------------------
def test_inductor_documents_and_decoding() -> None:
    start = time.monotonic()
    eager, m = _pair("attention")
    torch._dynamo.reset()
    clear_plan_cache()
    counter = CompileCounterWithBackend("inductor")
    cm = torch.compile(m, backend=counter, fullgraph=True)
    for layout in LAYOUTS[:2]:
        kw = {"cu_doc_lens": torch.tensor(layout, dtype=torch.int32)}
        x = torch.randn(B, T, D_MODEL)
        _assert_same(_fwd_bwd(cm, x, **kw), _fwd_bwd(eager, x, **kw))
    assert counter.frame_count == 1
    for mod in (eager, m):
        mod.init_kv_cache_manager(B, 8)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    cm = torch.compile(m, backend=counter, fullgraph=True)
    with torch.no_grad():
        for n in (3, 1, 1, 1, 1, 1):
            x = torch.randn(B, n, D_MODEL)
            torch.testing.assert_close(cm(x), eager(x), **TOL)
    assert counter.frame_count == 2  # prefill, and one graph for all decode steps
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("kind", ["attention", "fused", "normalized"])
def test_compiled_documents_graph_sorts_into_whole_offsets(kind: str) -> None:
    # Inductor's CUDA lowering of bucketize / searchsorted rejects a sliced boundaries tensor
    # ("NotImplementedError: SliceView" on an H200 for every module with documents); the CPU
    # lowering takes it, so the graph itself is checked: no boundaries argument comes from a slice
    from torch._dynamo.backends.common import aot_autograd

    sorts = []

    def inspect(gm: torch.fx.GraphModule, _inputs: list) -> torch.fx.GraphModule:
        for node in gm.graph.nodes:
            name = str(node.target)
            if node.op == "call_function" and ("bucketize" in name or "searchsorted" in name):
                bounds = node.args[1] if "bucketize" in name else node.args[0]
                sorts.append((name, str(getattr(bounds, "target", bounds))))
        return gm

    torch.manual_seed(0)
    rope = RoPEConfig(name="fused" if kind == "fused" else "default", theta=500_000)
    cls = {"attention": Attention, "fused": FusedAttention, "normalized": NormalizedAttention}[kind]
    kv = {} if kind == "fused" else {"n_kv_heads": 2}
    m = cls(d_model=D_MODEL, n_heads=4, rope=rope, backend="torch", **kv)
    torch._dynamo.reset()
    cm = torch.compile(m, backend=aot_autograd(fw_compiler=inspect), fullgraph=True)
    cm(torch.randn(B, T, D_MODEL), cu_doc_lens=torch.tensor(LAYOUTS[0], dtype=torch.int32))
    assert sorts, "no bucketize/searchsorted in the documents graph: the check saw nothing"
    assert not [s for s in sorts if "slice" in s[1]], sorts
