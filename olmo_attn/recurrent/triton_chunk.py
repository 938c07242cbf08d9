"""The chunked gated delta rule as fused Triton kernels, forward and backward, with documents.

Same math as :mod:`.chunked` (its docstring derives it); chunk ``C = 64`` tokens. Per chunk and
value head, with ``G`` the chunk-local cumulative log-decay, ``G_L`` its value at the chunk's last
token and ``S`` the state entering the chunk::

    A  = strict_lower(diag(b) K K^T * exp(G_i - G_j))         T = (I + A)^-1           [C, C]
    W  = T (b exp(G) K)        U = T (b V)                                           [C, Dk|Dv]
    V' = U - W S               S_out = exp(G_L) S + (exp(G_L - G) K)^T V'
    O  = scale exp(G) Q S + lower_incl(scale Q K^T * exp(G_i - G_j)) V'

Kernels (grid in brackets; ``NC`` = chunk slots, ``N`` = sequences):

* ``_l2norm_fwd`` / ``_l2norm_bwd`` [rows]: ``x / sqrt(|x|^2 + 1e-6)`` and its backward.
* ``_kkt`` [NC, HV]: chunk-local cumsum of ``g`` and ``A``.
* ``_solve`` [NC, HV]: ``T = (I + A)^-1`` by forward substitution on the four 16x16 diagonal
  blocks, then the off-diagonal blocks ``T_ij = -T_ii sum_k A_ik T_kj`` by 16x16 dots.
* ``_wu`` [NC, HV]: ``W`` and ``U``.
* ``_prep`` [NC, HV] (the default): ``_kkt`` and ``_solve`` in one program, ``A`` and ``T`` as
  16x16 register blocks; ``W`` and ``U`` from those blocks (``TILES["prep_wu"] = 0``), from ``T``
  read back as one tile (1), or by ``_wu`` after it (2).
* ``_state`` [N * HV, Dv / BV]: the only sequential part; the state tile ``[Dk, BV]`` stays in
  float32 registers while the program walks its sequence's chunks, storing each chunk's entering
  state ``h`` and ``V'``.
* ``_out`` [NC, HV, Dv / BV]: ``O``.
* backward: ``_dv_local`` [NC, HV] (``P^T dO``), ``_dstate`` [N * HV, Dv / BV] (the reverse
  recurrence ``dS = exp(G_L) dS_out + scale (exp(G) Q)^T dO - W^T dV'``, with
  ``dV' = P^T dO + exp(G_L - G) K dS_out``), ``_dqkwg`` [NC, HV] (``dQ``, ``dK``, ``dW``, the
  decay gradient of the read-out and the transition), ``_wy_bwd`` [NC, HV] (through ``T``,
  ``beta``, ``V``, and the reverse cumsum of the decay gradient).

Documents: ``cu_seqlens`` (or ``B`` rows of ``T``) are cut into chunk *slots* on the device with
no host synchronisation: sequence ``n`` owns slots ``[off_n, off_{n+1})``,
``off = cumsum(ceil(len / C))``; there are at most ``total // C + n_seq`` slots (a static bound,
so shapes do not depend on the document boundaries; unused slots have length 0 and their
programs return at once). A chunk never straddles a document boundary, so a NaN in one document
cannot reach another.

Precision: the big products take the input dtype (bf16/fp16 tensor cores, float32 accumulation);
``h``, ``V'``, ``W``, ``U`` and ``dV'`` are stored in the input dtype (float32 for float32 inputs);
``A``, ``T``, the cumulative decay and every gradient accumulator are float32. Float32 inputs use
exact float32 products (``input_precision="ieee"``). On CPU the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how they are tested without a GPU.

The host functions are registered as ``torch.library`` custom ops (``olmo_attn::gdn_chunk_fwd``,
``olmo_attn::gdn_chunk_bwd``) with fake implementations, so ``torch.compile`` treats each as one
opaque node with static output shapes (no graph break, no recompile when the document boundaries
change).
"""

from __future__ import annotations

import functools
import weakref
from types import SimpleNamespace
from typing import Any

import torch

from ..hardware import info_for, package_status

__all__ = [
    "CHUNK",
    "LAUNCH",
    "TILES",
    "chunk_plan",
    "triton_available",
    "triton_chunk_gated_delta_rule",
    "triton_chunk_usable",
]

CHUNK = 64
L2NORM_EPS = 1e-6
MAX_DK = 256
L2_ROWS = 16  # rows per program of the L2-norm kernels


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@torch.compiler.assume_constant_result  # a compiled forward reads it as a constant
def triton_available() -> bool:
    """Whether ``triton`` imports (cached)."""
    return package_status("triton").available


