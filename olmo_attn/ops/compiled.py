"""The torch backend's masked kernels as opaque ``torch.library`` custom ops, for ``torch.compile``.

The blockwise kernel plans its loops on the host (``BlockPlan.build`` reads the tile classes), and
document offsets / KV-cache positions are data. Traced by Dynamo, either breaks the graph or, once
specialised, recompiles for every new document layout or decode step. While ``torch.compile``
traces, the backend calls these ops instead: Dynamo sees one op whose output shapes depend only on
the input shapes (``register_fake``), and every host read happens inside the op when it runs.

* ``olmo_attn::torch_attn_fwd`` / ``_bwd``: dense or varlen attention (causal, window,
  documents, dropout) -> ``(out, lse)``; gradients for ``q, k, v`` (``register_autograd``).
* ``olmo_attn::torch_kv_write``: writes new keys/values into a KV cache at the position held by a
  CPU counter tensor (mutates the cache; raises :class:`~olmo_attn.kv_cache.KVCacheOverflowError`).
* ``olmo_attn::torch_kv_attn_fwd`` / ``_bwd``: attention of new queries over the cache at that
  position; gradients for ``q`` only, as in eager mode.

Each op runs exactly the eager kernels (same masks, same plans, same arithmetic), so a compiled
forward matches the eager one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from . import flex as flex_ops
from .kernel import KernelCall
from .torch_kernel import DEFAULT_BLOCKS, planned_backward, planned_forward, prepare_mask

__all__ = ["kv_cache_attention", "masked_attention"]


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """Record autograd inside a custom op's implementation, which may run with the autograd
    dispatch keys excluded (as in a compiled backward)."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    for name in ("ADInplaceOrView", "AutogradFunctionality", "AutogradOther", "AutogradCPU", "AutogradCUDA"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            ex = ex.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), ex), torch.enable_grad():
        yield


_PLAIN_EXCLUDE: dict[int, Any] = {}


def _plain_exclude_set(ex: Any) -> Any:
    """``ex`` less every key Python can name except the autograd and autocast ones, which is what a
    plain call of a custom op excludes (cached per set; few distinct ones occur)."""
    raw = ex.raw_repr()
    plain = _PLAIN_EXCLUDE.get(raw)
    if plain is None:
        plain = ex
        for name, key in torch._C.DispatchKey.__members__.items():
            if not name.startswith(("Autograd", "Autocast")):
                plain = plain.remove(key)  # a functionality bit (alias keys: none)
        _PLAIN_EXCLUDE[raw] = plain
    return plain


@contextlib.contextmanager
def _plain_dispatch() -> Iterator[None]:
    """Run a custom op's kernels with the dispatch keys of a plain eager call.

    An op entered through a ``TorchDispatchMode`` runs with every key above ``Python`` excluded,
    functorch's too. AOTAutograd runs a compiled graph's first call under one (its custom-op
    aliasing check), so this is every compiled model's first step. ``torch.vmap`` then hands
    ``BatchedTensor`` objects straight to the device kernels ("Cannot access storage of
    BatchedTensorImpl": ``BlockMask.from_kv_blocks`` and eager FlexAttention's ``mask_mod`` are
    vmapped), and the nested ``torch.compile`` of FlexAttention falls back to that eager path.
    Autograd and autocast stay excluded as they were."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    plain = _plain_exclude_set(ex)
    if plain.raw_repr() == ex.raw_repr():
        yield
        return
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), plain):
        yield


def _dense(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous copies where needed: the fakes promise contiguous outputs (same values)."""
    return tuple(t.contiguous() for t in ts)


