"""The kernel-level contract, in flash-attn's vocabulary.

Every backend exposes an :class:`AttentionKernel`: a forward that returns ``(out, lse)`` and a
backward that takes the *final* ``out`` / ``lse``. That is all ring attention needs, so every
backend with a kernel gets ring context parallelism. Semantics: ``docs/CONVENTIONS.md``.

Dense call:  ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``.
Varlen call (``cu_seqlens_q`` given): ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``
-> ``out [total_q, Hq, D]``, ``lse [Hq, total_q]``.
``lse`` is float32 (float64 for float64 inputs); rows with no visible key give ``out = 0`` and
``lse = -inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class KernelCall:
    """One attention problem's mask and options (everything except the tensors)."""

    scale: float
    causal: bool = True  # bottom-right aligned inside every segment
    window: tuple[int, int] = (-1, -1)  # inclusive (left, right) around the aligned diagonal
    cu_seqlens_q: torch.Tensor | None = None  # int32 [n_seg + 1]; set => varlen layout
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    cu_seqlens_q_host: tuple[int, ...] | None = None  # host copies (kernels that plan on the host)
    cu_seqlens_k_host: tuple[int, ...] | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None  # dropout keep-mask is a pure function of (seed, b, h, i, j)
    deterministic: bool = False

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


@runtime_checkable
class AttentionKernel(Protocol):
    """Forward with log-sum-exp, and the matching flash-style backward."""

    name: str

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, lse)``; no autograd graph is recorded."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: KernelCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. ``q, k, v`` given the final ``out`` and ``lse`` of this row block.

        ``P_ij = exp(scale * q_i·k_j - lse_i)``, ``dS = P ∘ (dout·vᵀ - rowsum(dout ∘ out))``. When ``out``
        and ``lse`` are the merged results of several key blocks (ring attention), this returns
        this block's exact share of the full gradient.
        """
        ...
