"""One decoding step of the gated delta rule as a single Triton kernel: one read and one write of the
state, nothing else of its size.

Program ``(b * HV + j, i)`` owns the columns ``[i * BV, (i + 1) * BV)`` of state ``S[b, j]``
(``[Dk, BV]`` in registers: the whole ``Dk`` axis, so ``a = S^T k`` and ``b = S^T q`` are complete
in the program) and computes::

    a = S^T k,  b = S^T q,  u = beta (v - gamma a),  o = scale (gamma b + (q . k) u)
    S <- gamma S + k u^T                                    (gamma = exp(g); q, k L2-normalised)

Grid ``B * HV x ceil(Dv / BV)``; ``BV`` keeps the tile at 8192 float32 values (64 registers a
thread at 4 warps). Float32 state only (``[B, HV, Dk, Dv]``, last two dims contiguous); q/k/v may be
bf16/fp16/fp32. On CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how it
is tested without a GPU (``tests/recurrent/test_gdn_triton.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .triton_chunk import _next_pow2, triton_available

__all__ = ["triton_gated_delta_rule_step", "triton_step_usable"]

L2NORM_EPS = 1e-6
TILE = 8192  # float32 values of S per program


def triton_step_usable(state: torch.Tensor, *tensors: torch.Tensor) -> tuple[bool, str | None]:
    """Whether :func:`triton_gated_delta_rule_step` can take these inputs: ``(ok, reason_if_not)``."""
    if not triton_available():
        return False, "triton is not importable"
    if state.dtype != torch.float32:
        return False, f"the Triton step keeps a float32 state, got {state.dtype}"
    if state.stride(-1) != 1 or state.stride(-2) != state.shape[-1]:
        return False, "the state's last two dims [Dk, Dv] must be contiguous"
    if any(t.device != state.device for t in tensors):
        return False, "all inputs must be on the state's device"
    if any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return False, "q, k, v, g, beta must be float32, bfloat16 or float16"
    return True, None


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _gdn_step_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        g_ptr,
        b_ptr,
        s_ptr,
        o_ptr,
        sq_b,
        sq_h,
        sk_b,
        sk_h,
        sv_b,
        sv_h,
        sg_b,
        sg_h,
        sb_b,
        sb_h,
        ss_b,
        ss_h,
        so_b,
        so_h,
        HV,
        REP,
        DK,
        DV,
        scale,
        eps,
        BK: tl.constexpr,
        BV: tl.constexpr,
        L2: tl.constexpr,
    ):
        i_bh = tl.program_id(0)
        i_v = tl.program_id(1)
        i_b = (i_bh // HV).to(tl.int64)
        i_hv = (i_bh % HV).to(tl.int64)
        i_h = i_hv // REP  # q/k head of this value head
        ok = tl.arange(0, BK)
        ov = i_v * BV + tl.arange(0, BV)
        mk = ok < DK
        mv = ov < DV
        q = tl.load(q_ptr + i_b * sq_b + i_h * sq_h + ok, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + i_b * sk_b + i_h * sk_h + ok, mask=mk, other=0.0).to(tl.float32)
        if L2:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + eps)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
        v = tl.load(v_ptr + i_b * sv_b + i_hv * sv_h + ov, mask=mv, other=0.0).to(tl.float32)
        gamma = tl.exp(tl.load(g_ptr + i_b * sg_b + i_hv * sg_h).to(tl.float32))
        beta = tl.load(b_ptr + i_b * sb_b + i_hv * sb_h).to(tl.float32)
        sp = s_ptr + i_b * ss_b + i_hv * ss_h + ok[:, None] * DV + ov[None, :]  # [BK, BV]
        m2 = mk[:, None] & mv[None, :]
        s = tl.load(sp, mask=m2, other=0.0)
        a = tl.sum(s * k[:, None], axis=0)  # S^T k  [BV]
        bq = tl.sum(s * q[:, None], axis=0)  # S^T q
        u = beta * (v - gamma * a)
        o = scale * (gamma * bq + tl.sum(q * k, axis=0) * u)
        tl.store(sp, gamma * s + k[:, None] * u[None, :], mask=m2)
        tl.store(o_ptr + i_b * so_b + i_hv * so_h + ov, o.to(o_ptr.dtype.element_ty), mask=mv)

    return _gdn_step_kernel


def triton_gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    """One step, ``state`` updated in place.

    ``q, k [B, H, Dk]``, ``v [B, HV, Dv]``, ``g, beta [B, HV]``, ``state [B, HV, Dk, Dv]`` float32
    (validated by the caller, :func:`olmo_attn.recurrent.recurrent.gated_delta_rule_step`).
    Returns ``o [B, HV, Dv]`` in the dtype of ``v``.
    """
    return _step_op(q, k, v, g, beta, state, float(scale), bool(use_qk_l2norm))


# A custom op (state mutated in place), so a compiled decode step holds one opaque node instead
# of Dynamo tracing Triton's launcher (which it cannot: Triton 3.6 reads its knobs through a C
# extension, the H200 compile_bench gdn/decode failure of 2026-12-04).
@torch.library.custom_op("olmo_attn::gdn_triton_step", mutates_args=("state",))
def _step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    B, H, Dk = q.shape
    HV, Dv = v.shape[1], v.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty(B, HV, Dv, dtype=v.dtype, device=v.device)
    BK = max(16, _next_pow2(Dk))
    BV = max(16, min(_next_pow2(Dv), TILE // BK))
    grid = (B * HV, -(-Dv // BV))
    _kernel()[grid](
        q, k, v, g, beta, state, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), state.stride(0), state.stride(1),
        o.stride(0), o.stride(1),
        HV, HV // H, Dk, Dv, scale, L2NORM_EPS,
        BK=BK, BV=BV, L2=use_qk_l2norm, num_warps=4,
    )  # fmt: skip
    return o


@_step_op.register_fake
def _(q, k, v, g, beta, state, scale, use_qk_l2norm):
    return v.new_empty(v.shape[0], v.shape[1], v.shape[2])
