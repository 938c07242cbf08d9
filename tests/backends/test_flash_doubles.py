"""Recording doubles of flash-attn 2, FlashAttention-3, flash-attn-4 and Transformer Engine.

Each double has the real function's signature (parameter names and defaults as in flash-attn 2.8.3,
its ``hopper/flash_attn_interface.py``, flash-attn-4 4.0.0b36 and TE's ``DotProductAttention``),
records every call, and computes what the library computes — in float64 from the reference
(``reference.twins``) with the library's own conventions (windows, bottom-right causal alignment,
``cu_seqlens`` / ``seqused_k`` semantics, FA2/FA3's ``lse = +inf`` for rows without keys, FA4's
``None`` windows and its causal/local resolution). A wrong argument name fails with ``TypeError``;
a wrong value gives a wrong number. The tests at the bottom check the doubles themselves against
the reference, so the adapter tests in ``test_flash2/3/4.py`` and ``test_te.py`` can trust them.

``install_*`` put the fake modules into ``sys.modules``, pretend the device is a CUDA GPU of the
given compute capability, and clear ``olmo_attn.hardware``'s caches.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from olmo_attn import hardware
from reference import twins
from reference.attention import allowed_mask

F64 = torch.float64


# ----- recording -------------------------------------------------------------------------------------
@dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict

    def arg(self, index: int, name: str) -> Any:
        """Argument ``name`` (given by keyword, or positionally at ``index``)."""
        return self.kwargs[name] if name in self.kwargs else self.args[index]


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)

    def add(self, name: str, args: tuple, kwargs: dict) -> None:
        """Record a call; ``kwargs`` is usually the double's ``locals()`` (every parameter by name)."""
        skip = ("self", "__class__", "rec")
        self.calls.append(Call(name, args, {k: v for k, v in kwargs.items() if k not in skip}))

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def only(self, name: str) -> Call:
        hits = [c for c in self.calls if c.name == name]
        assert len(hits) == 1, f"expected one call of {name}, got {self.names()}"
        return hits[0]


# ----- the math the libraries compute ---------------------------------------------------------------------
def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, window: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment: ``q [Lq, Hq, D]``, ``k, v [Lk, Hkv, D]`` -> ``out [Lq, Hq, D]`` f64, ``lse [Hq, Lq]``."""
    out, lse = twins.attention(
        q.to(F64)[None], k.to(F64)[None], v.to(F64)[None], scale=scale, causal=causal, window=window
    )
    return out[0], lse[0]


def segment_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash backward of one segment from the *given* ``out`` / ``lse`` (not recomputed).

    ``P = exp(scale q·k - lse)`` on allowed pairs, ``dS = P (dout·vᵀ - rowsum(dout ∘ out))``. Rows with
    ``lse = ±inf`` have ``P = 0``.
    """
    Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[:2]
    rep = Hq // Hkv
    q64, k64, v64 = q.to(F64), k.to(F64).repeat_interleave(rep, 1), v.to(F64).repeat_interleave(rep, 1)
    do64, o64, lse64 = dout.to(F64), out.to(F64), lse.to(F64)  # lse [Hq, Lq]
    allowed = torch.as_tensor(allowed_mask(Lq, Lk, causal=causal, window=window))  # [Lq, Lk]
    s = torch.einsum("ihd,jhd->hij", q64, k64) * scale
    finite = torch.isfinite(lse64)[:, :, None]
    p = torch.where(allowed[None] & finite, torch.exp(s - lse64.nan_to_num(0.0, 0.0, 0.0)[:, :, None]), 0.0)
    dv = torch.einsum("hij,ihd->jhd", p, do64)
    dp = torch.einsum("ihd,jhd->hij", do64, v64)
    delta = (do64 * o64).sum(-1).transpose(0, 1)[:, :, None]  # [Hq, Lq, 1]
    ds = p * (dp - delta)
    dq = torch.einsum("hij,jhd->ihd", ds, k64) * scale
    dk = torch.einsum("hij,ihd->jhd", ds, q64) * scale
    # GQA: sum the gradients of the query heads that share a kv head
    dk = dk.view(Lk, Hkv, rep, D).sum(2)
    dv = dv.view(Lk, Hkv, rep, D).sum(2)
    return dq, dk, dv


def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = [int(x) for x in cu.tolist()]
    return list(itertools.pairwise(c))


