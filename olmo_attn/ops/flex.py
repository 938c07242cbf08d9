"""FlexAttention path (CUDA): windows, documents and KV cache without any T×T mask.

The ``BlockMask`` comes straight from :func:`~.masking.classify_blocks` through
``BlockMask.from_kv_blocks`` (partial and full tiles listed separately, so FlexAttention skips the
``mask_mod`` on full tiles and every empty tile); the ``mask_mod`` compares the O(T) index vectors
of :class:`~.masking.MaskIndex`. ``flex_attention`` is compiled once (``dynamic=False``) and
PyTorch's compile cache keeps one kernel per shape and mask configuration.

Forward returns the natural-log LSE; gradients flow through both the output and the LSE, which
:func:`flex_kernel_backward` uses to give ring attention its per-block share of the gradient.
On CPU FlexAttention has no backward (and runs unfused when not compiled), so the CPU path is the
blockwise kernel; the uncompiled CPU forward here exists for tests of the block mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .masking import FULL, PARTIAL, MaskIndex, classify_blocks

FLEX_BLOCK = 128  # FlexAttention's default sparse block size (both sides)
_MIN_RECOMPILE_LIMIT = 64  # one compiled kernel per (shape, dtype, mask kind) in a model
_compiled: Callable[..., Any] | None = None


def flex_supported(q: torch.Tensor, dropout_p: float) -> bool:
    """FlexAttention runs this on the GPU: CUDA, fp16/bf16/fp32, power-of-two head dim >= 16, no dropout."""
    d = q.shape[-1]
    return (
        q.is_cuda
        and dropout_p == 0.0
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and d >= 16
        and (d & (d - 1)) == 0
    )


def flex_attention_fn() -> Callable[..., Any]:
    """PyTorch's ``flex_attention`` (uncompiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _flex_fn(device: torch.device) -> Callable[..., Any]:
    """Compiled ``flex_attention`` on CUDA (compiled once, cached per shape by torch.compile)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # unfused reference implementation (tests only)
    global _compiled
    if _compiled is None:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < _MIN_RECOMPILE_LIMIT:
                setattr(dynamo_config, name, _MIN_RECOMPILE_LIMIT)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _call_flex(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; when ``fn`` is the compiled FlexAttention and a new configuration
    would exceed ``torch._dynamo.config.recompile_limit``, a :class:`CompileLimitWarning` and the
    uncompiled FlexAttention (same math) instead of PyTorch's silent eager fallback."""
    if fn is not _compiled or torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    import torch._dynamo.config as dynamo_config
    import torch._dynamo.exc as dynamo_exc

    limit_hit = getattr(dynamo_exc, "FailOnRecompileLimitHit", None)
    # a PyTorch without the switch, or one told to suppress errors (incompatible with it): as is
    if (
        limit_hit is None
        or not hasattr(dynamo_config, "fail_on_recompile_limit_hit")
        or getattr(dynamo_config, "suppress_errors", False)
    ):
        return fn(*args, **kwargs)
    try:
        with dynamo_config.patch(fail_on_recompile_limit_hit=True):
            return fn(*args, **kwargs)
    except limit_hit:
        import warnings

        from ..exceptions import CompileLimitWarning

        warnings.warn(
            "FlexAttention reached torch._dynamo.config.recompile_limit "
            f"({dynamo_config.recompile_limit} compiled configurations of shape, dtype, mask and global "
            "state such as grad mode or deterministic mode); this call runs FlexAttention uncompiled "
            "(same math, much slower, Tq x Tk scores in memory). Raise torch._dynamo.config.recompile_limit "
            "(and accumulated_recompile_limit), or call torch._dynamo.reset() between unrelated models",
            CompileLimitWarning,
            stacklevel=3,
        )
        return flex_attention_fn()(*args, **kwargs)


def _pad(x: torch.Tensor, n: int, value: int) -> torch.Tensor:
    """Right-pad ``x [B, T]`` to ``[B, n]`` (the mask_mod may read indices up to the block edge)."""
    if x.shape[1] == n:
        return x.contiguous()
    return torch.nn.functional.pad(x, (0, n - x.shape[1]), value=value)


