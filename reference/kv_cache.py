"""KV-cache decoding in NumPy float64.

A cache holds ``k_cache, v_cache [B, S, Hkv, D]``, one shared length ``cache_seqlens`` and a
per-row left padding ``cache_leftpad [B]``. One call with ``Tn`` new tokens:

1. writes ``k_new[:, t]`` / ``v_new[:, t]`` at cache index ``p = cache_seqlens + t`` for every row
   ``b`` with ``p >= cache_leftpad[b]`` (a left-padded prefill leaves indices ``< leftpad[b]`` as
   they were, zero in a fresh cache; decode steps always write since ``p >= leftpad``);
2. query ``t`` sits at cache index ``p`` (bottom-right alignment) and sees cache indices ``j`` with
   ``leftpad[b] <= j <= p`` (and ``p - left <= j <= p + right`` with a window);
3. the caller advances ``cache_seqlens += Tn`` (:class:`KVCache` does it in :meth:`KVCache.step`).

Query rows inside the left padding see no key: their output is 0 and lse ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from reference.attention import attention


def kv_cache_attention(
    q_new,
    k_new,
    v_new,
    k_cache,
    v_cache,
    *,
    cache_seqlens: int,
    cache_leftpad=None,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Append ``Tn`` tokens to the cache and attend over it (module docstring for the rules).

    Args:
        q_new: ``[B, Tn, Hq, D]``; k_new, v_new: ``[B, Tn, Hkv, D]``.
        k_cache, v_cache: ``[B, S, Hkv, D]`` (not modified; updated copies are returned).
        cache_seqlens: number of cache positions already used (shared by all rows).
        cache_leftpad: ``[B]`` ints, number of padding positions at the start of each row (default 0).

    Returns:
        ``out [B, Tn, Hq, D]``, ``lse [B, Hq, Tn]``, ``k_cache_updated``, ``v_cache_updated``
        (``[B, S, Hkv, D]`` each).
    """
    q_new, k_new, v_new = (np.asarray(a, dtype=np.float64) for a in (q_new, k_new, v_new))
    k_cache = np.array(k_cache, dtype=np.float64)
    v_cache = np.array(v_cache, dtype=np.float64)
    B, Tn = q_new.shape[:2]
    S = k_cache.shape[1]
    start = int(cache_seqlens)
    if start < 0 or start + Tn > S:
        raise ValueError(f"cache_seqlens={start} plus {Tn} new tokens does not fit a cache of length {S}")
    leftpad = np.zeros(B, np.int64) if cache_leftpad is None else np.asarray(cache_leftpad, np.int64)
    if leftpad.shape != (B,):
        raise ValueError(f"cache_leftpad must have shape {(B,)}, got {leftpad.shape}")

    pos = start + np.arange(Tn)  # cache index of each new token
    write = pos[None, :] >= leftpad[:, None]  # [B, Tn]
    k_cache[:, start : start + Tn] = np.where(write[..., None, None], k_new, k_cache[:, start : start + Tn])
    v_cache[:, start : start + Tn] = np.where(write[..., None, None], v_new, v_cache[:, start : start + Tn])

    used = start + Tn
    key_valid = np.arange(used)[None, :] >= leftpad[:, None]  # [B, used]
    out, lse = attention(
        q_new,
        k_cache[:, :used],
        v_cache[:, :used],
        scale=scale,
        causal=True,
        window=window,
        key_valid=key_valid,
    )
    return out, lse, k_cache, v_cache


@dataclass
class KVCache:
    """Functional KV cache: ``k_cache, v_cache [B, S, Hkv, D]``, ``cache_seqlens``, ``cache_leftpad [B]``."""

    k_cache: np.ndarray
    v_cache: np.ndarray
    cache_seqlens: int = 0
    cache_leftpad: np.ndarray | None = None

    @classmethod
    def empty(cls, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int) -> KVCache:
        """A zero cache ``[batch_size, max_seq_len, n_kv_heads, head_dim]`` with no padding."""
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        return cls(np.zeros(shape), np.zeros(shape), 0, np.zeros(batch_size, np.int64))

    def step(
        self, q_new, k_new, v_new, *, cache_leftpad=None, scale=None, window=(-1, -1)
    ) -> tuple[np.ndarray, np.ndarray, KVCache]:
        """Run :func:`kv_cache_attention`; returns ``out``, ``lse`` and the advanced cache.

        ``cache_leftpad`` (``[B]``), when given, replaces the recorded padding (as
        ``record_leftpad`` does); otherwise the recorded one is used.
        """
        leftpad = self.cache_leftpad if cache_leftpad is None else np.asarray(cache_leftpad, np.int64)
        out, lse, k_cache, v_cache = kv_cache_attention(
            q_new,
            k_new,
            v_new,
            self.k_cache,
            self.v_cache,
            cache_seqlens=self.cache_seqlens,
            cache_leftpad=leftpad,
            scale=scale,
            window=window,
        )
        n = np.shape(q_new)[1]
        new = replace(
            self,
            k_cache=k_cache,
            v_cache=v_cache,
            cache_seqlens=self.cache_seqlens + n,
            cache_leftpad=leftpad,
        )
        return out, lse, new


def generate_reference(
    q,
    k,
    v,
    *,
    prompt_len: int,
    cache_leftpad=None,
    max_seq_len: int | None = None,
    decode_step: int = 1,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
) -> tuple[np.ndarray, KVCache]:
    """Prefill ``prompt_len`` tokens, then decode the rest ``decode_step`` tokens at a time.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` — left-padded rows: row ``b`` holds
            ``cache_leftpad[b]`` padding tokens, then its content.
        max_seq_len: cache length ``S`` (default ``T``).

    Returns:
        ``out [B, T, Hq, D]`` (padding rows are 0) and the final :class:`KVCache`. For every row
        ``out[b, lp:]`` equals a cache-free causal :func:`attention` on ``q/k/v[b, lp:]``.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, T = q.shape[:2]
    cache = KVCache.empty(B, T if max_seq_len is None else max_seq_len, k.shape[2], k.shape[3])
    out, _, cache = cache.step(
        q[:, :prompt_len],
        k[:, :prompt_len],
        v[:, :prompt_len],
        cache_leftpad=cache_leftpad,
        scale=scale,
        window=window,
    )
    outs = [out]
    for t0 in range(prompt_len, T, decode_step):
        t1 = min(T, t0 + decode_step)
        out, _, cache = cache.step(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], scale=scale, window=window)
        outs.append(out)
    return np.concatenate(outs, axis=1), cache
