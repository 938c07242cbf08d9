"""Short causal depthwise convolution (+ SiLU) with document resets and a decoding cache.

``y[t, c] = act(sum_{i=0}^{Kc-1} w[c, i] * x[t - (Kc-1) + i, c] + bias[c])`` with ``x[tau] = 0``
before the start of the sequence (or document) that contains ``t``; tap ``Kc - 1`` multiplies the
current token. Computed as ``Kc`` shifted multiply-adds in float32 (float64 for float64 inputs)
rather than with ``F.conv1d``: exact in float32 on every device (cuDNN would use TF32 for float32
convolutions by default), document masks are one multiply per tap, and ``[B, T, C]`` stays in its
layout (no transposes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chunked import compute_dtype_for

__all__ = ["CausalConv1d", "causal_conv1d", "causal_conv1d_step", "doc_positions"]


def doc_positions(cu_seqlens: torch.Tensor, cu_host: tuple[int, ...] | None, total: int) -> torch.Tensor:
    """Position of every flattened token inside its document, ``[total]`` int64.

    Computed on the device from ``cu_seqlens`` alone (``searchsorted``: static shapes, no host
    values, so ``torch.compile`` neither breaks the graph nor recompiles per document layout);
    ``cu_host`` is accepted for callers that have it and not needed.
    """
    del cu_host
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(total, device=cu.device)
    # = searchsorted(cu[1:], ...) for sorted cu, without the slice Inductor's CUDA lowering rejects
    doc = (torch.searchsorted(cu, tok, right=True) - 1).clamp(0, cu.shape[0] - 2)
    return tok - cu[doc]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    cu_host: tuple[int, ...] | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise convolution.

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, Kc]`` or ``[C, 1, Kc]`` (``nn.Conv1d`` layout).
        bias: ``[C]`` or ``None``.
        activation: ``"silu"`` / ``"swish"`` or ``None``.
        cu_seqlens: int32/int64 ``[n + 1]`` document offsets into the flattened ``B * T`` tokens
            (``cu_host``: the same as Python ints, if the caller already has them).
        initial_state: ``[B, C, Kc - 1]``, the ``Kc - 1`` inputs before ``x`` (decoding cache);
            not combinable with ``cu_seqlens``.
        output_final_state: also return the last ``Kc - 1`` inputs ``[B, C, Kc - 1]`` (float32, or
            float64 for float64 inputs), the cache for the next call.

    Returns:
        ``y [B, T, C]`` in the dtype of ``x`` and the final state or ``None``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    B, T, C = x.shape
    w = weight.reshape(weight.shape[0], -1)
    if w.shape[0] != C:
        raise ValueError(f"weight has {w.shape[0]} channels but x has C={C}")
    Kc = w.shape[1]
    if activation not in ("silu", "swish", None):
        raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        raise ValueError(
            "initial_state / output_final_state (a decoding cache) cannot be combined with cu_seqlens; "
            "decode batch rows as separate sequences (no documents)"
        )
    cdt = compute_dtype_for(x, weight)
    xf = x.to(cdt)
    if cu_seqlens is not None:
        xf = xf.reshape(1, B * T, C)  # documents segment the flattened batch
    wf = w.to(cdt)
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, C, Kc - 1):
            raise ValueError(
                f"initial_state must be [B, C, Kc-1] = {(B, C, Kc - 1)}, got {tuple(initial_state.shape)}"
            )
        left = initial_state.to(cdt).transpose(1, 2)  # [B, Kc-1, C]
        xp = torch.cat([left, xf], dim=1)
    else:
        xp = F.pad(xf, (0, 0, Kc - 1, 0))  # [B, T + Kc - 1, C]
    pos = None
    if cu_seqlens is not None:
        if cu_host is None and not torch.compiler.is_compiling():
            from ..masks import validate_cu_seqlens

            cu_host = validate_cu_seqlens(cu_seqlens.to(torch.int32), "cu_seqlens", B * T)
        pos = doc_positions(cu_seqlens, cu_host, B * T).view(1, B * T, 1)
    n = xf.shape[1]
    y = xp[:, Kc - 1 :] * wf[:, Kc - 1]  # current token
    for i in range(Kc - 1):
        shift = Kc - 1 - i
        tap = xp[:, i : i + n] * wf[:, i]
        if pos is not None:
            tap = tap * (pos >= shift).to(cdt)  # tokens before the document start read zeros
        y = y + tap
    if bias is not None:
        y = y + bias.to(cdt)
    if activation is not None:
        y = F.silu(y)
    final = xp[:, n:].transpose(1, 2).contiguous() if output_final_state else None  # [B, C, Kc-1]
    return y.reshape(B, T, C).to(x.dtype), final


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    *,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: ``x [B, C]``, ``state [B, C, Kc-1]`` -> ``(y [B, C], new state)``."""
    w = weight.reshape(weight.shape[0], -1)
    cdt = state.dtype
    window = torch.cat([state, x.to(cdt)[:, :, None]], dim=-1)  # [B, C, Kc]
    y = (window * w.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation is not None:
        y = F.silu(y)
    return y.to(x.dtype), window[:, :, 1:]


class CausalConv1d(nn.Conv1d):
    """Depthwise causal ``nn.Conv1d(C, C, Kc, groups=C, padding=Kc-1)`` (OLMo-core's parameter
    layout: ``weight [C, 1, Kc]``, ``bias [C]``) whose forward is :func:`causal_conv1d` + SiLU.

    Under Ulysses context parallelism the parameters stay whole and ``cp_channels`` selects this
    rank's channel block at forward time.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            channels,
            channels,
            kernel_size,
            groups=channels,
            padding=kernel_size - 1,
            bias=bias,
            dtype=dtype,
            device=device,
        )
        self.activation = "silu"
        self.backend = "auto"
        self.cp_channels: slice | None = None

    def local_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [C_local, 1, Kc], bias [C_local] | None)`` for this CP rank (all without CP)."""
        if self.cp_channels is None:
            return self.weight, self.bias
        return self.weight[self.cp_channels], (None if self.bias is None else self.bias[self.cp_channels])

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cu_host: tuple[int, ...] | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        use_fla: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, T, C_local]`` -> ``(y [B, T, C_local], final [B, C_local, Kc-1] | None)``."""
        weight, bias = self.local_params()
        if use_fla and initial_state is None and not output_final_state:
            from .fla import fla_causal_conv1d

            return fla_causal_conv1d(x, weight, bias, cu_seqlens=cu_seqlens), None
        return causal_conv1d(
            x,
            weight,
            bias,
            activation=self.activation,
            cu_seqlens=cu_seqlens,
            cu_host=cu_host,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
