"""``torch.compile(fullgraph=True)`` of ``GatedDeltaNet`` on CPU (PyTorch kernel as an opaque custom
op): packed documents whose boundaries change between batches, and token-by-token decoding, each
compile once (one graph, no recompile) and match eager."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from olmo_attn.recurrent import GatedDeltaNet

ROOT = Path(__file__).resolve().parents[2]


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


def test_compiled_layer_never_traces_fla_where_fla_is_installed(monkeypatch):
    """Where fla imports (the H200), ``backend=None`` eagerly runs fla's conv and norm; a compiled
    forward takes ours instead (fla's Python wrappers import modules, which Dynamo refuses: the
    H200 run of 2026-12-04 failed with "Attempted to call function marked as skipped")."""
    from olmo_attn.recurrent import fla

    def refuse(*a, **k):
        raise AssertionError("fla consulted inside a compiled forward")

    monkeypatch.setattr(fla, "fla_available", lambda: True)
    monkeypatch.setattr(fla, "fla_kernel_usable", refuse)
    torch._dynamo.reset()
    counters.clear()
    m = _layer(None)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    c = torch.tensor([0, 30, 64], dtype=torch.int32)
    x = torch.randn(1, 64, 32)
    monkeypatch.setattr(fla, "fla_kernel_usable", lambda *a, **k: (False, "CPU"))
    want = m(x, cu_doc_lens=c)  # eager: fla consulted (it says no on CPU)
    monkeypatch.setattr(fla, "fla_kernel_usable", refuse)
    torch.testing.assert_close(cm(x, cu_doc_lens=c), want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


TRITON_COMPILED = r"""
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from olmo_attn.recurrent import GatedDeltaNet
torch.manual_seed(0)
m = GatedDeltaNet(d_model=64, n_heads=2, head_dim=16, backend="triton")
cnt = CompileCounterWithBackend("aot_eager")
cm = torch.compile(m, backend=cnt, fullgraph=True)
for cu in ([0, 30, 70, 96], [0, 50, 51, 96]):
    cu = torch.tensor(cu, dtype=torch.int32)
    x = torch.randn(1, 96, 64, requires_grad=True)
    y = cm(x, cu_doc_lens=cu)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_()
    ye = m(x2, cu_doc_lens=cu)
    (ge,) = torch.autograd.grad(ye.square().sum(), x2)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ge, rtol=1e-4, atol=1e-5)
assert cnt.frame_count == 1, cnt.frame_count
torch._dynamo.reset()
cnt = CompileCounterWithBackend("aot_eager")
cm = torch.compile(m, backend=cnt, fullgraph=True)
with torch.no_grad():
    c1, c2 = m.init_cache(2), m.init_cache(2)
    p = torch.randn(2, 20, 64)
    torch.testing.assert_close(cm(p, cache=c1), m(p, cache=c2), rtol=1e-5, atol=1e-5)
    for _ in range(4):
        s = torch.randn(2, 1, 64)
        torch.testing.assert_close(cm(s, cache=c1), m(s, cache=c2), rtol=1e-5, atol=1e-5)
assert cnt.frame_count == 2, cnt.frame_count  # prefill + one step graph
print("OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_compiled_layer_with_our_triton_kernels_under_the_interpreter():
    """``backend="triton"`` (the GPU path) compiled in one graph for documents and two for decoding
    (prefill + a shared step): the Triton chunk ops and the decode step, run by Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", TRITON_COMPILED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]