def library_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    causal: bool,
    window: tuple[int, int],
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    empty_lse: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[B, T, H, D]`` or varlen ``[total, H, D]`` attention as the flash libraries define it.

    Varlen segment ``b``: queries ``cu_q[b]:cu_q[b+1]``, keys ``cu_k[b] : cu_k[b] + n_b`` with
    ``n_b = seqused_k[b]`` if given, else ``cu_k[b+1] - cu_k[b]``. ``lse`` rows without a visible key
    are set to ``empty_lse`` (``+inf`` in FA2/FA3, ``-inf`` in FA4). Output in ``q.dtype``, lse f32.
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_q is None:
        outs, lses = zip(
            *(
                segment_attention(q[b], k[b], v[b], scale=scale, causal=causal, window=window)
                for b in range(q.shape[0])
            )
        )
        out, lse = torch.stack(outs), torch.stack(lses)  # [B, Tq, H, D], [B, H, Tq]
    else:
        assert cu_seqlens_k is not None
        out = torch.zeros(q.shape, dtype=F64)
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=F64)
        qs, ks = _segments(cu_seqlens_q), _segments(cu_seqlens_k)
        for b, ((q0, q1), (k0, k1)) in enumerate(zip(qs, ks)):
            k1 = k0 + int(seqused_k[b]) if seqused_k is not None else k1
            if q1 == q0:
                continue
            o, s = segment_attention(q[q0:q1], k[k0:k1], v[k0:k1], scale=scale, causal=causal, window=window)
            out[q0:q1], lse[:, q0:q1] = o, s
    lse = lse.masked_fill(torch.isneginf(lse), empty_lse)
    return out.to(q.dtype), lse.float()


