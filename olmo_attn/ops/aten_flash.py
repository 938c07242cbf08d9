"""PyTorch's bundled flash-attention 2 (``aten._flash_attention_forward/_backward``) as an LSE kernel.

The torch backend's :class:`~.torch_kernel.TorchKernel` uses it on CUDA for fp16/bf16 (sm_80+,
head_dim <= 256 and a multiple of 8, no dropout): no compilation, ``out`` *and* ``lse`` from one
call, and a backward that takes the final (merged) ``out``/``lse`` directly — the flash-style
contract ring attention needs, without FlexAttention's recompute-and-autograd detour. Masks are the
flash vocabulary of :class:`~.kernel.KernelCall`: causal bottom-right aligned per segment, inclusive
``(left, right)`` windows, varlen segments with different query/key boundaries.

Every call is made in the varlen layout (a dense ``[B, T, H, D]`` batch is ``B`` segments of ``T``),
the path ``torch.nn.attention.varlen`` drives: ``q [total_q, Hq, D]``, ``lse [Hq, total_q]``.
"""

from __future__ import annotations

import itertools
import math

import torch

from .kernel import KernelCall


def aten_flash_supported(q: torch.Tensor, call: KernelCall) -> bool:
    """The bundled flash kernel runs this call: CUDA sm_80+, fp16/bf16, head_dim <= 256 (multiple of 8), no dropout.

    A call that asks for a deterministic backward uses it only under
    ``torch.use_deterministic_algorithms(True)``, which is what selects the kernel's deterministic path.
    """
    d = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and d % 8 == 0
        and d <= 256
        and call.dropout_p == 0.0
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
        and (not call.deterministic or torch.are_deterministic_algorithms_enabled())
        and hasattr(torch.ops.aten, "_flash_attention_forward")
    )


def _forward_op():
    return torch.ops.aten._flash_attention_forward


def _backward_op():
    return torch.ops.aten._flash_attention_backward


def _longest(cu: tuple[int, ...]) -> int:
    return max((b - a for a, b in itertools.pairwise(cu)), default=0)


def _segments(q: torch.Tensor, k: torch.Tensor, call: KernelCall):
    """``cu_q, cu_k`` (int32) and ``max_q, max_k`` of the call in the varlen layout (dense: ``B`` segments)."""
    if call.varlen:
        assert call.cu_seqlens_q is not None
        cu_q = call.cu_seqlens_q.to(torch.int32)
        cu_k = cu_q if call.cu_seqlens_k is None else call.cu_seqlens_k.to(torch.int32)
        max_q, max_k = call.max_seqlen_q, call.max_seqlen_k
        if max_q is None:
            max_q = _longest(call.cu_seqlens_q_host or tuple(cu_q.tolist()))
        if max_k is None:
            max_k = _longest(call.cu_seqlens_k_host or tuple(cu_k.tolist()))
        return cu_q, cu_k, int(max_q), int(max_k)
    B, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    steps = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    return steps * tq, steps * tk, tq, tk


def _flat(x: torch.Tensor, call: KernelCall) -> torch.Tensor:
    x = x if call.varlen else x.reshape(-1, *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _window(call: KernelCall) -> tuple[int, int]:
    left, right = call.window
    return int(left), (0 if call.causal else int(right))


def aten_flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` in the layouts of :mod:`.kernel` (dense ``lse [B, Hq, Tq]``, varlen ``[Hq, total_q]``)."""
    cu_q, cu_k, max_q, max_k = _segments(q, k, call)
    left, right = _window(call)
    with torch.no_grad():
        out, lse, *_ = _forward_op()(
            _flat(q, call),
            _flat(k, call),
            _flat(v, call),
            cu_q,
            cu_k,
            max_q,
            max_k,
            0.0,
            call.causal,
            return_debug_mask=False,
            scale=call.scale,
            window_size_left=left,
            window_size_right=right,
        )
    total_q, hq = out.shape[0], out.shape[1]
    if lse.shape != (hq, total_q):
        raise RuntimeError(
            f"aten._flash_attention_forward returned lse of shape {tuple(lse.shape)}, expected "
            f"[Hq, total_q] = {(hq, total_q)}; this PyTorch build's flash kernel is not supported here "
            "(set OLMO_ATTN_TORCH_LSE_KERNEL=flex to use FlexAttention)"
        )
    lse = lse.masked_fill(torch.isposinf(lse), -math.inf)  # flash marks rows with no key +inf; ours -inf
    if call.varlen:
        return out, lse
    B, tq = q.shape[0], q.shape[1]
    return out.view(B, tq, *out.shape[1:]), lse.view(hq, B, tq).transpose(0, 1).contiguous()


def aten_flash_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: KernelCall,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` given the final ``out`` / ``lse`` of these query rows (layouts as the forward's)."""
    cu_q, cu_k, max_q, max_k = _segments(q, k, call)
    left, right = _window(call)
    if not call.varlen:  # [B, Hq, Tq] -> [Hq, B*Tq]
        lse = lse.transpose(0, 1).reshape(lse.shape[1], -1)
    lse = lse.to(torch.promote_types(q.dtype, torch.float32))  # float32 for the kernel (float64 in tests)
    lse = lse.masked_fill(torch.isneginf(lse), math.inf).contiguous()  # back to flash's +inf rows
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    with torch.no_grad():
        dq, dk, dv = _backward_op()(
            _flat(dout.to(q.dtype), call).contiguous(),
            _flat(q, call),
            _flat(k, call),
            _flat(v, call),
            _flat(out.to(q.dtype), call).contiguous(),
            lse,
            cu_q,
            cu_k,
            max_q,
            max_k,
            0.0,
            call.causal,
            rng_state,
            unused,
            scale=call.scale,
            window_size_left=left,
            window_size_right=right,
        )
    if call.varlen:
        return dq, dk, dv
    return dq.view_as(q), dk.view_as(k), dv.view_as(v)
