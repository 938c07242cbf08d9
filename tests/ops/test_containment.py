"""Opt-in fault containment (``olmo_attn.ops.containment``): a NaN/Inf in one document leaves every
other document's outputs and gradients bit-identical to a clean run, and makes the poisoned document
NaN in every row and gradient — also around a kernel that leaks across tiles."""

from __future__ import annotations

import pytest
import torch

import olmo_attn
from olmo_attn.backends.base import AttentionBackendName
from olmo_attn.ops.containment import contain_documents

CU = torch.tensor([0, 5, 12, 20, 32], dtype=torch.int32)  # 4 documents over B=2 rows of 16


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 16, 4, 8, generator=g)
    k = torch.randn(2, 16, 2, 8, generator=g)
    v = torch.randn(2, 16, 2, 8, generator=g)
    return q, k, v, torch.randn(2, 16, 4, 8, generator=g)


def _run(fn, q, k, v, dout) -> dict[str, torch.Tensor]:
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return {
        "out": out.detach().flatten(0, 1),
        "dq": q.grad.flatten(0, 1),
        "dk": k.grad.flatten(0, 1),
        "dv": v.grad.flatten(0, 1),
    }


def _leaky(q, k, v):
    """A stand-in for a tiled kernel: correct per document, plus 0 * (every input) in each row."""
    backend = AttentionBackendName.torch.build(head_dim=8, n_heads=4, n_kv_heads=2)
    out = backend((q, k, v), cu_doc_lens=CU, max_doc_len=12)
    return out + 0.0 * (q.sum() + k.sum() + v.sum())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_other_documents_bit_identical_and_poisoned_document_nan(tensor: str, value: float) -> None:
    q, k, v, dout = _inputs()
    clean = _run(lambda a, b, c: contain_documents(_leaky, a, b, c, CU, CU), q, k, v, dout)
    planted = {"q": q, "k": k, "v": v}
    x = planted[tensor].clone()
    x.view(32, *x.shape[2:])[14, 0, 3] = value  # token 14: document 2 (rows 12..19)
    planted[tensor] = x
    dirty = _run(lambda a, b, c: contain_documents(_leaky, a, b, c, CU, CU), *planted.values(), dout)
    doc2 = slice(12, 20)
    for name in clean:
        others = (
            torch.cat([clean[name][:12], clean[name][20:]]),
            torch.cat([dirty[name][:12], dirty[name][20:]]),
        )
        assert torch.equal(*others), name
        assert torch.isnan(dirty[name][doc2]).all(), name
    # without containment the leaky kernel spreads the poison everywhere (the test can fail)
    leaked = _run(_leaky, *planted.values(), dout)
    assert not torch.isfinite(leaked["out"][:12]).all()


def test_switch_routes_module_documents_through_containment(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, dout = _inputs(1)
    v = v.clone()
    v.view(32, 2, 8)[3, 1, 0] = float("nan")  # document 0
    backend = AttentionBackendName.torch.build(head_dim=8, n_heads=4, n_kv_heads=2)
    fn = lambda a, b, c: backend((a, b, c), cu_doc_lens=CU, max_doc_len=12)
    plain = _run(fn, q, k, v, dout)
    assert not olmo_attn.fault_containment_enabled()
    with olmo_attn.fault_containment():
        contained = _run(fn, q, k, v, dout)
    assert not olmo_attn.fault_containment_enabled()
    # the blockwise CPU kernel already contains per row; containment makes the whole document NaN
    assert torch.isfinite(plain["out"][:3]).all() and torch.isnan(contained["out"][:5]).all()
    for name in plain:
        assert torch.equal(plain[name][5:], contained[name][5:]), name
    monkeypatch.setenv("OLMO_ATTN_CONTAIN_FAULTS", "1")
    assert olmo_attn.fault_containment_enabled()
    olmo_attn.set_fault_containment(False)
    try:
        assert not olmo_attn.fault_containment_enabled()
    finally:
        olmo_attn.set_fault_containment(None)
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        olmo_attn.set_fault_containment("yes")  # type: ignore[arg-type]