def library_backward(
    dout, q, k, v, out, lse, *, scale, causal, window, cu_seqlens_q=None, cu_seqlens_k=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash backward for dense or varlen inputs (see :func:`segment_backward`)."""
    if cu_seqlens_q is None:
        parts = [
            segment_backward(
                dout[b], q[b], k[b], v[b], out[b], lse[b], scale=scale, causal=causal, window=window
            )
            for b in range(q.shape[0])
        ]
        return tuple(torch.stack(g).to(q.dtype) for g in zip(*parts))  # type: ignore[return-value]
    dq, dk, dv = (
        torch.zeros(q.shape, dtype=F64),
        torch.zeros(k.shape, dtype=F64),
        torch.zeros(v.shape, dtype=F64),
    )
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k)):
        g = segment_backward(
            dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1],
            scale=scale, causal=causal, window=window,
        )  # fmt: skip
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kvcache_attention(
    q, k_cache, v_cache, k, v, *, cache_seqlens, cache_leftpad, scale, causal, window
) -> torch.Tensor:
    """flash_attn_with_kvcache semantics (FA2/FA3): write ``k, v`` at ``cache_seqlens``, attend to
    ``[leftpad[b], cache_seqlens[b] + T_new)`` with bottom-right alignment."""
    B, T = q.shape[:2]
    seq = (
        torch.full((B,), cache_seqlens, dtype=torch.int32)
        if isinstance(cache_seqlens, int)
        else cache_seqlens
    )
    lp = torch.zeros(B, dtype=torch.int32) if cache_leftpad is None else cache_leftpad
    out = torch.zeros(q.shape, dtype=F64)
    for b in range(B):
        s = int(seq[b])
        if k is not None:
            k_cache[b, s : s + T] = k[b]
            v_cache[b, s : s + T] = v[b]
        lo, hi = int(lp[b]), s + T
        o, _ = segment_attention(
            q[b], k_cache[b, lo:hi], v_cache[b, lo:hi], scale=scale, causal=causal, window=window
        )
        out[b] = o
    return out.to(q.dtype)


# ----- fake devices and modules ---------------------------------------------------------------------
def fake_cuda(monkeypatch: pytest.MonkeyPatch, sm: tuple[int, int] = (9, 0), name: str = "Fake H100") -> None:
    """Make ``olmo_attn.hardware`` report a CUDA device of compute capability ``sm``."""
    info = hardware.DeviceInfo("cuda", name, sm)

    @functools.cache
    def device_info(device: str | None = None) -> hardware.DeviceInfo:
        return info

    monkeypatch.setattr(hardware, "device_info", device_info)
    hardware.clear_caches()


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _install(monkeypatch: pytest.MonkeyPatch, modules: dict[str, types.ModuleType]) -> None:
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
        parent, _, child = name.rpartition(".")
        if parent and parent in modules:
            monkeypatch.setattr(modules[parent], child, mod, raising=False)
    hardware.clear_caches()


def _fa2_mask(causal: bool, window_size) -> tuple[bool, tuple[int, int]]:
    """FA2/FA3 window rules: ints, ``-1`` = unbounded, ``causal=True`` forces ``right = 0``."""
    left, right = (int(w) for w in window_size)
    assert left >= -1 and right >= -1, f"flash-attn 2/3 windows are ints >= -1, got {window_size}"
    return causal, (left, 0 if causal else right)


def install_flash2(monkeypatch: pytest.MonkeyPatch, rec: Recorder, version: str = "2.8.3") -> None:
    """Fake ``flash_attn`` (2.8.3) with ``flash_attn.flash_attn_interface``."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
        rec.add("flash_attn_func", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        return library_attention(q, k, v, scale=softmax_scale, causal=c, window=w)[0]

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False,
                               block_table=None):  # fmt: skip
        rec.add("flash_attn_varlen_func", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        return library_attention(
            q,
            k,
            v,
            scale=softmax_scale,
            causal=c,
            window=w,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
        )[0]

    def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                  softcap=0.0, alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False):  # fmt: skip
        rec.add("flash_attn_qkvpacked_func", (qkv,), locals())
        q, k, v = qkv.unbind(2)
        c, w = _fa2_mask(causal, window_size)
        return library_attention(q, k, v, scale=softmax_scale, causal=c, window=w)[0]

    def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                         causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                         deterministic=False, return_attn_probs=False):  # fmt: skip
        rec.add("flash_attn_varlen_qkvpacked_func", (qkv,), locals())
        q, k, v = qkv.unbind(1)
        c, w = _fa2_mask(causal, window_size)
        return library_attention(
            q, k, v, scale=softmax_scale, causal=c, window=w, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens
        )[0]

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                return_softmax_lse=False):  # fmt: skip
        rec.add("flash_attn_with_kvcache", (q,), locals())
        c, w = _fa2_mask(causal, window_size)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        return kvcache_attention(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
            scale=scale, causal=c, window=w,
        )  # fmt: skip

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                            softcap, alibi_slopes, return_softmax):  # fmt: skip
        rec.add("_wrapped_flash_attn_forward", (q, k, v), locals())
        c, w = _fa2_mask(causal, (window_size_left, window_size_right))
        out, lse = library_attention(q, k, v, scale=softmax_scale, causal=c, window=w)
        return out, lse, None, torch.tensor([0, 0], dtype=torch.int64)

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                                   alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                                   seqused_k=None, zero_tensors=False):  # fmt: skip
        rec.add("_wrapped_flash_attn_varlen_forward", (q, k, v), locals())
        c, w = _fa2_mask(causal, (window_size_left, window_size_right))
        out, lse = library_attention(
            q,
            k,
            v,
            scale=softmax_scale,
            causal=c,
            window=w,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
        )
        return out, lse, None, torch.tensor([0, 0], dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):  # fmt: skip
        rec.add("_wrapped_flash_attn_backward", (dout, q, k, v, out, softmax_lse), locals())
        c, w = _fa2_mask(causal, (window_size_left, window_size_right))
        g = library_backward(dout, q, k, v, out, softmax_lse, scale=softmax_scale, causal=c, window=w)
        for dst, src in zip((dq, dk, dv), g):
            dst.copy_(src)
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                    window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                    rng_state=None, zero_tensors=False):  # fmt: skip
        rec.add("_wrapped_flash_attn_varlen_backward", (dout, q, k, v, out, softmax_lse), locals())
        c, w = _fa2_mask(causal, (window_size_left, window_size_right))
        g = library_backward(
            dout, q, k, v, out, softmax_lse, scale=softmax_scale, causal=c, window=w,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
        for dst, src in zip((dq, dk, dv), g):
            dst.copy_(src)
        return torch.zeros(q.shape[1], q.shape[0])

    public = {
        "flash_attn_func": flash_attn_func,
        "flash_attn_varlen_func": flash_attn_varlen_func,
        "flash_attn_qkvpacked_func": flash_attn_qkvpacked_func,
        "flash_attn_varlen_qkvpacked_func": flash_attn_varlen_qkvpacked_func,
        "flash_attn_with_kvcache": flash_attn_with_kvcache,
    }
    private = {
        "_wrapped_flash_attn_forward": _flash_attn_forward,
        "_wrapped_flash_attn_varlen_forward": _flash_attn_varlen_forward,
        "_wrapped_flash_attn_backward": _flash_attn_backward,
        "_wrapped_flash_attn_varlen_backward": _flash_attn_varlen_backward,
    }
    pkg = _module("flash_attn", __version__=version, __path__=[], **public)
    iface = _module("flash_attn.flash_attn_interface", **public, **private)
    _install(monkeypatch, {"flash_attn": pkg, "flash_attn.flash_attn_interface": iface})


def install_flash3(
    monkeypatch: pytest.MonkeyPatch,
    rec: Recorder,
    module: str = "flash_attn_interface",
    version: str = "2.8.3",
) -> None:
    """Fake FA3 ``flash_attn_interface``: ``version="2.8.3"`` has flash-attn 2.8.3's ``hopper/``
    signatures; ``"3.0.0"`` those of FA3 3.0.0 (the ``hopper/`` that builds with CUDA 13): the
    private ``_flash_attn_forward`` / ``_backward`` take ``window_size_left`` / ``window_size_right``,
    the forward's output buffer is ``out_``, the backward's causal flag ``is_causal`` and it returns
    ``softmax_d`` only; the public functions gain ``return_attn_probs`` (``(out, lse)`` when true).
    """
    if version not in ("2.8.3", "3.0.0"):
        raise ValueError(f"install_flash3: version {version!r}; the doubles know '2.8.3' and '3.0.0'")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0):  # fmt: skip
        rec.add("flash_attn_func", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        return library_attention(q, k, v, scale=softmax_scale, causal=c, window=w)[0]

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                               sm_margin=0):  # fmt: skip
        rec.add("flash_attn_varlen_func", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        return library_attention(
            q, k, v, scale=softmax_scale, causal=c, window=w, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
        )[0]  # fmt: skip

    def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                                  v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                                  deterministic=False, num_heads_q=None, sm_margin=0):  # fmt: skip
        rec.add("flash_attn_qkvpacked_func", (qkv,), locals())
        q, k, v = qkv.unbind(-3)
        c, w = _fa2_mask(causal, window_size)
        return library_attention(q, k, v, scale=softmax_scale, causal=c, window=w)[0]

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                                cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                                q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                                scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                                return_softmax_lse=False):  # fmt: skip
        rec.add("flash_attn_with_kvcache", (q,), locals())
        c, w = _fa2_mask(causal, window_size)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        return kvcache_attention(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
            scale=scale, causal=c, window=w,
        )  # fmt: skip

    def _flash_attn_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
                            seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx,
                            leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale,
                            softmax_scale, causal, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                            rotary_interleaved=True, scheduler_metadata=None, num_splits=1, pack_gqa=None,
                            sm_margin=0):  # fmt: skip
        rec.add("_flash_attn_forward", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        o, lse = library_attention(
            q,
            k,
            v,
            scale=softmax_scale,
            causal=c,
            window=w,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
        )
        return o, lse, None, None

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                             max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1),
                             softcap=0.0, deterministic=False, sm_margin=0):  # fmt: skip
        rec.add("_flash_attn_backward", (dout, q, k, v, out, softmax_lse), locals())
        c, w = _fa2_mask(causal, window_size)
        g = library_backward(
            dout, q, k, v, out, softmax_lse, scale=softmax_scale, causal=c, window=w,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
        for dst, src in zip((dq, dk, dv), g):
            dst.copy_(src)
        return dq, dk, dv, None

    funcs = {
        "flash_attn_func": flash_attn_func,
        "flash_attn_varlen_func": flash_attn_varlen_func,
        "flash_attn_qkvpacked_func": flash_attn_qkvpacked_func,
        "flash_attn_with_kvcache": flash_attn_with_kvcache,
        "_flash_attn_forward": _flash_attn_forward,
        "_flash_attn_backward": _flash_attn_backward,
    }
    if version == "3.0.0":
        funcs.update(_flash3_v3_funcs(rec))
    mods = {module: _module(module, **funcs)}
    if "." in module:
        mods = {module.split(".")[0]: _module(module.split(".")[0], __path__=[]), **mods}
    _install(monkeypatch, mods)


def _flash3_v3_funcs(rec: Recorder) -> dict[str, Any]:
    """FA3 3.0.0's functions (``hopper/flash_attn_interface.py`` after the move to custom ops)."""

    def _out(result: tuple[torch.Tensor, torch.Tensor], return_attn_probs: bool):
        return result if return_attn_probs else result[0]

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):  # fmt: skip
        rec.add("flash_attn_func", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        return _out(library_attention(q, k, v, scale=softmax_scale, causal=c, window=w), return_attn_probs)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):  # fmt: skip
        rec.add("flash_attn_varlen_func", (q, k, v), locals())
        c, w = _fa2_mask(causal, window_size)
        res = library_attention(
            q, k, v, scale=softmax_scale, causal=c, window=w, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
        )  # fmt: skip
        return _out(res, return_attn_probs)

    def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                                  v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                                  deterministic=False, num_heads_q=None, sm_margin=0,
                                  return_attn_probs=False):  # fmt: skip
        rec.add("flash_attn_qkvpacked_func", (qkv,), locals())
        q, k, v = qkv.unbind(-3)
        c, w = _fa2_mask(causal, window_size)
        return _out(library_attention(q, k, v, scale=softmax_scale, causal=c, window=w), return_attn_probs)

    def _flash_attn_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                            cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None,
                            max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None,
                            leftpad_k=None, rotary_cos=None, rotary_sin=None, seqlens_rotary=None, q_descale=None,
                            k_descale=None, v_descale=None, softmax_scale=None, causal=False, window_size_left=-1,
                            window_size_right=-1, attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):  # fmt: skip
        rec.add("_flash_attn_forward", (q, k, v), locals())
        c, w = _fa2_mask(causal, (window_size_left, window_size_right))
        o, lse = library_attention(
            q,
            k,
            v,
            scale=softmax_scale,
            causal=c,
            window=w,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
        )
        return o, lse, torch.tensor([]), torch.tensor([])

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
                             sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
                             softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1,
                             softcap=0.0, deterministic=False, sm_margin=0):  # fmt: skip
        rec.add("_flash_attn_backward", (dout, q, k, v, out, softmax_lse), locals())
        c, w = _fa2_mask(is_causal, (window_size_left, window_size_right))
        g = library_backward(
            dout, q, k, v, out, softmax_lse, scale=softmax_scale, causal=c, window=w,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
        for dst, src in zip((dq, dk, dv), g):
            dst.copy_(src)
        return torch.zeros(softmax_lse.shape)

    return {
        "flash_attn_func": flash_attn_func,
        "flash_attn_varlen_func": flash_attn_varlen_func,
        "flash_attn_qkvpacked_func": flash_attn_qkvpacked_func,
        "_flash_attn_forward": _flash_attn_forward,
        "_flash_attn_backward": _flash_attn_backward,
    }


def fa4_resolve(causal: bool, left: int | None, right: int | None) -> tuple[bool, tuple[int, int]]:
    """flash-attn-4's ``_resolve_causal_local_window`` followed by our mask vocabulary.

    Returns ``(causal, (left, right))`` in the reference's terms (``-1`` = unbounded).
    """
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    if left is not None or right is not None:
        if left is None and right == 0:
            return True, (-1, -1)
        return False, (-1 if left is None else left, -1 if right is None else right)
    return causal, (-1, -1)


def install_flash4(monkeypatch: pytest.MonkeyPatch, rec: Recorder) -> None:
    """Fake ``flash_attn.cute`` (flash-attn-4 4.0.0b36) with ``flash_attn.cute.interface``."""

    def _check_window(window_size) -> None:
        for w in window_size:
            assert w is None or w >= 0, f"FA4 takes None for an unbounded side, got {window_size}"

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                        aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None,
                        return_lse=False, gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):  # fmt: skip
        rec.add("flash_attn_func", (q, k, v), locals())
        _check_window(window_size)
        c, w = fa4_resolve(causal, *window_size)
        return library_attention(q, k, v, scale=softmax_scale, causal=c, window=w, empty_lse=-math.inf)

    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                               gather_kv_indices=None, page_table=None, softmax_scale=None, causal=False,
                               window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
                               pack_gqa=None, deterministic=False, score_mod=None, score_mod_bwd=None,
                               mask_mod=None, block_sparse_tensors=None, aux_tensors=None, aux_scalars=None,
                               return_lse=False, scheduler_metadata=None, seqlen_k_per_split=None,
                               disable_scheduler_metadata=False, gather_bwd_recompute_p=False,
                               gather_bwd_token_chunk=None):  # fmt: skip
        rec.add("flash_attn_varlen_func", (q, k, v), locals())
        _check_window(window_size)
        c, w = fa4_resolve(causal, *window_size)
        return library_attention(
            q, k, v, scale=softmax_scale, causal=c, window=w, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, empty_lse=-math.inf,
        )  # fmt: skip

    def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None,
                        softmax_scale=None, causal=False, softcap=None, window_size_left=None,
                        window_size_right=None, learnable_sink=None, tile_mn=None, mma_pv_is_rs=None,
                        intra_wg_overlap=None, num_threads=384, num_splits=1, pack_gqa=None, _arch=None,
                        score_mod=None, mask_mod=None, block_sparse_tensors=None, return_lse=False, out=None,
                        lse=None, aux_tensors=None, aux_scalars=None, q_descale=None, k_descale=None,
                        v_descale=None, gather_kv_indices=None, scheduler_metadata=None,
                        seqlen_k_per_split=None, disable_scheduler_metadata=False,
                        gather_bwd_recompute_p=False):  # fmt: skip
        rec.add("_flash_attn_fwd", (q, k, v), locals())
        _check_window((window_size_left, window_size_right))
        c, w = fa4_resolve(causal, window_size_left, window_size_right)
        o, s = library_attention(
            q, k, v, scale=softmax_scale, causal=c, window=w, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, empty_lse=-math.inf,
        )  # fmt: skip
        return o, (s if return_lse else None), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, m_block_size=64, n_block_size=128,
                        num_threads=256, pack_gqa=False, num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False,
                        dKV_swapAB=False, dQ_swapAB=False, AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2,
                        V_in_regs=False, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, deterministic=False, dq=None, dk=None, dv=None,
                        score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None, aux_scalars=None,
                        block_sparse_tensors=None, dlse=None, learnable_sink=None):  # fmt: skip
        rec.add("_flash_attn_bwd", (q, k, v, out, dout, lse), locals())
        _check_window((window_size_left, window_size_right))
        c, w = fa4_resolve(causal, window_size_left, window_size_right)
        return library_backward(
            dout, q, k, v, out, lse, scale=softmax_scale, causal=c, window=w,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip

    pkg = _module("flash_attn", __path__=[])
    cute = _module(
        "flash_attn.cute",
        __path__=[],
        __version__="4.0.0b36",
        flash_attn_func=flash_attn_func,
        flash_attn_varlen_func=flash_attn_varlen_func,
    )
    iface = _module(
        "flash_attn.cute.interface",
        flash_attn_func=flash_attn_func,
        flash_attn_varlen_func=flash_attn_varlen_func,
        _flash_attn_fwd=_flash_attn_fwd,
        _flash_attn_bwd=_flash_attn_bwd,
    )
    _install(monkeypatch, {"flash_attn": pkg, "flash_attn.cute": cute, "flash_attn.cute.interface": iface})


def install_te(monkeypatch: pytest.MonkeyPatch, rec: Recorder) -> None:
    """Fake ``transformer_engine.pytorch.DotProductAttention`` (TE 2.20 signatures; bshd / thd, causal
    masks, GQA, window)."""

    class DotProductAttention(torch.nn.Module):
        def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                     qkv_format="sbhd", attn_mask_type="causal", window_size=None, bottom_right_diagonal=None,
                     softcap=0.0, sequence_parallel=False, tp_size=1, get_rng_state_tracker=None, tp_group=None,
                     layer_number=None, attention_type="self", cp_group=None, cp_global_ranks=None,
                     cp_stream=None, cp_comm_type="p2p", softmax_scale=None, softmax_type="vanilla",
                     return_max_logit=False, name=None):  # fmt: skip
            super().__init__()
            rec.add("DotProductAttention.__init__", (), locals())
            self.num_attention_heads = num_attention_heads
            self.num_gqa_groups = num_gqa_groups or num_attention_heads
            self.softmax_scale = softmax_scale if softmax_scale is not None else kv_channels**-0.5
            self.qkv_format = qkv_format
            self.attn_mask_type = attn_mask_type
            self.window_size = window_size
            self.cp_group = None

        def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p"):
            rec.add("set_context_parallel_group", (), locals())
            self.cp_group = cp_group

        def forward(self, query_layer=None, key_layer=None, value_layer=None, attention_mask=None, qkv_format=None,
                    cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
                    max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type=None, window_size=None,
                    bottom_right_diagonal=None, softcap=None, checkpoint_core_attention=False,
                    core_attention_bias_type="no_bias", core_attention_bias=None, alibi_slopes=None,
                    fast_zero_fill=True, inference_params=None, pad_between_seqs=None, fp8_output=False,
                    bf16_backward=False, num_splits=1, score_mod=None, score_mod_bprop=None,
                    score_mod_tensors=None, score_mod_bprop_tensors=None, qkv_layer=None, kv_layer=None,
                    qkv_interleave_dim=-3, thd_attention_policies=None,
                    thd_attention_policy_dispatch="auto"):  # fmt: skip
            rec.add("DotProductAttention.forward", (query_layer, key_layer, value_layer), locals())
            fmt = qkv_format or self.qkv_format
            mask = attn_mask_type or self.attn_mask_type
            left, right = window_size if window_size is not None else (self.window_size or (-1, 0))
            assert mask in ("causal", "padding_causal"), f"unexpected attn_mask_type {mask}"
            assert right == 0, "TE causal masks need window right == 0"
            q, k, v = query_layer, key_layer, value_layer
            if fmt == "bshd":
                out, _ = library_attention(q, k, v, scale=self.softmax_scale, causal=True, window=(left, 0))
                return out.reshape(*out.shape[:2], -1)
            assert fmt == "thd" and mask == "padding_causal" and cu_seqlens_q is not None
            out, _ = library_attention(
                q, k, v, scale=self.softmax_scale, causal=True, window=(left, 0),
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_kv,
            )  # fmt: skip
            return out.reshape(out.shape[0], -1)

    pkg = _module("transformer_engine", __path__=[], __version__="2.9.0")
    pt = _module("transformer_engine.pytorch", DotProductAttention=DotProductAttention)
    _install(monkeypatch, {"transformer_engine": pkg, "transformer_engine.pytorch": pt})


