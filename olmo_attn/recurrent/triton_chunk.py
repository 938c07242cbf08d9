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

from ..hardware import package_status

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

    @triton.jit
    def _wu(
        k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, w_ptr, u_ptr, cs_ptr, cl_ptr,
        H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """``W = T (b exp(G) K)`` ``[NT, HV, DK]`` and ``U = T (b V)`` ``[NT, HV, DV]``."""
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
    def _state_chunk(
        s, c, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, cs_ptr, cl_ptr, i_hv, i_h, ok, ov, mk, mv,
        H, HV, DK, DV, BT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One chunk of the forward recurrence: store ``h_c = s`` and ``V'``, return ``S_out``."""
        r = tl.arange(0, BT)
        t0 = tl.load(cs_ptr + c).to(tl.int64)
        L = tl.load(cl_ptr + c)
        mt = r < L
        tok = t0 + r
        h_off = ((c.to(tl.int64) * HV + i_hv) * DK + ok[:, None]) * DV + ov[None, :]
        tl.store(h_ptr + h_off, s.to(h_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])
        w = tl.load(
            w_ptr + (tok[:, None] * HV + i_hv) * DK + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0
        )
        tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
        m_tv = mt[:, None] & mv[None, :]
        u = tl.load(u_ptr + tv, mask=m_tv, other=0.0).to(tl.float32)
        vn = u - tl.dot(w, s.to(w.dtype), input_precision=PREC)  # [BT, BV]
        tl.store(vn_ptr + tv, vn.to(vn_ptr.dtype.element_ty), mask=m_tv)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        g_last = tl.load(gc_ptr + (t0 + L - 1) * HV + i_hv)
        kt = tl.load(
            k_ptr + tok[None, :] * (H * DK) + i_h * DK + ok[:, None],
            mask=mk[:, None] & mt[None, :],
            other=0.0,
        ).to(tl.float32)  # [BK, BT]
        kt = (kt * tl.exp(g_last - G)[None, :]).to(w.dtype)
        return s * tl.exp(g_last) + tl.dot(kt, vn.to(w.dtype), input_precision=PREC)

    @triton.jit
    def _state(
        k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, h0_ptr, ht_ptr, so_ptr, cs_ptr, cl_ptr,
        H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """State recurrence of sequence ``n`` / value head / value tile: stores ``h [NC, HV, DK, DV]``
        (state entering each chunk), ``V' [NT, HV, DV]`` and the final state ``[N, HV, DK, DV]``."""
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
        if INTERP:  # the interpreter cannot take loaded loop bounds in range()
            c = c0
            while c < c1:
                s = _state_chunk(
                    s, c, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, cs_ptr, cl_ptr, i_hv, i_h, ok, ov, mk, mv,
                    H, HV, DK, DV, BT, PREC,
                )  # fmt: skip
                c += 1
        else:
            for c in range(c0, c1):
                s = _state_chunk(
                    s, c, k_ptr, w_ptr, u_ptr, gc_ptr, h_ptr, vn_ptr, cs_ptr, cl_ptr, i_hv, i_h, ok, ov, mk, mv,
                    H, HV, DK, DV, BT, PREC,
                )  # fmt: skip
        if STORE_HT:
            tl.store(ht_ptr + s_off, s, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def _out(
        q_ptr, k_ptr, gc_ptr, h_ptr, vn_ptr, o_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """``O = scale exp(G) Q h + lower_incl(scale Q K^T exp(G_i - G_j)) V'`` for one value tile."""
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
        k = tl.load(k_ptr + qk_off, mask=mt[:, None] & mk[None, :], other=0.0)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        h = tl.load(
            h_ptr + ((i_c.to(tl.int64) * HV + i_hv) * DK + ok[:, None]) * DV + ov[None, :],
            mask=mk[:, None] & mv[None, :],
            other=0.0,
        )
        o = tl.dot(q, h, input_precision=PREC) * (scale * tl.exp(G))[:, None]
        incl = r[:, None] >= r[None, :]
        p = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = p * scale * tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        p = tl.where(incl, p, 0.0)
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
        ds, c, q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, cs_ptr, cl_ptr, i_hv, i_h, ok, ov, mk, mv,
        scale, H, HV, DK, DV, BT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One chunk of the reverse recurrence: store ``dh_c = ds``, complete ``dV'``, return ``dS``."""
        r = tl.arange(0, BT)
        t0 = tl.load(cs_ptr + c).to(tl.int64)
        L = tl.load(cl_ptr + c)
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
        if INTERP:  # the interpreter cannot take loaded loop bounds in range()
            c = c1 - 1
            while c >= c0:
                ds = _dstate_chunk(
                    ds, c, q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, cs_ptr, cl_ptr, i_hv, i_h, ok, ov,
                    mk, mv, scale, H, HV, DK, DV, BT, PREC,
                )  # fmt: skip
                c -= 1
        else:
            for j in range(0, c1 - c0):
                ds = _dstate_chunk(
                    ds, c1 - 1 - j, q_ptr, k_ptr, w_ptr, gc_ptr, do_ptr, dv_ptr, dh_ptr, cs_ptr, cl_ptr, i_hv, i_h,
                    ok, ov, mk, mv, scale, H, HV, DK, DV, BT, PREC,
                )  # fmt: skip
        if STORE_DH0:
            tl.store(dh0_ptr + s_off, ds, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def _dqkwg(
        q_ptr, k_ptr, gc_ptr, h_ptr, dh_ptr, vn_ptr, dv_ptr, do_ptr,
        dq_ptr, dk_ptr, dw_ptr, dg_ptr, cs_ptr, cl_ptr,
        scale, H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Per chunk: ``dQ``, the read-out and transition parts of ``dK`` (float32, per value head
        ``[NT, HV, DK]``), ``dW = -dV' h^T`` and the decay gradient w.r.t. the cumulative ``G``."""
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
        tl.store(dq_ptr + o_k, dq, mask=m_qk)
        tl.store(dk_ptr + o_k, dk, mask=m_qk)
        tl.store(dw_ptr + o_k, -b_dw, mask=m_qk)
        tl.store(dg_ptr + tok * HV + i_hv, dg, mask=mt)

    @triton.jit
    def _wy_bwd(
        k_ptr, v_ptr, b_ptr, gc_ptr, t_ptr, dw_ptr, du_ptr, dk_ptr, dv_ptr, db_ptr, dg_ptr,
        cs_ptr, cl_ptr,
        H, HV, REP, DK, DV,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Backward of ``W, U`` through ``T = (I + A)^-1``, ``beta``, ``V`` and ``A``: adds to
        ``dk`` (float32 in place), writes ``dv``, ``dbeta`` and ``dg`` (w.r.t. the raw ``g``:
        reverse cumsum of the gradient w.r.t. ``G`` read from ``dg`` in place)."""
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
        m_qk = mt[:, None] & mk[None, :]
        tt = tl.load(t_ptr + (tok[:, None] * HV + i_hv) * BT + r[None, :], mask=mt[:, None], other=0.0)
        beta = tl.load(b_ptr + tok * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
        G = tl.load(gc_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        eg = tl.exp(G)
        k = tl.load(k_ptr + tok[:, None] * (H * DK) + i_h * DK + ok[None, :], mask=m_qk, other=0.0)
        kf = k.to(tl.float32)
        o_k = (tok[:, None] * HV + i_hv) * DK + ok[None, :]
        dw = tl.load(dw_ptr + o_k, mask=m_qk, other=0.0)
        xw = kf * (beta * eg)[:, None]
        dxw = tl.dot(tl.trans(tt), dw, input_precision=PREC)  # [BT, BK]
        dt = tl.dot(dw, tl.trans(xw), input_precision=PREC)  # [BT, BT]
        db = tl.sum(dxw * kf * eg[:, None], axis=1)
        dgc = tl.sum(dxw * xw, axis=1)
        dk = dxw * (beta * eg)[:, None]
        for iv in range(0, NV):
            ov = iv * BV + tl.arange(0, BV)
            mv = mt[:, None] & (ov[None, :] < DV)
            tv = (tok[:, None] * HV + i_hv) * DV + ov[None, :]
            v = tl.load(v_ptr + tv, mask=mv, other=0.0).to(tl.float32)
            du = tl.load(du_ptr + tv, mask=mv, other=0.0).to(tl.float32)
            dxu = tl.dot(tl.trans(tt), du, input_precision=PREC)
            dt += tl.dot(du, tl.trans(v * beta[:, None]), input_precision=PREC)
            db += tl.sum(dxu * v, axis=1)
            tl.store(dv_ptr + tv, (dxu * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=mv)
        # T = (I + A)^-1  ->  dA = -T^T dT T^T on the strict lower triangle
        low = r[:, None] > r[None, :]
        da = -tl.dot(tl.dot(tl.trans(tt), dt, input_precision=PREC), tl.trans(tt), input_precision=PREC)
        da = tl.where(low & mt[:, None], da, 0.0)
        gam = tl.exp(tl.where(low, G[:, None] - G[None, :], float("-inf")))
        kk = tl.dot(k, tl.trans(k), input_precision=PREC)
        kkg = tl.where(low, kk * gam, 0.0)
        db += tl.sum(da * kkg, axis=1)
        e = da * kkg * beta[:, None]  # dA * A
        dgc += tl.sum(e, axis=1) - tl.sum(e, axis=0)
        m = da * gam * beta[:, None]
        m = tl.where(low, m, 0.0)
        dk += tl.dot(m, kf, input_precision=PREC) + tl.dot(tl.trans(m), kf, input_precision=PREC)
        dk += tl.load(dk_ptr + o_k, mask=m_qk, other=0.0)
        tl.store(dk_ptr + o_k, dk, mask=m_qk)
        tl.store(db_ptr + tok * HV + i_hv, db.to(db_ptr.dtype.element_ty), mask=mt)
        dgc += tl.load(dg_ptr + tok * HV + i_hv, mask=mt, other=0.0)
        dgc = tl.where(mt, dgc, 0.0)
        # g -> G is a cumsum: dg_t = sum_{s >= t} dG_s (within the chunk)
        dg = tl.sum(dgc, axis=0) - tl.cumsum(dgc, axis=0) + dgc
        tl.store(dg_ptr + tok * HV + i_hv, dg, mask=mt)

    # the kernels resolve the helpers they call through the module's globals
    globals().update(
        _diag_inv=_diag_inv, _blk=_blk, _put=_put, _state_chunk=_state_chunk, _dstate_chunk=_dstate_chunk
    )
    return SimpleNamespace(
        l2norm_fwd=_l2norm_fwd, l2norm_bwd=_l2norm_bwd, kkt=_kkt, solve=_solve, wu=_wu, state=_state,
        out=_out, dv_local=_dv_local, dstate=_dstate, dqkwg=_dqkwg, wy_bwd=_wy_bwd,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


# Launch settings per kernel (``num_warps``, ``num_stages``) and the value-tile widths; the
# benchmark (``benchmarks/gdn_bench.py --sections triton_tune``) times alternatives by editing these
# in place. dstate w8s2, dqkwg w8s3, wy_bwd w8s1: its H200 run of 2026-12-03 (B2 T8192 H16 Dk128
# Dv256 bf16; 0.615 -> 0.553, 0.580 -> 0.522, 1.225 -> 1.057 ms, gradients bit-identical to w4s2 /
# w8s2 / w8s2); gains under 6% (state, out) left at their defaults.
LAUNCH: dict[str, dict[str, int]] = {
    "l2norm": {"num_warps": 4, "num_stages": 1},
    "l2norm_bwd": {"num_warps": 4, "num_stages": 1},
    "kkt": {"num_warps": 4, "num_stages": 2},
    "solve": {"num_warps": 4, "num_stages": 2},
    "wu": {"num_warps": 4, "num_stages": 2},
    "state": {"num_warps": 4, "num_stages": 2},
    "out": {"num_warps": 4, "num_stages": 2},
    "dv_local": {"num_warps": 4, "num_stages": 2},
    "dstate": {"num_warps": 8, "num_stages": 2},
    "dqkwg": {"num_warps": 8, "num_stages": 3},
    "wy_bwd": {"num_warps": 8, "num_stages": 1},
}
TILES: dict[str, int] = {"state_values": 8192, "chunk_bv": 64}
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
    seq = torch.searchsorted(so[1:].contiguous(), slot, right=True)
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


def _state_pass(
    kn: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gc: torch.Tensor,
    tm: torch.Tensor,
    h0: torch.Tensor | None,
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n_slots: int,
    H: int,
    store_final: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W``, ``U`` (from the saved ``T``), then the recurrence: ``(w, h, vn, final)``."""
    kern = _kernels()
    NT, HV = gc.shape
    Dk, Dv = kn.shape[-1], v.shape[-1]
    dt = kn.dtype
    cs, cl, so = plan
    BK, BVs, BVc = _blocks(Dk, Dv)
    prec = _prec(dt)
    w = torch.empty(NT, HV, Dk, dtype=dt, device=kn.device)
    u = torch.empty(NT, HV, Dv, dtype=dt, device=kn.device)
    kern.wu[(n_slots, HV)](
        kn, v, beta, gc, tm, w, u, cs, cl, H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, NV=-(-Dv // BVc), PREC=prec, **_cfg("wu"),
    )  # fmt: skip
    n_seq = so.shape[0] - 1
    h = torch.empty(n_slots, HV, Dk, Dv, dtype=dt, device=kn.device)
    vn = torch.empty(NT, HV, Dv, dtype=dt, device=kn.device)
    final = torch.empty(n_seq if store_final else 0, HV, Dk, Dv, dtype=torch.float32, device=kn.device)
    kern.state[(n_seq * HV, -(-Dv // BVs))](
        kn, w, u, gc, h, vn, h0 if h0 is not None else final, final, so, cs, cl, H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVs, HAS_H0=h0 is not None, STORE_HT=store_final, PREC=prec, INTERP=_interpreting(), **_cfg("state"),
    )  # fmt: skip
    return w, h, vn, final


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
    a = torch.empty(NT, HV, CHUNK, dtype=torch.float32, device=q.device)
    kern.kkt[(n_slots, HV)](
        kn, g2, b2, gc, a, cs, cl, H, HV, HV // H, Dk, BT=CHUNK, BK=BK, PREC=prec, **_cfg("kkt")
    )
    tm = torch.empty_like(a)
    kern.solve[(n_slots, HV)](a, tm, cs, cl, HV, BT=CHUNK, **_cfg("solve"))
    del a
    h0c = None if h0 is None else h0.float().contiguous()
    _, h, vn, final = _state_pass(kn, v2, b2, gc, tm, h0c, plan, n_slots, H, True)
    o = torch.empty(NT, HV, Dv, dtype=v.dtype, device=q.device)
    kern.out[(n_slots, HV, -(-Dv // BVc))](
        qn, kn, gc, h, vn, o, cs, cl, float(scale), H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, PREC=prec, **_cfg("out"),
    )  # fmt: skip
    if use_l2:
        return o.view(B, T, HV, Dv), final, qn, kn, rq, rk, tm, gc
    return o.view(B, T, HV, Dv), final, q2.new_empty(0), q2.new_empty(0), rq, rk, tm, gc


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
    dt = v.dtype
    v2 = v.reshape(NT, HV, Dv).contiguous()
    b2 = beta.reshape(NT, HV).contiguous()
    if not use_l2:
        qn = q.reshape(NT, H, Dk).to(dt).contiguous()
        kn = k.reshape(NT, H, Dk).to(dt).contiguous()
    plan = _plan_for(cu, n_slots)
    cs, cl, so = plan
    n_seq = so.shape[0] - 1
    BK, BVs, BVc = _blocks(Dk, Dv)
    prec = _prec(dt)
    h0c = None if h0 is None else h0.float().contiguous()
    w, h, vn, _ = _state_pass(kn, v2, b2, gc, tm, h0c, plan, n_slots, H, False)
    do2 = do.reshape(NT, HV, Dv).to(dt).contiguous()
    dvb = torch.empty(NT, HV, Dv, dtype=dt, device=q.device)
    kern.dv_local[(n_slots, HV)](
        qn, kn, gc, do2, dvb, cs, cl, float(scale), H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, NV=-(-Dv // BVc), PREC=prec, **_cfg("dv_local"),
    )  # fmt: skip
    dh = torch.empty(n_slots, HV, Dk, Dv, dtype=dt, device=q.device)
    dh0 = torch.empty(n_seq if need_dh0 else 0, HV, Dk, Dv, dtype=torch.float32, device=q.device)
    dhtc = None if dht is None else dht.float().contiguous()
    kern.dstate[(n_seq * HV, -(-Dv // BVs))](
        qn, kn, w, gc, do2, dvb, dh, dhtc if dhtc is not None else dh0, dh0, so, cs, cl,
        float(scale), H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVs, HAS_DHT=dhtc is not None, STORE_DH0=need_dh0, PREC=prec, INTERP=_interpreting(), **_cfg("dstate"),
    )  # fmt: skip
    del w
    dqh = torch.empty(NT, HV, Dk, dtype=torch.float32, device=q.device)
    dkh = torch.empty_like(dqh)
    dw = torch.empty_like(dqh)
    dg = torch.empty(NT, HV, dtype=torch.float32, device=q.device)
    kern.dqkwg[(n_slots, HV)](
        qn, kn, gc, h, dh, vn, dvb, do2, dqh, dkh, dw, dg, cs, cl, float(scale), H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, NV=-(-Dv // BVc), PREC=prec, **_cfg("dqkwg"),
    )  # fmt: skip
    del h, dh, vn
    dv = torch.empty(NT, HV, Dv, dtype=v.dtype, device=q.device)
    db = torch.empty(NT, HV, dtype=beta.dtype, device=q.device)
    kern.wy_bwd[(n_slots, HV)](
        kn, v2, b2, gc, tm, dw, dvb, dkh, dv, db, dg, cs, cl, H, HV, HV // H, Dk, Dv,
        BT=CHUNK, BK=BK, BV=BVc, NV=-(-Dv // BVc), PREC=prec, **_cfg("wy_bwd"),
    )  # fmt: skip
    rep = HV // H
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
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Forward: ``(o, final, q_hat, k_hat, 1/|q|, 1/|k|, T, G)`` (see :func:`_fwd_impl`)."""
    return _fwd_impl(q, k, v, g, beta, h0, cu, n_slots, scale, use_l2)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, h0, cu, n_slots, scale, use_l2):  # type: ignore[no-untyped-def]
    B, T, H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    NT = B * T
    n_seq = cu.shape[0] - 1
    f32 = torch.float32
    nl = NT if use_l2 else 0
    return (
        v.new_empty(B, T, HV, Dv),
        v.new_empty(n_seq, HV, Dk, Dv, dtype=f32),
        v.new_empty(nl, H, Dk) if use_l2 else v.new_empty(0),
        v.new_empty(nl, H, Dk) if use_l2 else v.new_empty(0),
        v.new_empty(nl * H, dtype=f32),
        v.new_empty(nl * H, dtype=f32),
        v.new_empty(NT, HV, CHUNK, dtype=f32),
        v.new_empty(NT, HV, dtype=f32),
    )


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
    do: torch.Tensor,
    dht: torch.Tensor | None,
    n_slots: int,
    scale: float,
    use_l2: bool,
    need_dh0: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, dg, dbeta, d_initial_state)`` (see :func:`_bwd_impl`)."""
    return _bwd_impl(
        q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc, do, dht, n_slots, scale, use_l2, need_dh0
    )


@_bwd_op.register_fake
def _bwd_fake(q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc, do, dht, n_slots, scale, use_l2, need_dh0):  # type: ignore[no-untyped-def]
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o, final, qn, kn, rq, rk, tm, gc = torch.ops.olmo_attn.gdn_chunk_fwd(
            q, k, v, g, beta, h0, cu, n_slots, scale, use_l2
        )
        ctx.save_for_backward(q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc)
        ctx.args = (n_slots, scale, use_l2)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, do: torch.Tensor | None, dfinal: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc = ctx.saved_tensors
        n_slots, scale, use_l2 = ctx.args
        if do is None:
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dg, db, dh0 = torch.ops.olmo_attn.gdn_chunk_bwd(
            q, k, v, g, beta, h0, cu, qn, kn, rq, rk, tm, gc, do, dfinal, n_slots, scale, use_l2, need_dh0
        )
        return dq, dk, dv, dg, db, (dh0.to(h0.dtype) if need_dh0 else None), None, None, None, None


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
    o, final = _ChunkFn.apply(q, k, v, g, beta, initial_state, cu, n_slots, scale, bool(use_qk_l2norm))
    return o, (final if output_final_state else None)