def make_mask_mod(index: MaskIndex) -> Callable[..., torch.Tensor]:
    """``mask_mod(b, h, q_idx, kv_idx)`` implementing :meth:`MaskIndex.element_mask` over padded vectors."""
    nq = -(-index.tq // FLEX_BLOCK) * FLEX_BLOCK
    nk = -(-index.tk // FLEX_BLOCK) * FLEX_BLOCK
    q_coord = _pad(index.q_coord, nq, 0)
    q_seg = _pad(index.q_seg, nq, -1)
    k_seg = _pad(index.k_seg, nk, -1)
    per_row_q, per_row_k = q_coord.shape[0] > 1, k_seg.shape[0] > 1
    q_coord0, q_seg0, k_seg0 = q_coord[0], q_seg[0], k_seg[0]
    causal = index.causal
    left, right = index.window

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qc = q_coord[b, q_idx] if per_row_q else q_coord0[q_idx]
        qs = q_seg[b, q_idx] if per_row_q else q_seg0[q_idx]
        ks = k_seg[b, kv_idx] if per_row_k else k_seg0[kv_idx]
        m = (qs == ks) & (qs >= 0)
        if causal:
            m = m & (kv_idx <= qc)
        if left >= 0:
            m = m & (kv_idx >= qc - left)
        if right >= 0:
            m = m & (kv_idx <= qc + right)
        return m

    return mask_mod


def build_block_mask(index: MaskIndex) -> Any:
    """A FlexAttention ``BlockMask`` for ``index`` (batch extent ``index.batch``, broadcast over heads)."""
    from torch.nn.attention.flex_attention import BlockMask

    cls = classify_blocks(index, FLEX_BLOCK, FLEX_BLOCK).clone()  # [Bm, nq, nk]
    # ragged edge tiles run the mask_mod (whose padded vectors hide out-of-range rows/keys) rather
    # than relying on the kernel's own bounds handling inside "full" tiles
    if index.tq % FLEX_BLOCK:
        cls[:, -1] = torch.where(cls[:, -1] == FULL, PARTIAL, cls[:, -1])
    if index.tk % FLEX_BLOCK:
        cls[:, :, -1] = torch.where(cls[:, :, -1] == FULL, PARTIAL, cls[:, :, -1])

    def listing(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel.sum(dim=-1, dtype=torch.int32)[:, None]  # [Bm, 1, nq]
        # selected tiles first, in ascending key order (stable sort on "not selected")
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return num.contiguous(), idx.contiguous()

    kv_num, kv_idx = listing(cls == PARTIAL)
    full_num, full_idx = listing(cls == FULL)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=make_mask_mod(index),
        seq_lengths=(index.tq, index.tk),
    )


def flex_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]`` (float32).

    Records autograd when inputs require grad (CUDA only). Rows with no visible key: out 0, lse -inf.
    """
    fn = _flex_fn(q.device)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    # Inductor picks its flex *decoding* kernel for queries shorter than 128; on an H200 with
    # torch 2.11 that kernel failed to lower (NoValidChoicesError) for grouped / single KV heads
    # at several head dims. The main kernel handles every length.
    opts = {"FORCE_USE_FLEX_ATTENTION": True} if q.is_cuda else None
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older PyTorch: return_lse
        out, lse = _call_flex(
            fn,
            qh,
            kh,
            vh,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=gqa,
            return_lse=True,
            kernel_options=opts,
        )
    else:
        out, aux = _call_flex(
            fn,
            qh,
            kh,
            vh,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=gqa,
            return_aux=AuxRequest(lse=True),
            kernel_options=opts,
        )
        lse = aux.lse
    return out.transpose(1, 2), lse


def flex_kernel_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_mask: Any,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of ``dq, dk, dv`` given the final (possibly merged) ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``.

    Recomputes ``o_blk, lse_blk`` with autograd and back-propagates ``grad_o = w·dout`` and
    ``grad_lse = w·(rowsum(dout ∘ o_blk) - rowsum(dout ∘ out))`` with ``w = exp(lse_blk - lse)``,
    the derivative of the LSE merge ``out = Σ_blocks exp(lse_b - lse)·o_b``.
    """
    with torch.enable_grad():
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        o_blk, lse_blk = flex_forward(qg, kg, vg, block_mask, scale=scale)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse_f = lse.to(acc)
        w = torch.where(lse_f == -math.inf, 0.0, torch.exp(lse_blk.detach().to(acc) - lse_f))  # [B, Hq, Tq]
        d_f = dout.to(acc)
        row_blk = (d_f * o_blk.detach().to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, Tq]
        row_all = (d_f * out.to(acc)).sum(-1).transpose(1, 2)
        grad_o = (w.transpose(1, 2)[..., None] * d_f).to(o_blk.dtype)
        grad_lse = w * (row_blk - row_all)
        dq, dk, dv = torch.autograd.grad((o_blk, lse_blk), (qg, kg, vg), (grad_o, grad_lse.to(lse_blk.dtype)))
    return dq, dk, dv
