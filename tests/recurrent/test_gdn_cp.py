"""Ulysses context parallelism for Gated DeltaNet: 2 gloo processes vs one process (float64)."""

from __future__ import annotations

import pytest
import torch
from gdn_testing import lengths_to_cu, rel_rms

from olmo_attn.recurrent import GatedDeltaNet

D_MODEL = 32
CASES = [
    # (module kwargs, B, T, document lengths over the flattened B*T tokens or None)
    ({"n_heads": 2, "n_v_heads": 4, "conv_bias": True}, 2, 16, None),
    ({"n_heads": 2, "n_v_heads": 2, "head_dim": 8}, 2, 20, [7, 18, 0, 15]),  # documents cross ranks and rows
]


def _build(kw: dict) -> GatedDeltaNet:
    m = GatedDeltaNet(d_model=D_MODEL, dtype=torch.float64, **kw)
    m.init_weights(
        init_method="normal", d_model=D_MODEL, block_idx=0, num_blocks=1, std=0.3,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    return m


def _inputs(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_MODEL, generator=gen, dtype=torch.float64)
    return x, torch.randn(B, T, D_MODEL, generator=gen, dtype=torch.float64)


def _ulysses_rank() -> list[dict]:
    """Runs on every rank: each case's local output, input gradient and parameter gradients."""
    from conformance.distributed import cp_mesh, rank, world_size
    from olmo_attn.cp.styles import UlyssesContextParallelStyle

    mesh = cp_mesh()
    r, W = rank(), world_size()
    results = []
    for i, (kw, B, T, docs) in enumerate(CASES):
        m = _build(kw)
        m.apply_cp(mesh, uly=UlyssesContextParallelStyle())
        x, dy = _inputs(B, T, seed=i)
        Tl = T // W
        xl = x[:, r * Tl : (r + 1) * Tl].clone().requires_grad_()
        cu = lengths_to_cu(docs) if docs is not None else None
        y = m(xl, cu_doc_lens=cu)
        (y * dy[:, r * Tl : (r + 1) * Tl]).sum().backward()
        results.append(
            {
                "y": y.detach(),
                "dx": xl.grad,
                "dparams": {n: p.grad.clone() for n, p in m.named_parameters()},
            }
        )
    return results


@pytest.mark.slow
def test_ulysses_gdn_matches_single_process():
    from conformance.distributed import run_distributed

    ranks = run_distributed(_ulysses_rank, 2, backend="gloo", timeout_s=120)
    for i, (kw, B, T, docs) in enumerate(CASES):
        m = _build(kw)
        x, dy = _inputs(B, T, seed=i)
        x.requires_grad_()
        cu = lengths_to_cu(docs) if docs is not None else None
        y = m(x, cu_doc_lens=cu)
        (y * dy).sum().backward()
        y_cp = torch.cat([ranks[r][i]["y"] for r in range(2)], dim=1)
        dx_cp = torch.cat([ranks[r][i]["dx"] for r in range(2)], dim=1)
        assert rel_rms(y_cp, y) < 1e-12, i
        assert rel_rms(dx_cp, x.grad) < 1e-12, i
        for n, p in m.named_parameters():
            # parameters are replicated over the CP ranks: their gradients add up
            assert rel_rms(ranks[0][i]["dparams"][n] + ranks[1][i]["dparams"][n], p.grad) < 1e-11, (i, n)