# ----- inputs --------------------------------------------------------------------------------------
def qkv(
    B: int = 2, T: int = 24, Hq: int = 4, Hkv: int = 2, D: int = 16, *, dtype=torch.bfloat16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))  # type: ignore[return-value]


def reference_out(q, k, v, *, scale=None, window=(-1, -1), cu=None, cu_k=None) -> np.ndarray:
    """Judge: ``reference.attention`` on ``[B, T, H, D]`` (``cu``: documents of the flattened batch)."""
    from reference.attention import attention

    qn, kn, vn = (x.float().numpy() for x in (q, k, v))
    if cu is None:
        return attention(qn, kn, vn, scale=scale, causal=True, window=window)[0]
    B, T = q.shape[:2]
    out, _ = attention(
        qn.reshape(B * T, *q.shape[2:]),
        kn.reshape(-1, *k.shape[2:]),
        vn.reshape(-1, *v.shape[2:]),
        scale=scale,
        causal=True,
        window=window,
        cu_seqlens_q=cu.numpy(),
        cu_seqlens_k=(cu if cu_k is None else cu_k).numpy(),
    )
    return out.reshape(q.shape)


def assert_close_bf16(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.float().numpy(), expected, atol=2e-2, rtol=2e-2)


# ----- the doubles are faithful --------------------------------------------------------------------------
def test_library_attention_varlen_with_seqused_reads_offset_segments() -> None:
    """``cu_seqlens_k`` offsets + ``seqused_k`` select exactly those keys (the FA4 KV-cache trick)."""
    q, k, v = qkv(1, 12, 2, 1, 8, dtype=torch.float64)
    qf, kf, vf = q[0], k[0], v[0]
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([1, 6, 12], dtype=torch.int32)
    used = torch.tensor([3, 4], dtype=torch.int32)
    out, lse = library_attention(
        qf,
        kf,
        vf,
        scale=0.5,
        causal=True,
        window=(-1, -1),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        seqused_k=used,
    )
    o0, _ = segment_attention(qf[0:2], kf[1:4], vf[1:4], scale=0.5, causal=True, window=(-1, -1))
    o1, _ = segment_attention(qf[2:5], kf[6:10], vf[6:10], scale=0.5, causal=True, window=(-1, -1))
    torch.testing.assert_close(out[:5], torch.cat([o0, o1]))
    assert torch.equal(out[5:], torch.zeros_like(out[5:])) and torch.isposinf(lse[:, 5:]).all()


