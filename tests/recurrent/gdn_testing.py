"""Shared helpers for the Gated DeltaNet tests: inputs, the relative-RMS metric, budgets."""

from __future__ import annotations

import torch

# flash-linear-attention's budgets (rms(out - ref) / rms(ref)) for bf16 against a float reference
BUDGET_OUT = 5e-3  # output and final state
BUDGET_DQKV = 8e-3  # dq, dk, dv (and d initial state)
BUDGET_DGATE = 2e-2  # d beta, d g


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``rms(out - ref) / rms(ref)`` in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.square().mean().sqrt()
    return float((out - ref).square().mean().sqrt() / den) if den > 0 else float((out - ref).abs().max())


def gdr_inputs(
    B: int,
    T: int,
    H: int,
    HV: int,
    Dk: int,
    Dv: int,
    *,
    neg_eig: bool = True,
    n_seq: int | None = None,
    with_h0: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> dict[str, torch.Tensor | None]:
    """Random gated-delta-rule inputs like flash-linear-attention's tests: ``q, k, v ~ N(0, 1)``,
    ``g = logsigmoid(N(0,1))`` (decay in (0, 1)), ``beta = sigmoid(N(0,1))`` (times 2 with negative
    eigenvalues), initial state ``N(0, 1)``. Generated in float64, then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    beta = torch.sigmoid(rnd(B, T, HV)) * (2.0 if neg_eig else 1.0)
    out = {
        "q": rnd(B, T, H, Dk),
        "k": rnd(B, T, H, Dk),
        "v": rnd(B, T, HV, Dv),
        "g": torch.nn.functional.logsigmoid(rnd(B, T, HV)),
        "beta": beta,
        "h0": rnd(n_seq if n_seq is not None else B, HV, Dk, Dv) if with_h0 else None,
    }
    return {k: (None if v is None else v.to(device=device, dtype=dtype)) for k, v in out.items()}


def lengths_to_cu(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)