def triton_chunk_usable(q: torch.Tensor, v: torch.Tensor) -> tuple[bool, str | None]:
    """Whether :func:`triton_chunk_gated_delta_rule` takes inputs like these: ``(ok, reason)``."""
    if not triton_available():
        return False, "triton is not importable"
    if q.device.type != "cuda" and not _interpreting():
        return False, f"the Triton chunk kernels need a CUDA device, inputs are on {q.device}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"the Triton chunk kernels take float32/bfloat16/float16, got {q.dtype}"
    if q.shape[-1] > MAX_DK:
        return False, f"the Triton chunk kernels hold Dk <= {MAX_DK} in one tile, got Dk={q.shape[-1]}"
    return True, None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def _l2norm_fwd(x_ptr, y_ptr, r_ptr, ROWS, D, eps, BR: tl.constexpr, BD: tl.constexpr):
        """Rows ``[i * BR, (i + 1) * BR)`` of ``x [rows, D]``: ``y = x * r``, ``r = 1 / sqrt(|x|^2 + eps)``."""
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        o = tl.arange(0, BD)
        m = (rows < ROWS)[:, None] & (o < D)[None, :]
        off = rows[:, None] * D + o[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) + eps)
        tl.store(y_ptr + off, (x * r[:, None]).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(r_ptr + rows, r, mask=rows < ROWS)

    @triton.jit
    def _l2norm_bwd(x_ptr, r_ptr, dy_ptr, dx_ptr, ROWS, D, BR: tl.constexpr, BD: tl.constexpr):
        """``dx = r (dy - y (y . dy))`` with ``y = x r`` (``dy`` float32)."""
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        o = tl.arange(0, BD)
        m = (rows < ROWS)[:, None] & (o < D)[None, :]
        off = rows[:, None] * D + o[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=rows < ROWS, other=0.0)
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = x * r[:, None]
        dx = r[:, None] * (dy - y * tl.sum(y * dy, axis=1)[:, None])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _kkt(
        k_ptr, g_ptr, b_ptr, gc_ptr, a_ptr, cs_ptr, cl_ptr,
        H, HV, REP, DK,
        BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Cumulative decay ``G [NT, HV]`` and ``A [NT, HV, BT]`` of one chunk and value head."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        i_h = i_hv // REP
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        ok = tl.arange(0, BK)
        g = tl.load(g_ptr + tok * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
        G = tl.cumsum(g, axis=0)
        tl.store(gc_ptr + tok * HV + i_hv, G, mask=mt)
        beta = tl.load(b_ptr + tok * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
        k = tl.load(
            k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :],
            mask=mt[:, None] & (ok[None, :] < DK),
            other=0.0,
        )
        a = tl.dot(k, tl.trans(k), input_precision=PREC)  # [BT, BT] float32
        low = r[:, None] > r[None, :]
        a = a * beta[:, None] * tl.exp(tl.where(low, G[:, None] - G[None, :], float("-inf")))
        a = tl.where(low, a, 0.0)
        tl.store(a_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :], a, mask=mt[:, None])

    @triton.jit
    def _diag_inv(a_ptr, t0, o: tl.constexpr, L, HV, i_hv, BT: tl.constexpr):
        """``(I + A_bb)^-1`` of the 16x16 diagonal block at row/col offset ``o`` (forward substitution)."""
        r = tl.arange(0, 16)
        ab = tl.load(
            a_ptr + ((t0 + o + r)[:, None] * HV + i_hv) * BT + o + r[None, :],
            mask=((o + r) < L)[:, None],
            other=0.0,
        )
        ti = -tl.where(r[:, None] > r[None, :], ab, 0.0)
        for i in range(2, 16):
            a = -tl.load(
                a_ptr + ((t0 + o + i) * HV + i_hv) * BT + o + r,
                mask=(r < i) & ((o + i) < L),
                other=0.0,
            )
            a = a + tl.sum(a[:, None] * ti, axis=0)
            ti = tl.where(r[:, None] == i, a[None, :], ti)
        return ti + (r[:, None] == r[None, :]).to(tl.float32)

    @triton.jit
    def _blk(a_ptr, t0, oi: tl.constexpr, oj: tl.constexpr, L, HV, i_hv, BT: tl.constexpr):
        """The 16x16 block of ``A`` at rows ``oi``, cols ``oj`` of the chunk."""
        r = tl.arange(0, 16)
        return tl.load(
            a_ptr + ((t0 + oi + r)[:, None] * HV + i_hv) * BT + oj + r[None, :],
            mask=((oi + r) < L)[:, None],
            other=0.0,
        )

    @triton.jit
    def _put(t_ptr, x, t0, oi: tl.constexpr, oj: tl.constexpr, L, HV, i_hv, BT: tl.constexpr):
        r = tl.arange(0, 16)
        tl.store(
            t_ptr + ((t0 + oi + r)[:, None] * HV + i_hv) * BT + oj + r[None, :],
            x,
            mask=((oi + r) < L)[:, None],
        )

    @triton.jit
    def _t_blocks(
        t00, t11, t22, t33, a10, a20, a21, a30, a31, a32, t_ptr, t0, L, HV, i_hv, BT: tl.constexpr
    ):  # fmt: skip
        """The off-diagonal blocks of ``T = (I + A)^-1`` from its diagonal inverses ``t_ii`` and the
        blocks ``a_ij`` of ``A``; stores all sixteen blocks of ``T`` (upper ones zero) and returns
        ``(t10, t20, t21, t30, t31, t32)``."""
        # T_ij = -T_ii sum_{k=j}^{i-1} A_ik T_kj   (block rows of (I + A) T = I)
        t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision="ieee"), input_precision="ieee")
        t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision="ieee"), input_precision="ieee")
        t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision="ieee"), input_precision="ieee")
        t20 = -tl.dot(
            t22,
            tl.dot(a20, t00, input_precision="ieee") + tl.dot(a21, t10, input_precision="ieee"),
            input_precision="ieee",
        )
        t31 = -tl.dot(
            t33,
            tl.dot(a31, t11, input_precision="ieee") + tl.dot(a32, t21, input_precision="ieee"),
            input_precision="ieee",
        )
        t30 = -tl.dot(
            t33,
            tl.dot(a30, t00, input_precision="ieee")
            + tl.dot(a31, t10, input_precision="ieee")
            + tl.dot(a32, t20, input_precision="ieee"),
            input_precision="ieee",
        )
        z = tl.zeros([16, 16], dtype=tl.float32)
        _put(t_ptr, t00, t0, 0, 0, L, HV, i_hv, BT)
        _put(t_ptr, z, t0, 0, 16, L, HV, i_hv, BT)
        _put(t_ptr, z, t0, 0, 32, L, HV, i_hv, BT)
        _put(t_ptr, z, t0, 0, 48, L, HV, i_hv, BT)
        _put(t_ptr, t10, t0, 16, 0, L, HV, i_hv, BT)
        _put(t_ptr, t11, t0, 16, 16, L, HV, i_hv, BT)
        _put(t_ptr, z, t0, 16, 32, L, HV, i_hv, BT)
        _put(t_ptr, z, t0, 16, 48, L, HV, i_hv, BT)
        _put(t_ptr, t20, t0, 32, 0, L, HV, i_hv, BT)
        _put(t_ptr, t21, t0, 32, 16, L, HV, i_hv, BT)
        _put(t_ptr, t22, t0, 32, 32, L, HV, i_hv, BT)
        _put(t_ptr, z, t0, 32, 48, L, HV, i_hv, BT)
        _put(t_ptr, t30, t0, 48, 0, L, HV, i_hv, BT)
        _put(t_ptr, t31, t0, 48, 16, L, HV, i_hv, BT)
        _put(t_ptr, t32, t0, 48, 32, L, HV, i_hv, BT)
        _put(t_ptr, t33, t0, 48, 48, L, HV, i_hv, BT)
        return t10, t20, t21, t30, t31, t32

    @triton.jit
    def _solve(a_ptr, t_ptr, cs_ptr, cl_ptr, HV, BT: tl.constexpr):
        """``T = (I + A)^-1`` ``[NT, HV, 64]`` float32 for one chunk and value head (``BT = 64``)."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        t00 = _diag_inv(a_ptr, t0, 0, L, HV, i_hv, BT)
        t11 = _diag_inv(a_ptr, t0, 16, L, HV, i_hv, BT)
        t22 = _diag_inv(a_ptr, t0, 32, L, HV, i_hv, BT)
        t33 = _diag_inv(a_ptr, t0, 48, L, HV, i_hv, BT)
        a10 = _blk(a_ptr, t0, 16, 0, L, HV, i_hv, BT)
        a20 = _blk(a_ptr, t0, 32, 0, L, HV, i_hv, BT)
        a21 = _blk(a_ptr, t0, 32, 16, L, HV, i_hv, BT)
        a30 = _blk(a_ptr, t0, 48, 0, L, HV, i_hv, BT)
        a31 = _blk(a_ptr, t0, 48, 16, L, HV, i_hv, BT)
        a32 = _blk(a_ptr, t0, 48, 32, L, HV, i_hv, BT)
        _t_blocks(t00, t11, t22, t33, a10, a20, a21, a30, a31, a32, t_ptr, t0, L, HV, i_hv, BT)

    @triton.jit
    def _piece(k_ptr, g_ptr, b_ptr, t0, o: tl.constexpr, L, H, HV, i_hv, i_h, DK, BK: tl.constexpr):
        """Rows ``[o, o + 16)`` of a chunk: ``k [16, BK]`` (input dtype), raw ``g`` and ``beta``
        ``[16]`` float32 (zero past the chunk's length)."""
        r = tl.arange(0, 16)
        ok = tl.arange(0, BK)
        m = (o + r) < L
        tok = t0 + o + r
        k = tl.load(
            k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :],
            mask=m[:, None] & (ok[None, :] < DK),
            other=0.0,
        )
        g = tl.load(g_ptr + tok * HV + i_hv, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + tok * HV + i_hv, mask=m, other=0.0).to(tl.float32)
        return k, g, b

    @triton.jit
    def _a_blk(ki, kj, bi, Gi, Gj, DIAG: tl.constexpr, PREC: tl.constexpr):
        """The 16x16 block ``diag(b_i) K_i K_j^T * exp(G_i - G_j)`` of ``A`` (strictly lower on the diagonal)."""
        a = tl.dot(ki, tl.trans(kj), input_precision=PREC) * bi[:, None]
        if DIAG:
            r = tl.arange(0, 16)
            low = r[:, None] > r[None, :]
            a = a * tl.exp(tl.where(low, Gi[:, None] - Gj[None, :], float("-inf")))
            a = tl.where(low, a, 0.0)
        else:
            a = a * tl.exp(Gi[:, None] - Gj[None, :])
        return a

    @triton.jit
    def _subst_row(a, t, i: tl.constexpr):
        """Row ``i`` of ``T = (I + A)^-1`` (no diagonal) from the rows above it (forward substitution)."""
        r = tl.arange(0, 16)
        sel = r[:, None] == i
        x = -tl.sum(tl.where(sel, a, 0.0), axis=0)
        x = x + tl.sum(x[:, None] * t, axis=0)
        return tl.where(sel, x[None, :], t)

    @triton.jit
    def _wu_row(t_i0, t_i1, t_i2, t_i3, x0, x1, x2, x3, N: tl.constexpr, PREC: tl.constexpr):
        """``sum_{j < N} T_ij X_j`` for one 16-row block ``i`` (``N = i + 1`` blocks)."""
        acc = tl.dot(t_i0.to(x0.dtype), x0, input_precision=PREC)
        if N > 1:
            acc += tl.dot(t_i1.to(x1.dtype), x1, input_precision=PREC)
        if N > 2:
            acc += tl.dot(t_i2.to(x2.dtype), x2, input_precision=PREC)
        if N > 3:
            acc += tl.dot(t_i3.to(x3.dtype), x3, input_precision=PREC)
        return acc

    @triton.jit
    def _put_rows(ptr, x, t0, o: tl.constexpr, L, HV, i_hv, D, BD: tl.constexpr, col0):
        """Store ``x [16, BD]`` at rows ``[o, o + 16)`` of a chunk, columns ``col0 + [0, BD)`` of ``[NT, HV, D]``."""
        r = tl.arange(0, 16)
        oc = col0 + tl.arange(0, BD)
        tl.store(
            ptr + ((t0 + o + r)[:, None] * HV + i_hv) * D + oc[None, :],
            x.to(ptr.dtype.element_ty),
            mask=((o + r) < L)[:, None] & (oc[None, :] < D),
        )

    @triton.jit
    def _prep(
        k_ptr, v_ptr, g_ptr, b_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, q_ptr, p_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
        WU: tl.constexpr, PRE_P: tl.constexpr,
    ):  # fmt: skip
        """``_kkt`` and ``_solve`` in one program per chunk and value head, ``A`` and ``T`` held in
        registers as 16x16 blocks (``BT = 64``): the four diagonal blocks are inverted by one
        forward-substitution loop (four independent chains per step). Stores ``G`` and ``T`` (for
        the backward), then ``W`` and ``U`` by ``WU``: 0, block-row sums ``W_i = sum_j T_ij X_j``
        of the registers' blocks; 1, ``T`` read back (after a barrier) as one ``[BT, BT]`` tile,
        as ``_wu`` does (and ``P`` with ``PRE_P``, see :func:`_wu_tile`); 2, not at all (``_wu``
        runs next)."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        i_h = i_hv // REP
        r = tl.arange(0, 16)
        k0, g0, b0 = _piece(k_ptr, g_ptr, b_ptr, t0, 0, L, H, HV, i_hv, i_h, DK, BK)
        k1, g1, b1 = _piece(k_ptr, g_ptr, b_ptr, t0, 16, L, H, HV, i_hv, i_h, DK, BK)
        k2, g2, b2 = _piece(k_ptr, g_ptr, b_ptr, t0, 32, L, H, HV, i_hv, i_h, DK, BK)
        k3, g3, b3 = _piece(k_ptr, g_ptr, b_ptr, t0, 48, L, H, HV, i_hv, i_h, DK, BK)
        # chunk-local cumulative decay, piece by piece
        G0 = tl.cumsum(g0, axis=0)
        G1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
        G2 = tl.cumsum(g2, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0)
        G3 = tl.cumsum(g3, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.sum(g2, axis=0)
        tl.store(gc_ptr + (t0 + r) * HV + i_hv, G0, mask=r < L)
        tl.store(gc_ptr + (t0 + 16 + r) * HV + i_hv, G1, mask=(16 + r) < L)
        tl.store(gc_ptr + (t0 + 32 + r) * HV + i_hv, G2, mask=(32 + r) < L)
        tl.store(gc_ptr + (t0 + 48 + r) * HV + i_hv, G3, mask=(48 + r) < L)
        a00 = _a_blk(k0, k0, b0, G0, G0, True, PREC)
        a11 = _a_blk(k1, k1, b1, G1, G1, True, PREC)
        a22 = _a_blk(k2, k2, b2, G2, G2, True, PREC)
        a33 = _a_blk(k3, k3, b3, G3, G3, True, PREC)
        a10 = _a_blk(k1, k0, b1, G1, G0, False, PREC)
        a20 = _a_blk(k2, k0, b2, G2, G0, False, PREC)
        a21 = _a_blk(k2, k1, b2, G2, G1, False, PREC)
        a30 = _a_blk(k3, k0, b3, G3, G0, False, PREC)
        a31 = _a_blk(k3, k1, b3, G3, G1, False, PREC)
        a32 = _a_blk(k3, k2, b3, G3, G2, False, PREC)
        dt = w_ptr.dtype.element_ty
        if WU == 0:
            # the keys are dead past here: W's operands b exp(G) K in the input dtype
            x0 = (k0.to(tl.float32) * (b0 * tl.exp(G0))[:, None]).to(dt)
            x1 = (k1.to(tl.float32) * (b1 * tl.exp(G1))[:, None]).to(dt)
            x2 = (k2.to(tl.float32) * (b2 * tl.exp(G2))[:, None]).to(dt)
            x3 = (k3.to(tl.float32) * (b3 * tl.exp(G3))[:, None]).to(dt)
        # (I + A_bb)^-1 of the four diagonal blocks, one substitution step of each per row
        eye = (r[:, None] == r[None, :]).to(tl.float32)
        t00 = -a00
        t11 = -a11
        t22 = -a22
        t33 = -a33
        for i in tl.static_range(2, 16):
            t00 = _subst_row(a00, t00, i)
            t11 = _subst_row(a11, t11, i)
            t22 = _subst_row(a22, t22, i)
            t33 = _subst_row(a33, t33, i)
        t00 += eye
        t11 += eye
        t22 += eye
        t33 += eye
        t10, t20, t21, t30, t31, t32 = _t_blocks(
            t00, t11, t22, t33, a10, a20, a21, a30, a31, a32, t_ptr, t0, L, HV, i_hv, BT
        )
        if WU == 1:
            tl.debug_barrier()  # T and G, just stored by every thread of the program, read back
            _wu_tile(
                k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, q_ptr, p_ptr, scale, t0, L, i_hv, i_h,
                H, HV, DK, DV, BT, BK, BV, NV, PREC, PRE_P,
            )  # fmt: skip
        if WU == 0:
            # W_i = sum_j T_ij (b exp(G) K)_j, U_i = sum_j T_ij (b V)_j with T in the input dtype:
            # converted once (the float32 blocks are stored for the backward and die here)
            z = tl.zeros([16, 16], dtype=dt)
            t00, t11, t22, t33 = t00.to(dt), t11.to(dt), t22.to(dt), t33.to(dt)
            t10, t20, t21, t30, t31, t32 = (
                t10.to(dt),
                t20.to(dt),
                t21.to(dt),
                t30.to(dt),
                t31.to(dt),
                t32.to(dt),
            )
            _put_rows(w_ptr, _wu_row(t00, z, z, z, x0, x0, x0, x0, 1, PREC), t0, 0, L, HV, i_hv, DK, BK, 0)
            _put_rows(w_ptr, _wu_row(t10, t11, z, z, x0, x1, x1, x1, 2, PREC), t0, 16, L, HV, i_hv, DK, BK, 0)
            _put_rows(
                w_ptr, _wu_row(t20, t21, t22, z, x0, x1, x2, x2, 3, PREC), t0, 32, L, HV, i_hv, DK, BK, 0
            )
            _put_rows(
                w_ptr, _wu_row(t30, t31, t32, t33, x0, x1, x2, x3, 4, PREC), t0, 48, L, HV, i_hv, DK, BK, 0
            )
            for iv in range(0, NV):
                col0 = iv * BV
                ov = col0 + tl.arange(0, BV)
                mv = ov[None, :] < DV
                vb = v_ptr + ((t0 + r)[:, None] * HV + i_hv) * DV + ov[None, :]
                y0 = (tl.load(vb, mask=(r < L)[:, None] & mv, other=0.0).to(tl.float32) * b0[:, None]).to(dt)
                y1 = (
                    tl.load(vb + 16 * HV * DV, mask=((16 + r) < L)[:, None] & mv, other=0.0).to(tl.float32)
                    * b1[:, None]
                ).to(dt)
                y2 = (
                    tl.load(vb + 32 * HV * DV, mask=((32 + r) < L)[:, None] & mv, other=0.0).to(tl.float32)
                    * b2[:, None]
                ).to(dt)
                y3 = (
                    tl.load(vb + 48 * HV * DV, mask=((48 + r) < L)[:, None] & mv, other=0.0).to(tl.float32)
                    * b3[:, None]
                ).to(dt)
                _put_rows(
                    u_ptr, _wu_row(t00, z, z, z, y0, y0, y0, y0, 1, PREC), t0, 0, L, HV, i_hv, DV, BV, col0
                )
                _put_rows(
                    u_ptr, _wu_row(t10, t11, z, z, y0, y1, y1, y1, 2, PREC), t0, 16, L, HV, i_hv, DV, BV, col0
                )
                _put_rows(
                    u_ptr,
                    _wu_row(t20, t21, t22, z, y0, y1, y2, y2, 3, PREC),
                    t0,
                    32,
                    L,
                    HV,
                    i_hv,
                    DV,
                    BV,
                    col0,
                )
                _put_rows(
                    u_ptr,
                    _wu_row(t30, t31, t32, t33, y0, y1, y2, y3, 4, PREC),
                    t0,
                    48,
                    L,
                    HV,
                    i_hv,
                    DV,
                    BV,
                    col0,
                )

    @triton.jit
    def _readout_p(q, kt, G, scale, r, PREC: tl.constexpr):
        """The read-out's intra-chunk matrix ``lower_incl(scale Q K^T exp(G_i - G_j))`` ``[BT, BT]``
        float32 from ``q [BT, BK]`` and ``kt = K^T [BK, BT]``; ``r = arange(BT)``."""
        incl = r[:, None] >= r[None, :]
        p = tl.dot(q, kt, input_precision=PREC)
        p = p * scale * tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        return tl.where(incl, p, 0.0)

    @triton.jit
    def _wu_tile(
        k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, q_ptr, p_ptr, scale, t0, L, i_hv, i_h, H, HV, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
        PRE_P: tl.constexpr,
    ):  # fmt: skip
        """``W = T (b exp(G) K)`` ``[BT, DK]`` and ``U = T (b V)`` ``[BT, DV]`` of one chunk from the
        stored ``T`` and ``G``: one ``[BT, BT]`` product per output tile. ``PRE_P``: also the
        read-out's ``P = lower_incl(scale Q K^T exp(G_i - G_j))`` ``[BT, BT]`` into ``p_ptr``
        (``[NT, HV, BT]``, the input dtype: what the read-out multiplies ``V'`` by)."""
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        ok = tl.arange(0, BK)
        mk = ok < DK
        tt = tl.load(t_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :], mask=mt[:, None], other=0.0)
        tt = tt.to(w_ptr.dtype.element_ty)
        beta = tl.load(b_ptr + tok * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        k = tl.load(
            k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :],
            mask=mt[:, None] & mk[None, :],
            other=0.0,
        ).to(tl.float32)
        xw = (k * (beta * tl.exp(G))[:, None]).to(w_ptr.dtype.element_ty)
        w = tl.dot(tt, xw, input_precision=PREC)
        if PRE_P:
            q = tl.load(
                q_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :],
                mask=mt[:, None] & mk[None, :],
                other=0.0,
            )
            pm = _readout_p(q, tl.trans(k.to(q.dtype)), G, scale, r, PREC)
            tl.store(
                p_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :],
                pm.to(p_ptr.dtype.element_ty),
                mask=mt[:, None],
            )
        tl.store(
            w_ptr + (tok[:, None] * HV + i_hv) * DK + ok[None, :],
            w.to(w_ptr.dtype.element_ty),
            mask=mt[:, None] & mk[None, :],
        )
        for iv in range(0, NV):
            ov = iv * BV + tl.arange(0, BV)
            mv = mt[:, None] & (ov[None, :] < DV)
            off = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
            v = tl.load(v_ptr + off, mask=mv, other=0.0).to(tl.float32)
            xu = (v * beta[:, None]).to(u_ptr.dtype.element_ty)
            u = tl.dot(tt, xu, input_precision=PREC)
            tl.store(u_ptr + off, u.to(u_ptr.dtype.element_ty), mask=mv)

    @triton.jit
    def _wu(
        k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, q_ptr, p_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
        PRE_P: tl.constexpr,
    ):  # fmt: skip
        """``W = T (b exp(G) K)`` ``[NT, HV, DK]`` and ``U = T (b V)`` ``[NT, HV, DV]``."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        _wu_tile(
            k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, q_ptr, p_ptr, scale, t0, L, i_hv, i_hv // REP,
            H, HV, DK, DV, BT, BK, BV, NV, PREC, PRE_P,
        )  # fmt: skip

    @triton.jit
    def _chunk_span(c, c0, ts, te, cs_ptr, cl_ptr, BT: tl.constexpr, SEQ_OFFSETS: tl.constexpr):
        """First token and length of chunk slot ``c`` of a sequence whose slots start at ``c0`` and
        whose tokens are ``[ts, te)``: computed (``SEQ_OFFSETS``: nothing loaded inside the
        recurrences' loops, so their loads of the next chunk can be issued ahead) or read from the
        chunk plan. Both equal :func:`chunk_plan`'s ``start`` and ``length``."""
        if SEQ_OFFSETS:
            t0 = ts + (c - c0).to(tl.int64) * BT
            L = tl.minimum(te - t0, BT).to(tl.int32)
        else:
            t0 = tl.load(cs_ptr + c).to(tl.int64)
            L = tl.load(cl_ptr + c)
        return t0, L

    @triton.jit
    def _seq_span(c0, c1, cs_ptr, cl_ptr):
        """Tokens ``[ts, te)`` of the sequence owning chunk slots ``[c0, c1)`` (empty: ``ts = te = 0``)."""
        has = c1 > c0
        ts = tl.load(cs_ptr + c0, mask=has, other=0).to(tl.int64)
        last = tl.maximum(c1 - 1, 0)
        te = tl.load(cs_ptr + last, mask=has, other=0).to(tl.int64) + tl.load(
            cl_ptr + last, mask=has, other=0
        )
        return ts, te

    @triton.jit
    def _state_chunk(
        s, t0, L, c, q_ptr, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, p_ptr,
        i_hv, i_h, ok, ov, mk, mv, scale, H, HV, DK, DV,
        BT: tl.constexpr, PREC: tl.constexpr, STORE_H: tl.constexpr, FUSE_OUT: tl.constexpr,
        PRE_P: tl.constexpr,
    ):  # fmt: skip
        """One chunk (tokens ``[t0, t0 + L)``, slot ``c``) of the forward recurrence: store
        ``h_c = s`` and ``V'`` (``STORE_H``) or the chunk's output (``FUSE_OUT``, what ``_out``
        computes, from the registers), return ``S_out``."""
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        if STORE_H:
            h_off = ((c.to(tl.int64) * HV + i_hv) * DK + ok[:, None]) * DV + ov[None, :]
            tl.store(h_ptr + h_off, s.to(h_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])
        w = tl.load(
            w_ptr + (tok[:, None] * HV + i_hv) * DK + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0
        )
        tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
        m_tv = mt[:, None] & mv[None, :]
        u = tl.load(u_ptr + tv, mask=m_tv, other=0.0).to(tl.float32)
        sd = s.to(w.dtype)
        vn = (u - tl.dot(w, sd, input_precision=PREC)).to(w.dtype)  # [BT, BV]
        if STORE_H:
            tl.store(vn_ptr + tv, vn, mask=m_tv)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        g_last = tl.load(gc_ptr + (t0 + L - 1) * HV + i_hv)
        kt = tl.load(
            k_ptr + tok[None, :] * (H * DK) + i_h * DK + ok[:, None],
            mask=mk[:, None] & mt[None, :],
            other=0.0,
        )  # [BK, BT]
        if FUSE_OUT:
            q = tl.load(
                q_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :],
                mask=mt[:, None] & mk[None, :],
                other=0.0,
            )
            o = tl.dot(q, sd, input_precision=PREC) * (scale * tl.exp(G))[:, None]
            if PRE_P:  # stored by the prep
                p = tl.load(p_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :], mask=mt[:, None], other=0.0)
            else:
                p = _readout_p(q, kt, G, scale, r, PREC)
            o += tl.dot(p.to(vn.dtype), vn, input_precision=PREC)
            tl.store(o_ptr + tv, o.to(o_ptr.dtype.element_ty), mask=m_tv)
        kd = (kt.to(tl.float32) * tl.exp(g_last - G)[None, :]).to(w.dtype)
        return s * tl.exp(g_last) + tl.dot(kd, vn, input_precision=PREC)

    @triton.jit
    def _state(
        q_ptr, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, p_ptr, h0_ptr, ht_ptr, so_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_H: tl.constexpr, FUSE_OUT: tl.constexpr,
        PREC: tl.constexpr, INTERP: tl.constexpr, SEQ_OFFSETS: tl.constexpr, PRE_P: tl.constexpr,
    ):  # fmt: skip
        """State recurrence of sequence ``n`` / value head / value tile: stores ``h [NC, HV, DK, DV]``
        (state entering each chunk) and ``V' [NT, HV, DV]`` (``STORE_H``: for the backward) or the
        output ``O [NT, HV, DV]`` (``FUSE_OUT``: the forward), and the final state ``[N, HV, DK, DV]``."""
        i_nh = tl.program_id(0)
        i_v = tl.program_id(1)
        i_n = i_nh // HV
        i_hv = i_nh % HV
        i_h = i_hv // REP
        ok = tl.arange(0, BK)
        ov = i_v * BV + tl.arange(0, BV)
        mk = ok < DK
        mv = ov < DV
        s_off = (i_nh.to(tl.int64) * DK + ok[:, None]) * DV + ov[None, :]
        if HAS_H0:
            s = tl.load(h0_ptr + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
        else:
            s = tl.zeros([BK, BV], dtype=tl.float32)
        c0 = tl.load(so_ptr + i_n)
        c1 = tl.load(so_ptr + i_n + 1)
        ts, te = _seq_span(c0, c1, cs_ptr, cl_ptr)
        if INTERP:  # the interpreter cannot take loaded loop bounds in range()
            c = c0
            while c < c1:
                t0, L = _chunk_span(c, c0, ts, te, cs_ptr, cl_ptr, BT, SEQ_OFFSETS)
                s = _state_chunk(
                    s, t0, L, c, q_ptr, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, p_ptr,
                    i_hv, i_h, ok, ov, mk, mv, scale, H, HV, DK, DV, BT, PREC, STORE_H, FUSE_OUT, PRE_P,
                )  # fmt: skip
                c += 1
        else:
            for c in range(c0, c1):
                t0, L = _chunk_span(c, c0, ts, te, cs_ptr, cl_ptr, BT, SEQ_OFFSETS)
                s = _state_chunk(
                    s, t0, L, c, q_ptr, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, p_ptr,
                    i_hv, i_h, ok, ov, mk, mv, scale, H, HV, DK, DV, BT, PREC, STORE_H, FUSE_OUT, PRE_P,
                )  # fmt: skip
        if STORE_HT:
            tl.store(ht_ptr + s_off, s, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def _out(
        q_ptr, k_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, p_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, PRE_P: tl.constexpr,
    ):  # fmt: skip
        """``O = scale exp(G) Q h + lower_incl(scale Q K^T exp(G_i - G_j)) V'`` for one value tile
        (``PRE_P``: the second matrix as the prep stored it)."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        i_v = tl.program_id(2)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        i_h = i_hv // REP
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        ok = tl.arange(0, BK)
        mk = ok < DK
        ov = i_v * BV + tl.arange(0, BV)
        mv = ov < DV
        qk_off = tok[:, None] * (H * DK) + i_h * DK + ok[None, :]
        q = tl.load(q_ptr + qk_off, mask=mt[:, None] & mk[None, :], other=0.0)
        if not PRE_P:
            k = tl.load(k_ptr + qk_off, mask=mt[:, None] & mk[None, :], other=0.0)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        h = tl.load(
            h_ptr + ((i_c.to(tl.int64) * HV + i_hv) * DK + ok[:, None]) * DV + ov[None, :],
            mask=mk[:, None] & mv[None, :],
            other=0.0,
        )
        o = tl.dot(q, h, input_precision=PREC) * (scale * tl.exp(G))[:, None]
        if PRE_P:
            p = tl.load(p_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :], mask=mt[:, None], other=0.0)
        else:
            p = _readout_p(q, tl.trans(k), G, scale, r, PREC)
        tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
        vn = tl.load(vn_ptr + tv, mask=mt[:, None] & mv[None, :], other=0.0)
        o += tl.dot(p.to(vn.dtype), vn, input_precision=PREC)
        tl.store(o_ptr + tv, o.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])

    @triton.jit
    def _dv_local(
        q_ptr, k_ptr, gc_ptr, do_ptr, dv_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """``P^T dO`` ``[NT, HV, DV]`` (the intra-chunk part of ``dV'``)."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        i_h = i_hv // REP
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        ok = tl.arange(0, BK)
        mk = ok < DK
        qk_off = tok[:, None] * (H * DK) + i_h * DK + ok[None, :]
        q = tl.load(q_ptr + qk_off, mask=mt[:, None] & mk[None, :], other=0.0)
        k = tl.load(k_ptr + qk_off, mask=mt[:, None] & mk[None, :], other=0.0)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        # pt[j, i] = P[i, j] = scale q_i . k_j exp(G_i - G_j), i >= j
        up = r[:, None] <= r[None, :]
        pt = tl.dot(k, tl.trans(q), input_precision=PREC)
        pt = pt * scale * tl.exp(tl.where(up, G[None, :] - G[:, None], float("-inf")))
        pt = tl.where(up, pt, 0.0).to(q.dtype)
        for iv in range(0, NV):
            ov = iv * BV + tl.arange(0, BV)
            mv = mt[:, None] & (ov[None, :] < DV)
            tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
            do = tl.load(do_ptr + tv, mask=mv, other=0.0).to(q.dtype)
            dv = tl.dot(pt, do, input_precision=PREC)
            tl.store(dv_ptr + tv, dv.to(dv_ptr.dtype.element_ty), mask=mv)

    @triton.jit
    def _dstate_chunk(
        ds, t0, L, c, q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, i_hv, i_h, ok, ov, mk, mv,
        scale, H, HV, DK, DV, BT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One chunk (tokens ``[t0, t0 + L)``, slot ``c``) of the reverse recurrence: store
        ``dh_c = ds``, complete ``dV'``, return ``dS``."""
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        h_off = ((c.to(tl.int64) * HV + i_hv) * DK + ok[:, None]) * DV + ov[None, :]
        tl.store(dh_ptr + h_off, ds.to(dh_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        g_last = tl.load(gc_ptr + (t0 + L - 1) * HV + i_hv)
        qk_off = tok[:, None] * (H * DK) + i_h * DK + ok[None, :]
        m_qk = mt[:, None] & mk[None, :]
        k = tl.load(k_ptr + qk_off, mask=m_qk, other=0.0).to(tl.float32)
        kd = (k * tl.exp(g_last - G)[:, None]).to(q_ptr.dtype.element_ty)
        tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
        m_tv = mt[:, None] & mv[None, :]
        dv = tl.load(dv_ptr + tv, mask=m_tv, other=0.0).to(tl.float32)
        dv += tl.dot(kd, ds.to(q_ptr.dtype.element_ty), input_precision=PREC)
        tl.store(dv_ptr + tv, dv.to(dv_ptr.dtype.element_ty), mask=m_tv)
        q = tl.load(q_ptr + qk_off, mask=m_qk, other=0.0).to(tl.float32)
        qg = (q * (scale * tl.exp(G))[:, None]).to(q_ptr.dtype.element_ty)
        do = tl.load(do_ptr + tv, mask=m_tv, other=0.0).to(q_ptr.dtype.element_ty)
        w = tl.load(w_ptr + (tok[:, None] * HV + i_hv) * DK + ok[None, :], mask=m_qk, other=0.0)
        ds = ds * tl.exp(g_last)
        ds += tl.dot(tl.trans(qg), do, input_precision=PREC)
        ds -= tl.dot(tl.trans(w), dv.to(w.dtype), input_precision=PREC)
        return ds

    @triton.jit
    def _dstate(
        q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, dht_ptr, dh0_ptr, so_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
        SEQ_OFFSETS: tl.constexpr,
    ):  # fmt: skip
        """Reverse recurrence: stores ``dh [NC, HV, DK, DV]`` (gradient of each chunk's outgoing
        state), completes ``dV'`` in place in ``dv`` and the initial-state gradient."""
        i_nh = tl.program_id(0)
        i_v = tl.program_id(1)
        i_n = i_nh // HV
        i_hv = i_nh % HV
        i_h = i_hv // REP
        ok = tl.arange(0, BK)
        ov = i_v * BV + tl.arange(0, BV)
        mk = ok < DK
        mv = ov < DV
        s_off = (i_nh.to(tl.int64) * DK + ok[:, None]) * DV + ov[None, :]
        if HAS_DHT:
            ds = tl.load(dht_ptr + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
        else:
            ds = tl.zeros([BK, BV], dtype=tl.float32)
        c0 = tl.load(so_ptr + i_n)
        c1 = tl.load(so_ptr + i_n + 1)
        ts, te = _seq_span(c0, c1, cs_ptr, cl_ptr)
        if INTERP:  # the interpreter cannot take loaded loop bounds in range()
            c = c1 - 1
            while c >= c0:
                t0, L = _chunk_span(c, c0, ts, te, cs_ptr, cl_ptr, BT, SEQ_OFFSETS)
                ds = _dstate_chunk(
                    ds, t0, L, c, q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, i_hv, i_h, ok, ov,
                    mk, mv, scale, H, HV, DK, DV, BT, PREC,
                )  # fmt: skip
                c -= 1
        else:
            for j in range(0, c1 - c0):
                c = c1 - 1 - j
                t0, L = _chunk_span(c, c0, ts, te, cs_ptr, cl_ptr, BT, SEQ_OFFSETS)
                ds = _dstate_chunk(
                    ds, t0, L, c, q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, i_hv, i_h,
                    ok, ov, mk, mv, scale, H, HV, DK, DV, BT, PREC,
                )  # fmt: skip
        if STORE_DH0:
            tl.store(dh0_ptr + s_off, ds, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def _l2_tile_bwd(x_ptr, r_ptr, dy, tok, i_h, H, DK, ok, mt, m_qk):
        """``dx = r (dy - y (y . dy))``, ``y = x r``, for the rows ``tok`` of head ``i_h`` (``x`` raw)."""
        x = tl.load(x_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :], mask=m_qk, other=0.0).to(
            tl.float32
        )
        rr = tl.load(r_ptr + tok * H + i_h, mask=mt, other=0.0)
        y = x * rr[:, None]
        return rr[:, None] * (dy - y * tl.sum(y * dy, axis=1)[:, None])

    @triton.jit
    def _dqkwg(
        q_ptr, k_ptr, gc_ptr, h_ptr, dh_ptr, vn_ptr, dv_ptr, do_ptr,
        dq_ptr, dk_ptr, dw_ptr, dg_ptr, cs_ptr, cl_ptr, xq_ptr, rq_ptr,
        scale, H, HV, REP, DK, DV, DG_STRIDE,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
        L2_BWD: tl.constexpr,
    ):  # fmt: skip
        """Per chunk and key tile ``[BK]`` (grid axis 2): ``dQ``, the read-out and transition parts
        of ``dK`` (float32, per value head ``[NT, HV, DK]``), ``dW = -dV' h^T`` and this tile's
        part of the decay gradient w.r.t. the cumulative ``G`` (a sum over keys: tile ``i`` writes
        ``dg[i] = dg_ptr + i * DG_STRIDE``, ``_wy_bwd`` adds them up). ``L2_BWD`` (one value head
        per q/k head, one key tile): ``dQ`` through the L2 norm of the raw ``xq``, stored in
        ``dq``'s dtype."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        i_h = i_hv // REP
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        ok = tl.program_id(2) * BK + tl.arange(0, BK)
        mk = ok < DK
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        b_dp = tl.zeros([BT, BT], dtype=tl.float32)
        b_hdh = tl.zeros([BK], dtype=tl.float32)
        for iv in range(0, NV):
            ov = iv * BV + tl.arange(0, BV)
            mv = ov < DV
            h_off = ((i_c.to(tl.int64) * HV + i_hv) * DK + ok[:, None]) * DV + ov[None, :]
            m_h = mk[:, None] & mv[None, :]
            h = tl.load(h_ptr + h_off, mask=m_h, other=0.0)
            dh = tl.load(dh_ptr + h_off, mask=m_h, other=0.0)
            tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
            m_tv = mt[:, None] & mv[None, :]
            vn = tl.load(vn_ptr + tv, mask=m_tv, other=0.0)
            dv = tl.load(dv_ptr + tv, mask=m_tv, other=0.0)
            do = tl.load(do_ptr + tv, mask=m_tv, other=0.0).to(h.dtype)
            b_dq += tl.dot(do, tl.trans(h), input_precision=PREC)
            b_dk += tl.dot(vn, tl.trans(dh), input_precision=PREC)
            b_dw += tl.dot(dv, tl.trans(h), input_precision=PREC)
            b_dp += tl.dot(do, tl.trans(vn), input_precision=PREC)
            b_hdh += tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1)
        qk_off = tok[:, None] * (H * DK) + i_h * DK + ok[None, :]
        m_qk = mt[:, None] & mk[None, :]
        q = tl.load(q_ptr + qk_off, mask=m_qk, other=0.0)
        k = tl.load(k_ptr + qk_off, mask=m_qk, other=0.0)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        g_last = tl.load(gc_ptr + (t0 + L - 1) * HV + i_hv)
        qf = q.to(tl.float32)
        kf = k.to(tl.float32)
        # read-out through the entering state: O += scale exp(G) Q h
        dq = b_dq * (scale * tl.exp(G))[:, None]
        dg = tl.sum(dq * qf, axis=1)
        # transition: S_out = exp(G_L) h + (exp(G_L - G) K)^T V'
        dk = b_dk * tl.exp(g_last - G)[:, None]
        dkk = tl.where(mt, tl.sum(dk * kf, axis=1), 0.0)
        dg -= dkk
        dg_last = tl.sum(dkk, axis=0) + tl.exp(g_last) * tl.sum(b_hdh, axis=0)
        # intra-chunk read-out: P = lower_incl(scale Q K^T exp(G_i - G_j))
        incl = r[:, None] >= r[None, :]
        ds = b_dp * scale * tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        ds = tl.where(incl & mt[:, None], ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
        e = ds * tl.dot(q, tl.trans(k), input_precision=PREC)  # dP * P
        dg += tl.sum(e, axis=1) - tl.sum(e, axis=0)
        dg += tl.where(r == L - 1, dg_last, 0.0)
        o_k = (tok[:, None] * HV + i_hv) * DK + ok[None, :]
        if L2_BWD:
            dq = _l2_tile_bwd(xq_ptr, rq_ptr, dq, tok, i_h, H, DK, ok, mt, m_qk)
        tl.store(dq_ptr + o_k, dq.to(dq_ptr.dtype.element_ty), mask=m_qk)
        tl.store(dk_ptr + o_k, dk, mask=m_qk)
        tl.store(dw_ptr + o_k, -b_dw, mask=m_qk)
        tl.store(dg_ptr + tl.program_id(2).to(tl.int64) * DG_STRIDE + tok * HV + i_hv, dg, mask=mt)

    @triton.jit
    def _wy_values(
        v_ptr, du_ptr, dv_ptr, tt, beta, dt, db, tok, mt, i_hv, HV, DV,
        BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        """The value tiles of the ``W, U`` backward: stores ``dV = beta T^T dU``, returns ``dT`` and
        ``dbeta`` with their value-side terms added. ``LOWP``: the products take ``T`` and
        ``beta V`` in the input dtype, as the forward's ``U = T (beta V)`` does."""
        if LOWP:
            ttl = tl.trans(tt.to(du_ptr.dtype.element_ty))
        for iv in range(0, NV):
            ov = iv * BV + tl.arange(0, BV)
            mv = mt[:, None] & (ov[None, :] < DV)
            tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
            v = tl.load(v_ptr + tv, mask=mv, other=0.0).to(tl.float32)
            if LOWP:
                du = tl.load(du_ptr + tv, mask=mv, other=0.0)
                dxu = tl.dot(ttl, du, input_precision=PREC)
                dt += tl.dot(du, tl.trans((v * beta[:, None]).to(du.dtype)), input_precision=PREC)
            else:
                du = tl.load(du_ptr + tv, mask=mv, other=0.0).to(tl.float32)
                dxu = tl.dot(tl.trans(tt), du, input_precision=PREC)
                dt += tl.dot(du, tl.trans(v * beta[:, None]), input_precision=PREC)
            db += tl.sum(dxu * v, axis=1)
            tl.store(dv_ptr + tv, (dxu * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=mv)
        return dt, db

    @triton.jit
    def _wy_da(tt, dt, mt, BT: tl.constexpr, PREC: tl.constexpr):
        """``T = (I + A)^-1``  ->  ``dA = -T^T dT T^T`` on the strict lower triangle (valid rows)."""
        r = tl.arange(0, BT)
        da = -tl.dot(tl.dot(tl.trans(tt), dt, input_precision=PREC), tl.trans(tt), input_precision=PREC)
        return tl.where((r[:, None] > r[None, :]) & mt[:, None], da, 0.0)

    @triton.jit
    def _wy_m(da, kk, G, beta, db, dgc, BT: tl.constexpr):
        """From ``dA`` and ``K K^T``: ``dbeta`` and ``dG`` with the terms of
        ``A = strict_lower(diag(beta) K K^T * exp(G_i - G_j))`` added, and ``M`` with
        ``dK += M K + M^T K``."""
        r = tl.arange(0, BT)
        low = r[:, None] > r[None, :]
        gam = tl.exp(tl.where(low, G[:, None] - G[None, :], float("-inf")))
        kkg = tl.where(low, kk * gam, 0.0)
        db += tl.sum(da * kkg, axis=1)
        e = da * kkg * beta[:, None]  # dA * A
        dgc += tl.sum(e, axis=1) - tl.sum(e, axis=0)
        return db, dgc, tl.where(low, da * gam * beta[:, None], 0.0)

    @triton.jit
    def _wy_store_db_dg(db_ptr, dg_ptr, db, dgc, tok, mt, i_hv, HV, DG_STRIDE, NDG: tl.constexpr):
        """Store ``dbeta``; ``dg`` w.r.t. the raw ``g`` from the gradient w.r.t. ``G`` (plus the
        ``NDG`` parts already in ``dg``, ``DG_STRIDE`` apart; the result goes to the first): ``G``
        is a cumsum, so ``dg_t = sum_{s >= t} dG_s`` within the chunk."""
        tl.store(db_ptr + tok * HV + i_hv, db.to(db_ptr.dtype.element_ty), mask=mt)
        for j in tl.static_range(NDG):
            dgc += tl.load(dg_ptr + j * DG_STRIDE + tok * HV + i_hv, mask=mt, other=0.0)
        dgc = tl.where(mt, dgc, 0.0)
        dg = tl.sum(dgc, axis=0) - tl.cumsum(dgc, axis=0) + dgc
        tl.store(dg_ptr + tok * HV + i_hv, dg, mask=mt)

    @triton.jit
    def _wy_bwd(
        k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, dw_ptr, du_ptr, dk_ptr, dv_ptr, db_ptr, dg_ptr,
        cs_ptr, cl_ptr, xk_ptr, rk_ptr, dko_ptr,
        H, HV, REP, DK, DV, DG_STRIDE,
        BT: tl.constexpr, BKT: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
        PREC: tl.constexpr, L2_BWD: tl.constexpr, LOWP: tl.constexpr, NDG: tl.constexpr,
    ):  # fmt: skip
        """Backward of ``W, U`` through ``T = (I + A)^-1``, ``beta``, ``V`` and ``A``: adds to
        ``dk`` (float32 in place), writes ``dv``, ``dbeta`` and ``dg`` (w.r.t. the raw ``g``:
        reverse cumsum of the gradient w.r.t. ``G`` read from ``dg``'s ``NDG`` parts, written to
        the first). Over key tiles
        ``[BT, BKT]``, so the float32 key-side tiles (``K``, ``beta exp(G) K``, ``T^T dW``,
        ``dK``) are ``BKT`` wide. Pass 1 (per key tile): ``dT``, ``dbeta``, ``dG``; the partial
        ``dK = T^T dW beta exp(G) + dK_in`` goes back to ``dk`` (this program's rows). Then the
        value tiles (:func:`_wy_values`), ``dA``, and ``K K^T`` tile by tile. Pass 2 adds
        ``M K + M^T K`` to each tile; with ``L2_BWD`` (the L2 norm of the raw ``xk``, one value
        head per q/k head) it also sums ``y . dK`` per row and pass 3 writes
        ``r (dK - y (y . dK))`` into ``dko`` (its dtype)."""
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
        L = tl.load(cl_ptr + i_c)
        if L == 0:
            return
        t0 = tl.load(cs_ptr + i_c).to(tl.int64)
        i_h = i_hv // REP
        r = tl.arange(0, BT)
        mt = r < L
        tok = t0 + r
        tt = tl.load(t_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :], mask=mt[:, None], other=0.0)
        beta = tl.load(b_ptr + tok * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        eg = tl.exp(G)
        dt = tl.zeros([BT, BT], dtype=tl.float32)
        kk = tl.zeros([BT, BT], dtype=tl.float32)
        db = tl.zeros([BT], dtype=tl.float32)
        dgc = tl.zeros([BT], dtype=tl.float32)
        for ik in range(0, NK):
            ok = ik * BKT + tl.arange(0, BKT)
            m_qk = mt[:, None] & (ok[None, :] < DK)
            k = tl.load(k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :], mask=m_qk, other=0.0)
            kf = k.to(tl.float32)
            o_k = (tok[:, None] * HV + i_hv) * DK + ok[None, :]
            dw = tl.load(dw_ptr + o_k, mask=m_qk, other=0.0)
            xw = kf * (beta * eg)[:, None]
            dxw = tl.dot(tl.trans(tt), dw, input_precision=PREC)  # [BT, BKT]
            dt += tl.dot(dw, tl.trans(xw), input_precision=PREC)
            db += tl.sum(dxw * kf * eg[:, None], axis=1)
            dgc += tl.sum(dxw * xw, axis=1)
            dkp = dxw * (beta * eg)[:, None] + tl.load(dk_ptr + o_k, mask=m_qk, other=0.0)
            tl.store(dk_ptr + o_k, dkp, mask=m_qk)
        dt, db = _wy_values(
            v_ptr, du_ptr, dv_ptr, tt, beta, dt, db, tok, mt, i_hv, HV, DV, BV, NV, PREC, LOWP
        )
        da = _wy_da(tt, dt, mt, BT, PREC)
        # K K^T after T and dT are dead (the keys again: L2 hits), not carried through the loops
        for ik in range(0, NK):
            ok = ik * BKT + tl.arange(0, BKT)
            k = tl.load(
                k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :],
                mask=mt[:, None] & (ok[None, :] < DK),
                other=0.0,
            )
            kk += tl.dot(k, tl.trans(k), input_precision=PREC)
        db, dgc, m = _wy_m(da, kk, G, beta, db, dgc, BT)
        mT = tl.trans(m)
        tl.debug_barrier()  # pass 1's dk stores are read back by other threads
        yd = tl.zeros([BT], dtype=tl.float32)
        for ik in range(0, NK):
            ok = ik * BKT + tl.arange(0, BKT)
            m_qk = mt[:, None] & (ok[None, :] < DK)
            kf = tl.load(k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :], mask=m_qk, other=0.0).to(
                tl.float32
            )
            o_k = (tok[:, None] * HV + i_hv) * DK + ok[None, :]
            dk = tl.load(dk_ptr + o_k, mask=m_qk, other=0.0)
            dk += tl.dot(m, kf, input_precision=PREC) + tl.dot(mT, kf, input_precision=PREC)
            tl.store(dk_ptr + o_k, dk, mask=m_qk)
            if L2_BWD:
                x = tl.load(
                    xk_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :], mask=m_qk, other=0.0
                ).to(tl.float32)
                yd += tl.sum(x * dk, axis=1)
        if L2_BWD:
            tl.debug_barrier()
            rr = tl.load(rk_ptr + tok * H + i_h, mask=mt, other=0.0)
            yd = yd * rr  # y . dK with y = x r
            for ik in range(0, NK):
                ok = ik * BKT + tl.arange(0, BKT)
                m_qk = mt[:, None] & (ok[None, :] < DK)
                o_k = (tok[:, None] * HV + i_hv) * DK + ok[None, :]
                x = tl.load(
                    xk_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :], mask=m_qk, other=0.0
                ).to(tl.float32)
                dk = tl.load(dk_ptr + o_k, mask=m_qk, other=0.0)
                dk = rr[:, None] * (dk - x * (rr * yd)[:, None])
                tl.store(dko_ptr + o_k, dk.to(dko_ptr.dtype.element_ty), mask=m_qk)
        _wy_store_db_dg(db_ptr, dg_ptr, db, dgc, tok, mt, i_hv, HV, DG_STRIDE, NDG)

    # the kernels resolve the helpers they call through the module's globals
    globals().update(
        _diag_inv=_diag_inv, _blk=_blk, _put=_put, _state_chunk=_state_chunk, _dstate_chunk=_dstate_chunk,
        _t_blocks=_t_blocks, _wu_tile=_wu_tile, _readout_p=_readout_p, _piece=_piece, _a_blk=_a_blk, _subst_row=_subst_row, _wu_row=_wu_row, _put_rows=_put_rows,
        _l2_tile_bwd=_l2_tile_bwd, _wy_values=_wy_values, _wy_da=_wy_da, _wy_m=_wy_m,
        _wy_store_db_dg=_wy_store_db_dg, _chunk_span=_chunk_span, _seq_span=_seq_span,
    )  # fmt: skip
    return SimpleNamespace(
        l2norm_fwd=_l2norm_fwd, l2norm_bwd=_l2norm_bwd, kkt=_kkt, solve=_solve, prep=_prep, wu=_wu, state=_state,
        out=_out, dv_local=_dv_local, dstate=_dstate, dqkwg=_dqkwg, wy_bwd=_wy_bwd,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


# Launch settings per kernel (``num_warps``, ``num_stages``) and the value-tile widths; the
# benchmark (``benchmarks/gdn_bench.py --sections triton_tune``) times alternatives by editing these
# in place. dstate w8s2, dqkwg w8s3, wy_bwd w8s1: its H200 run of 2026-12-03 (B2 T8192 H16 Dk128
# Dv256 bf16; 0.615 -> 0.553, 0.580 -> 0.522, 1.225 -> 1.057 ms, gradients bit-identical to w4s2 /
# w8s2 / w8s2); gains under 6% (state, out) left at their defaults. state_out (the no-grad
# forward's recurrence) s1: gdn_bench triton_choices on the H200, second lease of 2026-12-03
# (h200-2026-12-03-r10-gdn-choices.json): forward 1.183 -> 1.124 ms; the training recurrences keep
# s2 (s1 there: state 0.39 -> 0.52, dstate 0.53 -> 0.62 ms; s3: forward 1.61 ms).
LAUNCH: dict[str, dict[str, int]] = {
    "l2norm": {"num_warps": 4, "num_stages": 1},
    "l2norm_bwd": {"num_warps": 4, "num_stages": 1},
    "kkt": {"num_warps": 4, "num_stages": 2},
    "solve": {"num_warps": 4, "num_stages": 2},
    "prep": {"num_warps": 4, "num_stages": 2},
    "wu": {"num_warps": 4, "num_stages": 2},
    "state": {"num_warps": 4, "num_stages": 2},
    "state_out": {"num_warps": 4, "num_stages": 1},
    "out": {"num_warps": 4, "num_stages": 2},
    "dv_local": {"num_warps": 4, "num_stages": 2},
    "dstate": {"num_warps": 8, "num_stages": 2},
    "dqkwg": {"num_warps": 8, "num_stages": 3},
    "wy_bwd": {"num_warps": 4, "num_stages": 2},
}
TILES: dict[str, int] = {
    "state_values": 8192,
    "dstate_values": 8192,
    "state_out_values": 4096,
    "chunk_bv": 64,
    "fill_sms": 1,
    "wy_key_tile": 32,
    "prep_wu": 0,
    "dqkwg_key_tile": 128,
}
# ``prep_wu`` (where ``W``, ``U`` are made; 0: the prep's block-row sums, 1: the prep re-reads the
#   ``T`` it stored as one tile after a barrier, 2: ``_wu`` after a prep that stores ``A``'s
#   inverse only). Compiled for sm_90 (benchmarks/triton_regs.py --sass): 0 has 230 barriers and
#   144 B of spills, 1 has 77 and 24 B, 2 has 63 and 56 B (plus _wu: 13, none); all 255
#   registers, two programs per SM. Not yet timed on a GPU (no device was lent on 2026-12-04,
#   seventh session): gdn_bench triton_choices "prep:" does it.
# ``pre_p`` (with ``prep_wu`` 1 or 2): the prep (or ``_wu``) also stores the read-out's
#   intra-chunk matrix ``P`` (input dtype, ``[NT, HV, 64]``), so the no-grad recurrence and
#   ``_out`` load it instead of recomputing ``Q K^T`` per value tile: compiled for sm_90, the
#   no-grad recurrence 2248 -> 1504 instructions (255 -> 246 registers), ``_out`` 1376 -> 664
#   (153 -> 90 registers, 3 -> 5 programs per SM); the prep gains one 64x64x128 product and a
#   store. Same precision (``P`` was cast to the input dtype before its product anyway). Not yet
#   timed on a GPU.
# ``state_values`` / ``dstate_values``: float32 state values per program of the forward (training,
#   and the backward's recomputation) and the reverse recurrence; one setting until 2026-12-04,
#   where both at 4096 measured state 0.398 -> 0.363 ms but dstate 0.530 -> 0.915 (r12 choices;
#   the out stage after it read 0.30 -> 0.43, launch to launch, so the state figure alone is not
#   conclusive). Split so the next lease can time the forward's alone.
# ``dqkwg_key_tile``: ``_dqkwg`` over key tiles of this width (grid axis 2), the decay gradient's
#   parts summed in ``_wy_bwd``; with one value head per q/k head the q L2-norm backward then
#   runs as its own kernel. 64 at 8 warps: 158 registers (from 252), one program per SM either
#   way; at 4 warps 252, two per SM. Not yet timed on a GPU.
# Kernel choices, each timed both ways on the same inputs by ``benchmarks/gdn_bench.py``
# (section ``triton_choices``); H200, B2 T8192 H16 Dk128 Dv256 bf16, 2026-12-03:
# ``prep``: one kernel for ``_kkt``, ``_solve`` and ``_wu`` (0.47-0.53 ms against 0.50 for the
#   three: a wash; two launches fewer);
# ``out``: a forward that keeps no states (no grad) writes the output from the recurrence's
#   registers instead of storing ``h`` for ``_out`` (forward 1.16 against 1.19 ms at 32 value
#   columns per program); a training forward stores ``h`` anyway and runs ``_out`` (the fused
#   kernel with stores: fwd+bwd 3.57-3.69 against 3.53 ms);
# ``keep_states``: a forward that needs a backward keeps ``W``, ``h`` and ``V'`` for it instead of
#   recomputing them there (fwd+bwd 4.09 -> 3.69 ms; ``h`` is ``[n_chunks, HV, Dk, Dv]`` in the
#   input dtype, as large as q, k and v together at Dk = 128, Dv = 256);
# ``wy_lowp``: ``_wy_bwd``'s value-tile products in the input dtype, as the forward's
#   ``U = T (beta V)`` (1.10 -> 1.00 ms; largest error against float64 4.13e-3 against 4.11e-3).
# ``seq_offsets``: the two recurrences compute each chunk's first token and length from their
#   sequence's bounds instead of loading them from the chunk plan inside the sequential loop (a
#   load whose result addresses the chunk's other loads). Timed both ways on the H200 (second
#   lease of 2026-12-03): a wash: dstate 0.556 -> 0.530 ms, the no-grad forward 1.154 -> 1.183,
#   forward+backward 3.418 -> 3.432 (within run-to-run noise); kept, since the state_out s1 choice
#   above was measured with it.
# Measured and removed (git history has the code): the prep as one 64x64 tile for ``A``, ``T``
#   (block doubling, 10 dots of 64^3) and ``W``/``U`` (prep 0.47 -> 0.70-0.75 ms, TF32x3 products;
#   gdn_bench triton_choices, H200, 2026-12-04, h200-2026-12-04-gdn-choices.json); the 16x16
#   inverse's products in TF32x3 (0.47 -> 0.57 ms, same run); the substitution run on ``T^T``
#   (568 barriers against 230 when compiled); the whole-row ``_wy_bwd`` (8 warps, 255 registers,
#   one program per SM), which the key tiles (``TILES["wy_key_tile"]``, 4 warps) replaced:
#   0.998 -> 0.81 ms, forward+backward 3.374 -> 3.186 ms, gradients within 2e-9 relative (same
#   run); tiles of 32 columns against 64: 0.797 -> 0.777 ms, forward+backward 3.175 -> 3.147; 8
#   warps 1.09, one stage a wash (h200-2026-12-04-r12-gdn-choices.json).
FUSED: dict[str, bool] = {
    "prep": True,
    "out": True,
    "keep_states": True,
    "wy_lowp": True,
    "seq_offsets": True,
    "pre_p": False,
}
_STAGE_HOOK: list[Any] = []


def _cfg(name: str) -> dict[str, int]:
    """Launch options of kernel ``name``; tells a registered stage hook that it is about to run."""
    for hook in _STAGE_HOOK:
        hook(name)
    return LAUNCH[name]


def _prec(dtype: torch.dtype) -> str:
    """``input_precision`` of float32 products: exact for float32 inputs, TF32 for bf16/fp16 ones
    (whose operands carry fewer mantissa bits than TF32 anyway)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(Dk: int, Dv: int) -> tuple[int, int, int]:
    """``(BK, BV of the recurrences, BV of the chunk-parallel kernels)``."""
    BK = max(16, _next_pow2(Dk))
    pv = max(16, _next_pow2(Dv))
    return BK, max(16, min(pv, TILES["state_values"] // BK)), max(16, min(pv, TILES["chunk_bv"]))


def _fill_sms(bv: int, rows: int, Dv: int, sms: int) -> int:
    """Value columns per program of a recurrence (grid ``rows x ceil(Dv / bv)``, each program
    sequential over its chunks): halved, down to 16, while twice the programs would still fit
    one wave of ``sms`` multiprocessors. B=1, T=32k, 16 heads at 64 columns is 64 programs on
    the H200's 132 SMs; at 32 it is 128. ``TILES["fill_sms"] = 0`` keeps ``bv``."""
    while TILES["fill_sms"] and bv > 16 and 2 * rows * -(-Dv // bv) <= sms:
        bv //= 2
    return bv


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (0 off CUDA: no refill in the interpreter)."""
    return info_for(device).sm_count if device.type == "cuda" else 0


def _fuse_out(n_seq: int, B: int, HV: int, Dk: int, Dv: int, device: torch.device) -> bool:
    """Whether a forward that keeps no states writes the output from the recurrence (``FUSED["out"]``)
    here, rather than storing ``h`` for ``_out``: only for rows (no documents) whose fused grid
    fills the multiprocessors once at more than one program each. Measured on the H200
    (gdn_bench triton_speed, 2026-12-04, forward vs the training forward's state + out):
    B2 T8k H16 Dv256 (256 programs on 132 SMs) 1.055 against 1.157 ms; one program per SM or
    fewer: B1 T32k 2.98 / 2.59, FlashQLA's 8k and 32k 0.85 / 0.76 and 3.47 / 3.08; documents
    (~1,000 programs of unequal length) 1.46 / 1.38. Off CUDA (interpreter) it follows the flag."""
    if not FUSED["out"]:
        return False
    sms = _sm_count(device)
    if sms == 0:
        return True
    programs = n_seq * HV * -(-Dv // _recurrence_bv(Dk, Dv, n_seq * HV, sms, fuse_out=True))
    return n_seq == B and sms < programs <= 2 * sms


def _recurrence_bv(Dk: int, Dv: int, rows: int, sms: int, *, fuse_out: bool) -> int:
    """Value columns per program of the forward recurrence (``rows`` = sequences x value heads):
    ``TILES["state_out_values"]`` / ``["state_values"]`` float32 values of state per program,
    then :func:`_fill_sms`."""
    BK, bv, _ = _blocks(Dk, Dv)
    if fuse_out:
        bv = max(16, min(_next_pow2(Dv), TILES["state_out_values"] // BK))
    return _fill_sms(bv, rows, Dv, sms)


def n_slots_for(n_tokens: int, n_seq: int, has_docs: bool, seq_len: int) -> int:
    """Static number of chunk slots: ``B * ceil(T / C)`` for rows, ``total // C + n_seq`` for documents."""
    if not has_docs:
        return n_seq * (-(-seq_len // CHUNK))
    return n_tokens // CHUNK + n_seq


def chunk_plan(cu: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk slots of the sequences ``cu [N + 1]`` on the device, no host synchronisation.

    Returns ``(start [n_slots], length [n_slots], seq_offsets [N + 1])`` int32: slot ``s`` covers
    tokens ``[start, start + length)`` (``length = 0``: unused); sequence ``n`` owns the slots
    ``[seq_offsets[n], seq_offsets[n + 1])``.
    """
    cu64 = cu.to(torch.int64)
    N = cu64.shape[0] - 1
    lens = cu64[1:] - cu64[:-1]
    nch = torch.div(lens + (CHUNK - 1), CHUNK, rounding_mode="floor")
    so = torch.cat([cu64.new_zeros(1), torch.cumsum(nch, 0)])
    slot = torch.arange(n_slots, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(so, slot, right=True) - 1  # = searchsorted(so[1:], ...): so[0] = 0 <= slot
    valid = seq < N
    seqc = seq.clamp(max=max(N - 1, 0))
    start = cu64[seqc] + (slot - so[seqc]) * CHUNK
    length = (cu64[seqc + 1] - start).clamp(0, CHUNK)
    start = torch.where(valid, start, 0)
    length = torch.where(valid, length, 0)
    return start.to(torch.int32), length.to(torch.int32), so.to(torch.int32)


_PLANS: dict[int, tuple[Any, int, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def _plan_for(cu: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_plan` once per ``cu`` tensor (forward and backward of a step share it; ~20
    small launches each otherwise). Keyed by the tensor itself (a weak reference: a new tensor at a
    freed one's address gets its own plan) and its version counter."""
    hit = _PLANS.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == cu._version and hit[2] == n_slots:
        return hit[3]
    plan = chunk_plan(cu, n_slots)
    if len(_PLANS) >= 32:
        _PLANS.clear()
    _PLANS[id(cu)] = (weakref.ref(cu), cu._version, n_slots, plan)
    return plan


@functools.lru_cache(maxsize=16)
def _row_offsets(n_tokens: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``[0, T, 2T, ..., B·T]`` int32 on ``device``: one tensor per shape, so its plan is cached too."""
    return torch.arange(0, n_tokens + 1, max(seq_len, 1), device=device, dtype=torch.int32)


def _l2_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, D]`` -> ``(x / |x|, 1 / |x| [rows] float32)``."""
    rows, D = x.shape
    y = torch.empty_like(x)
    r = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _kernels().l2norm_fwd[(-(-rows // L2_ROWS),)](
            x, y, r, rows, D, L2NORM_EPS, BR=L2_ROWS, BD=max(16, _next_pow2(D)), **_cfg("l2norm")
        )
    return y, r


def _l2_bwd(x: torch.Tensor, r: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, D = x.shape
    dx = torch.empty(rows, D, dtype=dtype, device=x.device)
    if rows:
        _kernels().l2norm_bwd[(-(-rows // L2_ROWS),)](
            x, r, dy, dx, rows, D, BR=L2_ROWS, BD=max(16, _next_pow2(D)), **_cfg("l2norm_bwd")
        )
    return dx


def _wu_pass(
    kn: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor, tm: torch.Tensor,
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_slots: int, H: int,
    *, qn: torch.Tensor | None = None, p: torch.Tensor | None = None, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``W``, ``U`` from the stored ``T`` (after the separate or the inverse-only prep, and in the
    backward's recomputation); with ``p`` (and ``qn``, ``scale``) also the read-out's ``P`` into it."""
    NT, HV = gc.shape
    Dk, Dv = kn.shape[-1], v.shape[-1]
    cs, cl, _ = plan
    BK, _, BVc = _blocks(Dk, Dv)
    w = torch.empty(NT, HV, Dk, dtype=kn.dtype, device=kn.device)
    u = torch.empty(NT, HV, Dv, dtype=kn.dtype, device=kn.device)
    _kernels().wu[(n_slots, HV)](
        kn, v, beta, gc, tm, w, u, qn if p is not None else kn, p if p is not None else gc, cs, cl, float(scale),
        H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, NV=-(-Dv // BVc), PREC=_prec(kn.dtype), PRE_P=p is not None, **_cfg("wu"),
    )  # fmt: skip
    return w, u


def _recurrence(
    qn: torch.Tensor, kn: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gc: torch.Tensor,
    h0: torch.Tensor | None, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_slots: int, H: int,
    scale: float, *, fuse_out: bool, store_final: bool, store_h: bool = True, p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The sequential kernel: ``(h, vn, o, final)``. ``fuse_out``: write the output from the
    registers (the forward; ``p``: the read-out's intra-chunk matrix as the prep stored it);
    ``store_h``: store each chunk's entering state ``h`` and ``V'`` (what the backward reads; else
    ``[0]``-sized)."""
    NT, HV = gc.shape
    Dk, Dv = kn.shape[-1], u.shape[-1]
    dt, dev = kn.dtype, kn.device
    cs, cl, so = plan
    n_seq = so.shape[0] - 1
    BK = _blocks(Dk, Dv)[0]
    BVs = _recurrence_bv(Dk, Dv, n_seq * HV, _sm_count(dev), fuse_out=fuse_out)
    o = torch.empty(NT, HV, Dv, dtype=dt, device=dev) if fuse_out else kn.new_empty(0)
    h = torch.empty(n_slots, HV, Dk, Dv, dtype=dt, device=dev) if store_h else kn.new_empty(0)
    vn = torch.empty(NT, HV, Dv, dtype=dt, device=dev) if store_h else kn.new_empty(0)
    final = torch.empty(n_seq if store_final else 0, HV, Dk, Dv, dtype=torch.float32, device=dev)
    _kernels().state[(n_seq * HV, -(-Dv // BVs))](
        qn, kn, w, u, gc, h, vn, o, p if p is not None else gc, h0 if h0 is not None else final, final, so, cs, cl,
        float(scale), H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVs, HAS_H0=h0 is not None, STORE_HT=store_final, STORE_H=store_h,
        FUSE_OUT=fuse_out, PREC=_prec(dt), INTERP=_interpreting(), SEQ_OFFSETS=FUSED["seq_offsets"],
        PRE_P=fuse_out and p is not None, **_cfg("state_out" if fuse_out else "state"),
    )  # fmt: skip
    return h, vn, o, final


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor,
    n_slots: int,
    scale: float,
    use_l2: bool,
    keep: bool,
) -> tuple[torch.Tensor, ...]:
    kern = _kernels()
    B, T, H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    NT = B * T
    dt = v.dtype
    q2 = q.reshape(NT, H, Dk).to(dt).contiguous()
    k2 = k.reshape(NT, H, Dk).to(dt).contiguous()
    v2 = v.reshape(NT, HV, Dv).contiguous()
    g2 = g.reshape(NT, HV).contiguous()
    b2 = beta.reshape(NT, HV).contiguous()
    rq, rk = (q2.new_empty(0, dtype=torch.float32) for _ in range(2))  # outputs must not alias
    if use_l2:
        qn, rq = _l2_fwd(q2.view(NT * H, Dk))
        kn, rk = _l2_fwd(k2.view(NT * H, Dk))
        qn, kn = qn.view(NT, H, Dk), kn.view(NT, H, Dk)
    else:
        qn, kn = q2, k2
    plan = _plan_for(cu, n_slots)
    cs, cl, _ = plan
    BK, _, BVc = _blocks(Dk, Dv)
    prec = _prec(dt)
    gc = torch.empty(NT, HV, dtype=torch.float32, device=q.device)
    tm = torch.empty(NT, HV, CHUNK, dtype=torch.float32, device=q.device)
    pre_p = FUSED["pre_p"]
    if pre_p and not (FUSED["prep"] and TILES["prep_wu"] in (1, 2)):
        raise ValueError(
            'FUSED["pre_p"] needs the fused prep with TILES["prep_wu"] 1 or 2 (W, U as one tile)'
        )
    p = torch.empty(NT, HV, CHUNK, dtype=dt, device=q.device) if pre_p else None
    pp = p if p is not None else gc
    if FUSED["prep"]:
        pre = TILES["prep_wu"]
        w = torch.empty(NT if pre != 2 else 0, HV, Dk, dtype=dt, device=q.device)  # mode 2: by _wu
        u = torch.empty(NT if pre != 2 else 0, HV, Dv, dtype=dt, device=q.device)
        kern.prep[(n_slots, HV)](
            kn, v2, g2, b2, gc, tm, w, u, qn, pp, cs, cl, float(scale), H, HV, HV // H, Dk, Dv,
            BT=CHUNK, BK=BK, BV=BVc, NV=-(-Dv // BVc), PREC=prec, WU=pre, PRE_P=pre_p and pre == 1, **_cfg("prep"),
        )  # fmt: skip
        if pre == 2:
            w, u = _wu_pass(kn, v2, b2, gc, tm, plan, n_slots, H, qn=qn, p=p, scale=scale)
    else:
        a = torch.empty(NT, HV, CHUNK, dtype=torch.float32, device=q.device)
        kern.kkt[(n_slots, HV)](
            kn, g2, b2, gc, a, cs, cl, H, HV, HV // H, Dk, BT=CHUNK, BK=BK, PREC=prec, **_cfg("kkt")
        )
        kern.solve[(n_slots, HV)](a, tm, cs, cl, HV, BT=CHUNK, **_cfg("solve"))
        del a
        w, u = _wu_pass(kn, v2, b2, gc, tm, plan, n_slots, H)
    h0c = None if h0 is None else h0.float().contiguous()
    fuse = not keep and _fuse_out(cu.numel() - 1, B, HV, Dk, Dv, q.device)
    h, vn, o, final = _recurrence(
        qn, kn, w, u, gc, h0c, plan, n_slots, H, scale, fuse_out=fuse, store_final=True, store_h=keep or not fuse,
        p=p,
    )  # fmt: skip
    del u
    if not fuse:
        o = torch.empty(NT, HV, Dv, dtype=v.dtype, device=q.device)
        kern.out[(n_slots, HV, -(-Dv // BVc))](
            qn, kn, gc, h, vn, o, pp, cs, cl, float(scale), H, HV, HV // H, Dk, Dv,
            BT=CHUNK, BK=BK, BV=BVc, PREC=prec, PRE_P=pre_p, **_cfg("out"),
        )  # fmt: skip
    if not keep:
        w, h, vn = (q2.new_empty(0) for _ in range(3))
    if not use_l2:
        qn, kn = q2.new_empty(0), q2.new_empty(0)
    return o.view(B, T, HV, Dv), final, qn, kn, rq, rk, tm, gc, w, h, vn


def _bwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor,
    qn: torch.Tensor,
    kn: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    tm: torch.Tensor,
    gc: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    vn: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    n_slots: int,
    scale: float,
    use_l2: bool,
    need_dh0: bool,
) -> tuple[torch.Tensor, ...]:
    kern = _kernels()
    B, T, H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    NT = B * T
    dt, dev = v.dtype, q.device
    rep = HV // H
    v2 = v.reshape(NT, HV, Dv).contiguous()
    b2 = beta.reshape(NT, HV).contiguous()
    if not use_l2:
        qn = q.reshape(NT, H, Dk).to(dt).contiguous()
        kn = k.reshape(NT, H, Dk).to(dt).contiguous()
    plan = _plan_for(cu, n_slots)
    cs, cl, so = plan
    n_seq = so.shape[0] - 1
    BK, _, BVc = _blocks(Dk, Dv)
    BVs = max(16, min(max(16, _next_pow2(Dv)), TILES["dstate_values"] // BK))  # the reverse recurrence's tile
    NV = -(-Dv // BVc)
    prec = _prec(dt)
    if h.numel() == 0:  # the forward kept no states: recompute W, U, h and V'
        h0c = None if h0 is None else h0.float().contiguous()
        w, u = _wu_pass(kn, v2, b2, gc, tm, plan, n_slots, H)
        h, vn, _, _ = _recurrence(
            qn, kn, w, u, gc, h0c, plan, n_slots, H, scale, fuse_out=False, store_final=False
        )
        del u
    do2 = do.reshape(NT, HV, Dv).to(dt).contiguous()
    dvb = torch.empty(NT, HV, Dv, dtype=dt, device=dev)
    kern.dv_local[(n_slots, HV)](
        qn, kn, gc, do2, dvb, cs, cl, float(scale), H, HV, rep, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, NV=NV, PREC=prec, **_cfg("dv_local"),
    )  # fmt: skip
    dh = torch.empty(n_slots, HV, Dk, Dv, dtype=dt, device=dev)
    dh0 = torch.empty(n_seq if need_dh0 else 0, HV, Dk, Dv, dtype=torch.float32, device=dev)
    dhtc = None if dht is None else dht.float().contiguous()
    BVs = _fill_sms(BVs, n_seq * HV, Dv, _sm_count(dev))
    kern.dstate[(n_seq * HV, -(-Dv // BVs))](
        qn, kn, w, gc, do2, dvb, dh, dhtc if dhtc is not None else dh0, dh0, so, cs, cl,
        float(scale), H, HV, rep, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVs, HAS_DHT=dhtc is not None, STORE_DH0=need_dh0, PREC=prec, INTERP=_interpreting(),
        SEQ_OFFSETS=FUSED["seq_offsets"], **_cfg("dstate"),
    )  # fmt: skip
    del w
    # one value head per q/k head: the L2-norm backward happens inside _dqkwg (one key tile) and
    # _wy_bwd
    l2_in = use_l2 and rep == 1
    bkq = min(BK, TILES["dqkwg_key_tile"])
    nkq = -(-Dk // bkq)
    l2_q = l2_in and nkq == 1
    xq = q.reshape(NT, H, Dk).contiguous() if l2_q else gc
    xk = k.reshape(NT, H, Dk).contiguous() if l2_in else gc
    dqh = torch.empty(NT, HV, Dk, dtype=q.dtype if l2_q else torch.float32, device=dev)
    dkh = torch.empty(NT, HV, Dk, dtype=torch.float32, device=dev)
    dw = torch.empty_like(dkh)
    dg = torch.empty(nkq, NT, HV, dtype=torch.float32, device=dev)  # a part per key tile
    kern.dqkwg[(n_slots, HV, nkq)](
        qn, kn, gc, h, dh, vn, dvb, do2, dqh, dkh, dw, dg, cs, cl, xq, rq if l2_q else gc,
        float(scale), H, HV, rep, Dk, Dv, NT * HV,
        BT=CHUNK, BK=bkq, BV=BVc, NV=NV, PREC=prec, L2_BWD=l2_q, **_cfg("dqkwg"),
    )  # fmt: skip
    del h, dh, vn
    dv = torch.empty(NT, HV, Dv, dtype=v.dtype, device=dev)
    db = torch.empty(NT, HV, dtype=beta.dtype, device=dev)
    dko = torch.empty(NT, H, Dk, dtype=k.dtype, device=dev) if l2_in else dkh
    bkt = min(BK, TILES["wy_key_tile"])
    kern.wy_bwd[(n_slots, HV)](
        kn, v2, b2, gc, tm, dw, dvb, dkh, dv, db, dg, cs, cl, xk, rk if l2_in else gc, dko, H, HV, rep, Dk, Dv,
        NT * HV, BT=CHUNK, BKT=bkt, NK=-(-Dk // bkt), BV=BVc, NV=NV, PREC=prec, L2_BWD=l2_in,
        LOWP=FUSED["wy_lowp"] and dt != torch.float32, NDG=nkq, **_cfg("wy_bwd"),
    )  # fmt: skip
    dg = dg[0]
    if l2_in:
        dk = dko
        dq = dqh if l2_q else _l2_bwd(q.reshape(NT * H, Dk).contiguous(), rq, dqh.view(NT * H, Dk), q.dtype)
    else:
        dq = dqh.view(NT, H, rep, Dk).sum(2) if rep > 1 else dqh.view(NT, H, Dk)
        dk = dkh.view(NT, H, rep, Dk).sum(2) if rep > 1 else dkh.view(NT, H, Dk)
        if use_l2:
            dq = _l2_bwd(q.reshape(NT * H, Dk).contiguous(), rq, dq.reshape(NT * H, Dk), q.dtype)
            dk = _l2_bwd(k.reshape(NT * H, Dk).contiguous(), rk, dk.reshape(NT * H, Dk), k.dtype)
    return (
        dq.reshape(B, T, H, Dk).to(q.dtype),
        dk.reshape(B, T, H, Dk).to(k.dtype),
        dv.view(B, T, HV, Dv),
        dg.view(B, T, HV).to(g.dtype),
        db.view(B, T, HV),
        dh0,
    )


# ---------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("olmo_attn::gdn_chunk_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor,
    n_slots: int,
    scale: float,
    use_l2: bool,
    keep: bool,
) -> list[torch.Tensor]:
    """Forward: ``[o, final, q_hat, k_hat, 1/|q|, 1/|k|, T, G, W, h, V']`` (see :func:`_fwd_impl`;
    the last three ``[0]``-sized unless ``keep``)."""
    return list(_fwd_impl(q, k, v, g, beta, h0, cu, n_slots, scale, use_l2, keep))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, h0, cu, n_slots, scale, use_l2, keep):  # type: ignore[no-untyped-def]
    B, T, H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    NT = B * T
    n_seq = cu.shape[0] - 1
    f32 = torch.float32
    nl = NT if use_l2 else 0
    return [
        v.new_empty(B, T, HV, Dv),
        v.new_empty(n_seq, HV, Dk, Dv, dtype=f32),
        v.new_empty(nl, H, Dk) if use_l2 else v.new_empty(0),
        v.new_empty(nl, H, Dk) if use_l2 else v.new_empty(0),
        v.new_empty(nl * H, dtype=f32),
        v.new_empty(nl * H, dtype=f32),
        v.new_empty(NT, HV, CHUNK, dtype=f32),
        v.new_empty(NT, HV, dtype=f32),
        v.new_empty(NT, HV, Dk) if keep else v.new_empty(0),
        v.new_empty(n_slots, HV, Dk, Dv) if keep else v.new_empty(0),
        v.new_empty(NT, HV, Dv) if keep else v.new_empty(0),
    ]


@torch.library.custom_op("olmo_attn::gdn_chunk_bwd", mutates_args=())
def _bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu: torch.Tensor,
    qn: torch.Tensor,
    kn: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    tm: torch.Tensor,
    gc: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    vn: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    n_slots: int,
    scale: float,
    use_l2: bool,
    need_dh0: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, dg, dbeta, d_initial_state)`` (see :func:`_bwd_impl`)."""
    return _bwd_impl(
        q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc, w, h, vn, do, dht, n_slots, scale, use_l2, need_dh0
    )


@_bwd_op.register_fake
def _bwd_fake(
    q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc, w, h, vn, do, dht, n_slots, scale, use_l2, need_dh0
):  # type: ignore[no-untyped-def]
    n_seq = cu.shape[0] - 1
    HV, Dk, Dv = v.shape[2], q.shape[3], v.shape[3]
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(g),
        torch.empty_like(beta),
        v.new_empty(n_seq if need_dh0 else 0, HV, Dk, Dv, dtype=torch.float32),
    )


class _ChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        h0: torch.Tensor | None,
        cu: torch.Tensor,
        n_slots: int,
        scale: float,
        use_l2: bool,
        keep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o, final, *saved = torch.ops.olmo_attn.gdn_chunk_fwd(
            q, k, v, g, beta, h0, cu, n_slots, scale, use_l2, keep
        )
        ctx.save_for_backward(q, k, v, g, beta, h0, cu, *saved)
        ctx.args = (n_slots, scale, use_l2)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, do: torch.Tensor | None, dfinal: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, g, beta, h0, cu, *saved = ctx.saved_tensors
        n_slots, scale, use_l2 = ctx.args
        if do is None:
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dg, db, dh0 = torch.ops.olmo_attn.gdn_chunk_bwd(
            q, k, v, g, beta, h0, cu, *saved, do, dfinal, n_slots, scale, use_l2, need_dh0
        )
        return dq, dk, dv, dg, db, (dh0.to(h0.dtype) if need_dh0 else None), None, None, None, None, None


def triton_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule with the fused Triton kernels (autograd; chunk 64).

    Same arguments and results as :func:`olmo_attn.recurrent.chunked.chunk_gated_delta_rule`:
    ``q, k [B, T, H, Dk]``, ``v [B, T, HV, Dv]`` (``HV % H == 0``), ``g`` (log-decay) and ``beta``
    ``[B, T, HV]``, ``initial_state [n_seq, HV, Dk, Dv]``, ``cu_seqlens`` int32/int64
    ``[n_seq + 1]`` offsets into the flattened ``B * T`` tokens. Shapes are validated by the caller
    (:func:`olmo_attn.recurrent.chunk_gated_delta_rule` with ``kernel="triton"``). The final state
    is float32 ``[n_seq, HV, Dk, Dv]``; ``o`` takes the dtype of ``v``.
    """
    B, T, _H, Dk = q.shape
    NT = B * T
    if cu_seqlens is None:
        if torch.compiler.is_compiling():
            cu = torch.arange(0, NT + 1, max(T, 1), device=q.device, dtype=torch.int32)
        else:
            cu = _row_offsets(NT, T, q.device)
        n_slots = n_slots_for(NT, B, False, T)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        n_slots = n_slots_for(NT, cu.shape[0] - 1, True, T)
    scale = float(Dk**-0.5 if scale is None else scale)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
    )
    keep = FUSED["keep_states"] and grads
    o, final = _ChunkFn.apply(q, k, v, g, beta, initial_state, cu, n_slots, scale, bool(use_qk_l2norm), keep)
    return o, (final if output_final_state else None)