def test_library_backward_matches_autograd_of_the_reference() -> None:
    q, k, v = (x.requires_grad_() for x in qkv(1, 10, 4, 2, 8, dtype=torch.float64, seed=3))
    out, lse = twins.attention(q, k, v, scale=0.3, causal=True, window=(3, 0))
    dout = torch.randn_like(out)
    out.backward(dout)
    g = library_backward(
        dout,
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        scale=0.3,
        causal=True,
        window=(3, 0),
    )
    for mine, ref in zip(g, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, ref)


@pytest.mark.parametrize(
    ("causal", "window", "expected"),
    [
        (True, (None, None), (True, (-1, -1))),
        (True, (7, 0), (False, (7, 0))),
        (True, (-1, -1), (True, (-1, -1))),  # FA4 accepts -1/-1 as "no window"
        (False, (None, None), (False, (-1, -1))),
        (False, (3, 2), (False, (3, 2))),
        (False, (None, 0), (True, (-1, -1))),
    ],
)
def test_fa4_resolution_double(causal, window, expected) -> None:
    assert fa4_resolve(causal, *window) == expected


def test_kvcache_double_writes_and_hides_left_padding() -> None:
    q, k, v = qkv(2, 1, 2, 1, 8, dtype=torch.float64, seed=5)
    kc, vc = torch.randn(2, 6, 1, 8, dtype=F64), torch.randn(2, 6, 1, 8, dtype=F64)
    lp = torch.tensor([0, 2], dtype=torch.int32)
    out = kvcache_attention(
        q, kc, vc, k, v, cache_seqlens=3, cache_leftpad=lp, scale=0.4, causal=True, window=(-1, -1)
    )
    assert torch.equal(kc[:, 3], k[:, 0])
    ref, _ = segment_attention(q[1], kc[1, 2:4], vc[1, 2:4], scale=0.4, causal=True, window=(-1, -1))
    torch.testing.assert_close(out[1], ref)