def _empty(t: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous fake output on ``t``'s device (``t``'s shape and dtype by default)."""
    return torch.empty(shape or t.shape, dtype=dtype or t.dtype, device=t.device)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _seed(seed: torch.Tensor | None) -> int | None:
    return None if seed is None else int(seed.reshape(-1)[0])


def _impl(q4: torch.Tensor, dropout_p: float) -> str:
    """The kernel :func:`~.torch_kernel.attend` picks for these inputs (flex or blockwise)."""
    return "flex" if flex_ops.flex_supported(q4, dropout_p) else "blockwise"


def _make_call(
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    dropout_p: float,
) -> KernelCall:
    from ..masks import _host_values

    hq = None if cu_q is None else _host_values(cu_q)
    hk = None if cu_k is None else _host_values(cu_k)
    return KernelCall(
        scale=scale,
        causal=causal,
        window=(window_left, window_right),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k if cu_k is not None else cu_q,
        cu_seqlens_q_host=hq,
        cu_seqlens_k_host=hk if hk is not None else hq,
        dropout_p=dropout_p,
        dropout_seed=_seed(seed),
    )


def _plan(
    q4: torch.Tensor, k4: torch.Tensor, call: KernelCall, impl: str, **geometry: Any
) -> tuple[Any, Any]:
    full = {"q_start": None, "key_lo": None, "key_hi": None, **geometry}
    return prepare_mask(q4, k4, call, kind=impl, blocks=DEFAULT_BLOCKS, **full)


def _run_forward(
    q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, call: KernelCall, **geometry: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(q4, call.dropout_p)
    with _plain_dispatch():
        index, plan = _plan(q4, k4, call, impl, **geometry)
        return planned_forward(q4, k4, v4, index, plan, impl, call)


def _run_backward(
    dout: torch.Tensor,
    q4: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: KernelCall,
    **geometry: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(q4, call.dropout_p)
    with _plain_dispatch():
        index, plan = _plan(q4, k4, call, impl, **geometry)
        # flex recomputes with autograd: record it also inside a compiled backward
        return planned_backward(
            dout, q4, k4, v4, out, lse, index, plan, impl, call, flex_context=_autograd_on
        )


# ----- dense / varlen -------------------------------------------------------------------------
@torch.library.custom_op("olmo_attn::torch_attn_fwd", mutates_args=())
def _attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``q [B, Tq, Hq, D]`` -> ``(out, lse [B, Hq, Tq])``; varlen (``cu_q`` given)
    ``q [total_q, Hq, D]`` -> ``(out, lse [Hq, total_q])``."""
    call = _make_call(cu_q, cu_k, seed, scale, causal, window_left, window_right, dropout_p)
    if cu_q is None:
        return _dense(*_run_forward(q, k, v, call))
    out, lse = _run_forward(q[None], k[None], v[None], call)
    return _dense(out[0], lse[0])


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, cu_q, cu_k, seed, scale, causal, window_left, window_right, dropout_p):  # type: ignore[no-untyped-def]
    if cu_q is None:
        B, Tq, Hq, _ = q.shape
        return _empty(q), _empty(q, B, Hq, Tq, dtype=_lse_dtype(q))
    total, Hq, _ = q.shape
    return _empty(q), _empty(q, Hq, total, dtype=_lse_dtype(q))


@torch.library.custom_op("olmo_attn::torch_attn_bwd", mutates_args=())
def _attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` of :func:`_attn_fwd` given its ``out`` and ``lse``."""
    call = _make_call(cu_q, cu_k, seed, scale, causal, window_left, window_right, dropout_p)
    if cu_q is None:
        return _dense(*_run_backward(dout, q, k, v, out, lse, call))
    dq, dk, dv = _run_backward(dout[None], q[None], k[None], v[None], out[None], lse[None], call)
    return _dense(dq[0], dk[0], dv[0])


@_attn_bwd.register_fake
def _attn_bwd_fake(
    dout, q, k, v, out, lse, cu_q, cu_k, seed, scale, causal, window_left, window_right, dropout_p
):  # type: ignore[no-untyped-def]
    return _empty(q), _empty(k), _empty(v)


def _attn_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cu_q, cu_k, seed, *opts = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.opts = opts


def _attn_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = _attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, seed, *ctx.opts)
    return (dq, dk, dv) + (None,) * 8


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: KernelCall,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~.torch_kernel.attend` (dense or varlen, no KV cache) through ``olmo_attn::torch_attn_fwd``.

    ``call``'s host offsets are ignored (the op reads the offsets when it runs); ``seed``: the
    dropout seed as a tensor (drawn in the graph), needed when ``call.dropout_p > 0``.
    """
    cu_k = call.cu_seqlens_k
    if cu_k is call.cu_seqlens_q:
        cu_k = None
    left, right = (int(w) for w in call.window)
    out, _ = _attn_fwd(
        q,
        k,
        v,
        call.cu_seqlens_q,
        cu_k,
        seed,
        float(call.scale),
        bool(call.causal),
        left,
        right,
        float(call.dropout_p),
    )
    return out


# ----- KV cache -------------------------------------------------------------------------------
@torch.library.custom_op("olmo_attn::torch_kv_write", mutates_args=("k_cache", "v_cache"))
def _kv_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    leftpad: torch.Tensor,
    position: torch.Tensor,
) -> None:
    """Write ``k_new, v_new [B, T_new, Hkv, D]`` at cache index ``position`` (a CPU counter) onwards,
    except below a row's left padding; raise ``KVCacheOverflowError`` past the cache's end."""
    start, n, capacity = int(position), k_new.shape[1], k_cache.shape[1]
    if start + n > capacity:
        from ..kv_cache import KVCacheOverflowError

        raise KVCacheOverflowError(
            f"KV cache overflow: writing {n} token(s) at position {start} exceeds max_seq_len={capacity}; "
            f"allocate a larger cache with reset(batch_size={k_cache.shape[0]}, max_seq_len={start + n}) "
            "(or Attention.init_kv_cache_manager)"
        )
    pos = torch.arange(start, start + n, device=k_cache.device)
    write = (pos[None, :] >= leftpad[:, None].to(torch.int64))[..., None, None]  # [B, T_new, 1, 1]
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        dst = cache[:, start : start + n]
        dst.copy_(torch.where(write, new.to(cache.dtype), dst))


@_kv_write.register_fake
def _kv_write_fake(k_cache, v_cache, k_new, v_new, leftpad, position):  # type: ignore[no-untyped-def]
    return None


def _visible_cache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, leftpad: torch.Tensor, used: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as the eager path attends over it: the used prefix on CPU (the whole cache on
    CUDA), slots no query may see set to zero, in ``q``'s dtype."""
    if q.is_cuda:
        kc, vc = k_cache, v_cache
    else:
        kc, vc = k_cache[:, :used], v_cache[:, :used]
    j = torch.arange(kc.shape[1], device=kc.device)
    visible = ((j[None, :] >= leftpad[:, None].to(j.dtype)) & (j[None, :] < used))[..., None, None]
    return torch.where(visible, kc, 0).to(q.dtype), torch.where(visible, vc, 0).to(q.dtype)


