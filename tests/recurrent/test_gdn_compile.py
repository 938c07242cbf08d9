"""``torch.compile(fullgraph=True)`` of ``GatedDeltaNet`` on CPU (PyTorch kernel as an opaque custom
op): packed documents whose boundaries change between batches, and token-by-token decoding, each
compile once (one graph, no recompile) and match eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from olmo_attn.recurrent import GatedDeltaNet


def _layer(backend: str | None = "torch") -> GatedDeltaNet:
    torch.manual_seed(0)
    return GatedDeltaNet(d_model=32, n_heads=2, head_dim=8, n_v_heads=4, backend=backend)


@pytest.mark.slow
def test_compiled_packed_documents_one_graph_across_boundaries():
    torch._dynamo.reset()
    counters.clear()
    m = _layer()
    cm = torch.compile(m, fullgraph=True)
    for cu in ([0, 30, 70, 100], [0, 5, 64, 100], [0, 99, 100, 100]):
        c = torch.tensor(cu, dtype=torch.int32)
        x = torch.randn(1, 100, 32, requires_grad=True)
        y = cm(x, cu_doc_lens=c)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        x2 = x.detach().requires_grad_()
        ref = m(x2, cu_doc_lens=c)
        (rx,) = torch.autograd.grad(ref.square().sum(), x2)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_decoding_one_graph_across_steps():
    torch._dynamo.reset()
    counters.clear()
    m = _layer()
    cm = torch.compile(m, fullgraph=True)
    c_comp, c_eager = m.init_cache(2), m.init_cache(2)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(2, 1, 32)
            torch.testing.assert_close(cm(x, cache=c_comp), m(x, cache=c_eager), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_comp.state, c_eager.state, rtol=1e-5, atol=1e-6)
    assert int(c_comp.n_tokens) == 5 and c_eager.seqlen == 5
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_automatic_kernel_choice_compiles_in_one_graph():
    """``backend=None`` picks its kernel from host facts (fla / triton importable); a compiled
    forward reads them as constants instead of tracing ``importlib`` (a graph break before)."""
    torch._dynamo.reset()
    counters.clear()
    m = _layer(None)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    for cu in ([0, 30, 64], [0, 7, 64]):
        c = torch.tensor(cu, dtype=torch.int32)
        x = torch.randn(1, 64, 32)
        torch.testing.assert_close(cm(x, cu_doc_lens=c), m(x, cu_doc_lens=c), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