def test_flash_attn_4_alone_does_not_make_flash_2_available(monkeypatch):
    """flash-attn-4 installs the ``flash_attn`` namespace (``flash_attn.cute``) without FA2's
    functions: flash_2 must then be unavailable, not fail at call time (seen on an H200)."""
    pkg = _module("flash_attn", __path__=[])
    _install(monkeypatch, {"flash_attn": pkg})
    from olmo_attn.backends import capabilities as caps

    reason = caps.unavailable_reason("flash_2")
    assert reason is not None and "flash_attn.flash_attn_interface" in reason


def _bench():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        import backend_bench
    finally:
        sys.path.remove(str(root))
    return backend_bench


@pytest.mark.parametrize("name", ["flash_2", "flash_3", "flash_3_v3", "flash_4", "te"])
@pytest.mark.parametrize("mask", ["causal", "sliding_window", "documents"])
def test_backend_bench_raw_call_is_the_adapters_computation(
    monkeypatch: pytest.MonkeyPatch, name, mask
) -> None:
    """benchmarks/backend_bench.py times each library's own call beside the adapter: through the
    doubles, that call must compute what the adapter computes (same mask, window, scale, documents)."""
    bench = _bench()
    rec = Recorder()
    fake_cuda(monkeypatch, (9, 0))
    backend = name.removesuffix("_v3")
    {
        "flash_2": lambda: install_flash2(monkeypatch, rec),
        "flash_3": lambda: install_flash3(monkeypatch, rec),
        "flash_3_v3": lambda: install_flash3(monkeypatch, rec, version="3.0.0"),
        "flash_4": lambda: install_flash4(monkeypatch, rec),
        "te": lambda: install_te(monkeypatch, rec),
    }[name]()
    cfg = bench.BenchConfig(device="cpu", n_heads=4, n_kv_heads=2, head_dim=16, window=5)
    q, k, v = qkv(B=2, T=24)
    kwargs: dict[str, Any] = {}
    if mask == "documents":
        kwargs = {"cu_doc_lens": torch.tensor([0, 7, 24, 30, 48], dtype=torch.int32), "max_doc_len": 18}
    fn, note = bench.raw_call(backend, cfg, mask, kwargs)
    assert fn is not None, note
    from olmo_attn.backends.base import AttentionBackendName

    adapter = AttentionBackendName(backend).build(
        head_dim=16, n_heads=4, n_kv_heads=2, window_size=(4, 0) if mask == "sliding_window" else (-1, -1)
    )
    torch.testing.assert_close(fn(q, k, v), adapter((q, k, v), **kwargs))
    window = (4, 0) if mask == "sliding_window" else (-1, -1)
    cu = kwargs.get("cu_doc_lens")
    assert_close_bf16(fn(q, k, v), reference_out(q, k, v, window=window, cu=cu))


def test_backend_bench_torch_raw_call_is_sdpa_causal_only() -> None:
    bench = _bench()
    cfg = bench.BenchConfig(device="cpu", n_heads=4, n_kv_heads=2, head_dim=16)
    fn, note = bench.raw_call("torch", cfg, "causal", {})
    q, k, v = (x.float() for x in qkv(B=1, T=10))
    assert fn is not None and "scaled_dot_product_attention" in note
    assert_close_bf16(fn(q, k, v).bfloat16(), reference_out(q, k, v))
    assert bench.raw_call("torch", cfg, "documents", {})[0] is None