@torch.library.custom_op("olmo_attn::torch_kv_attn_fwd", mutates_args=())
def _kv_attn_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    leftpad: torch.Tensor,
    position: torch.Tensor,
    seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [B, T_new, Hq, D]`` at cache index ``position`` (CPU counter) over the cache ->
    ``(out [B, T_new, Hq, D], lse [B, Hq, T_new], start)``; query ``t`` sees
    ``leftpad[b] <= j <= position + t``. ``start`` is a copy of ``position`` made here, for the
    backward: the caller advances the counter right after this call, and a copy made in the graph
    could be recomputed (from the advanced counter) in the backward graph."""
    start = int(position)
    used = start + q.shape[1]
    kc, vc = _visible_cache(q, k_cache, v_cache, leftpad, used)
    call = _make_call(None, None, seed, scale, True, window_left, window_right, dropout_p)
    out, lse = _dense(*_run_forward(q, kc, vc, call, q_start=start, key_lo=leftpad, key_hi=used))
    return out, lse, position.clone()


@_kv_attn_fwd.register_fake
def _kv_attn_fwd_fake(
    q, k_cache, v_cache, leftpad, position, seed, scale, window_left, window_right, dropout_p
):  # type: ignore[no-untyped-def]
    B, T, Hq, _ = q.shape
    return _empty(q), _empty(q, B, Hq, T, dtype=_lse_dtype(q)), torch.empty_like(position)


@torch.library.custom_op("olmo_attn::torch_kv_attn_bwd", mutates_args=())
def _kv_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    leftpad: torch.Tensor,
    position: torch.Tensor,
    seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
) -> torch.Tensor:
    """``dq`` of :func:`_kv_attn_fwd` (the cache holds detached copies: no ``dk, dv``)."""
    start = int(position)
    used = start + q.shape[1]
    kc, vc = _visible_cache(q, k_cache, v_cache, leftpad, used)
    call = _make_call(None, None, seed, scale, True, window_left, window_right, dropout_p)
    dq, _, _ = _run_backward(dout, q, kc, vc, out, lse, call, q_start=start, key_lo=leftpad, key_hi=used)
    return dq.contiguous()


@_kv_attn_bwd.register_fake
def _kv_attn_bwd_fake(
    dout, q, out, lse, k_cache, v_cache, leftpad, position, seed, scale, window_left, window_right, dropout_p
):  # type: ignore[no-untyped-def]
    return _empty(q)


def _kv_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k_cache, v_cache, leftpad, _position, seed, *opts = inputs
    out, lse, start = output
    # the backward reads the cache prefix [leftpad, start + T_new): later decode steps write
    # only past it (zero_cache() / reset() between forward and backward would not be seen)
    ctx.save_for_backward(q, out, lse, k_cache, v_cache, leftpad, start, seed)
    ctx.opts = opts


def _kv_backward(ctx: Any, dout: torch.Tensor, _dlse: Any, _dstart: Any) -> tuple[Any, ...]:
    q, out, lse, k_cache, v_cache, leftpad, position, seed = ctx.saved_tensors
    dq = _kv_attn_bwd(dout, q, out, lse, k_cache, v_cache, leftpad, position, seed, *ctx.opts)
    return (dq,) + (None,) * 9


_kv_attn_fwd.register_autograd(_kv_backward, setup_context=_kv_setup)


def kv_cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    leftpad: torch.Tensor,
    position: torch.Tensor,
    call: KernelCall,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``k, v`` into the cache at ``position`` (a CPU int64 counter, not advanced here) and
    attend ``q`` over it: the eager KV-cache path as two custom ops."""
    _kv_write(k_cache, v_cache, k.detach(), v.detach(), leftpad, position)
    left, right = (int(w) for w in call.window)
    out, _, _ = _kv_attn_fwd(
        q, k_cache, v_cache, leftpad, position, seed, float(call.scale), left, right, float(call.dropout_p)
    )
    return out


def draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A dropout seed as a 1-element int64 tensor (drawn inside a compiled graph, no host read)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
