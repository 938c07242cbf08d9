"""KV cache for decoding, compatible with OLMo-core's ``KVCacheManager``.

Buffers (non-persistent, never in ``state_dict``): ``k_cache``, ``v_cache`` ``[B, max_seq_len,
H_kv, D]``, ``cache_leftpad [B]`` int32, ``cache_seqlens`` 0-dim int32 (cache positions used,
shared by all rows). A call with ``T_new`` tokens writes them at ``[cache_seqlens, cache_seqlens +
T_new)`` — except indices below a row's left padding, which a prefill leaves zero — and query ``t``
sees cache indices ``leftpad[b] <= j <= cache_seqlens + t``. The caller then advances the cache with
:meth:`KVCacheManager.update_seqlen`.

Differences from OLMo-core: the dtype is a real choice (default bf16, as there); writing past
``max_seq_len`` raises :class:`KVCacheOverflowError` instead of corrupting memory; ``reallocate``
really frees the old buffers before allocating.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from .exceptions import InvalidInputError, InvalidInputTypeError
from .masks import _host_values


class KVCacheOverflowError(InvalidInputError):
    """Appending would write past the cache's ``max_seq_len`` (a ``ValueError``)."""


def leftpad_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding per row from a prefix-padding mask.

    Args:
        attention_mask: ``[B, T]`` bool or 0/1 ints; each row is some padding (0) followed only by
            valid tokens (1).

    Returns:
        ``[B]`` int32: index of the first valid token (``T`` for an all-padding row).

    Raises:
        ValueError: a row has padding after a valid token (not prefix padding), or the mask is not 2-D.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [B, T], got shape {tuple(attention_mask.shape)}")
    valid = attention_mask.to(torch.bool)
    T = valid.shape[1]
    # first valid index per row (T when none): argmax over a bool finds the first True
    first = torch.where(valid.any(dim=1), valid.to(torch.int8).argmax(dim=1), T)
    expected = torch.arange(T, device=valid.device)[None, :] >= first[:, None]
    bad = (expected != valid).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} is not prefix (left) padding: {valid[row].int().tolist()}; "
            "KV-cache decoding supports left padding only (zeros, then ones)"
        )
    return first.to(torch.int32)


class KVCacheManager(nn.Module):
    """Pre-allocated key/value cache for one attention layer.

    Args:
        batch_size: ``B``.
        max_seq_len: capacity ``S`` in tokens (prompt plus generated).
        num_kv_heads: ``H_kv``.
        head_dim: ``D``.
        device: where the buffers live.
        dtype: cache dtype (default ``torch.bfloat16``, OLMo-core's fixed choice).
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        for name, val in (
            ("batch_size", batch_size),
            ("max_seq_len", max_seq_len),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self._batch_size = batch_size
        self._max_seq_len = max_seq_len
        # host mirror of cache_seqlens: bounds checks without a device sync. A CPU tensor, not a
        # Python int, so that a torch.compile-d forward advances it in its graph (no guard on the
        # value, no recompile per decode step) and eager calls still read it without a sync.
        self._seqlen_cpu = torch.zeros((), dtype=torch.int64)
        # host copy of the recorded cache_leftpad (None: unknown, recorded while compiling)
        self._leftpad_host: tuple[int, ...] | None = (0,) * batch_size
        self.kv_cache_shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k_cache: torch.Tensor
        self.v_cache: torch.Tensor
        self.cache_leftpad: torch.Tensor
        self.cache_seqlens: torch.Tensor
        self._allocate(torch.device(device) if device is not None else torch.device("cpu"), dtype)

    def _allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        self.register_buffer(
            "k_cache", torch.zeros(self.kv_cache_shape, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(self.kv_cache_shape, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "cache_leftpad", torch.zeros(self._batch_size, dtype=torch.int32, device=device), persistent=False
        )
        self.register_buffer(
            "cache_seqlens", torch.zeros((), dtype=torch.int32, device=device), persistent=False
        )
        self._seqlen_cpu = torch.zeros((), dtype=torch.int64)
        self._leftpad_host = (0,) * self._batch_size

    @property
    def _seqlen_host(self) -> int:
        return int(self._seqlen_cpu)

    @property
    def position_counter(self) -> torch.Tensor:
        """0-dim int64 CPU tensor: the host mirror of ``cache_seqlens`` (what compiled code reads)."""
        return self._seqlen_cpu

    # ----- properties ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def seqlen(self) -> int:
        """Cache positions used so far (host copy of ``cache_seqlens``)."""
        return self._seqlen_host

    # ----- OLMo-core API ---------------------------------------------------------------------------
    def _check_leftpad_meta(self, leftpad: object) -> torch.Tensor:
        if not isinstance(leftpad, torch.Tensor):
            raise InvalidInputTypeError(
                f"cache_leftpad must be a [B={self._batch_size}] int32 tensor, got {type(leftpad).__name__}; "
                "build it with torch.tensor(..., dtype=torch.int32) or leftpad_from_attention_mask(mask)"
            )
        if leftpad.shape != (self._batch_size,):
            raise InvalidInputError(
                f"cache_leftpad must have shape ({self._batch_size},) (one entry per batch row), "
                f"got {tuple(leftpad.shape)}"
            )
        if leftpad.is_floating_point() or leftpad.is_complex() or leftpad.dtype == torch.bool:
            raise InvalidInputTypeError(
                f"cache_leftpad must be an integer tensor, got {leftpad.dtype}; pass "
                "cache_leftpad.to(torch.int32)"
            )
        if leftpad.device.type == "meta":
            raise InvalidInputError(
                "cache_leftpad is on the meta device and holds no values; build it on the cache's device"
            )
        return leftpad

    def check_leftpad(self, leftpad: object, n_new: int) -> None:
        """Check ``cache_leftpad`` given with a forward of ``n_new`` tokens.

        At prefill (empty cache) every entry must lie in ``[0, min(n_new, max_seq_len)]`` (it counts
        padding tokens of the ``n_new``-token prompt). Once tokens are cached the left padding is
        fixed: a ``cache_leftpad`` passed at a decode step must equal the recorded one. The values
        are read once per distinct tensor (a device sync on CUDA); the value checks are skipped
        while ``torch.compile`` traces.
        """
        leftpad = self._check_leftpad_meta(leftpad)
        if torch.compiler.is_compiling():
            return
        values = _host_values(leftpad)
        if self._seqlen_host > 0:
            recorded = self._leftpad_host
            if recorded is not None and values != recorded:
                raise InvalidInputError(
                    f"cache_leftpad={list(values)} differs from the left padding recorded at prefill "
                    f"({list(recorded)}) while {self._seqlen_host} token(s) are cached; the padding of a "
                    "prompt cannot change during decoding: pass the same cache_leftpad (or None) at "
                    "decode steps, or zero_cache() to start a new generation"
                )
            return
        for row, pad in enumerate(values):
            if pad < 0:
                raise InvalidInputError(
                    f"cache_leftpad[{row}]={pad} is negative; it counts the padding tokens at the start "
                    "of the row (>= 0)"
                )
            if pad > self._max_seq_len:
                raise InvalidInputError(
                    f"cache_leftpad[{row}]={pad} exceeds the KV cache's max_seq_len={self._max_seq_len}; "
                    "left padding is part of the prompt: pass at most the prompt's padding"
                )
            if pad > n_new:
                raise InvalidInputError(
                    f"cache_leftpad[{row}]={pad} is larger than the prompt length T={n_new} of this "
                    f"prefill; the padding of a row is at most T (use leftpad_from_attention_mask)"
                )

    def record_leftpad(self, leftpad: torch.Tensor | None) -> None:
        """Store ``leftpad [B]`` (number of padding tokens per row); ``None`` keeps the recorded one."""
        if leftpad is None:
            return
        leftpad = self._check_leftpad_meta(leftpad)
        self.cache_leftpad.copy_(leftpad)
        self._leftpad_host = None if torch.compiler.is_compiling() else _host_values(leftpad)

    def update_seqlen(self, seqlen: int) -> None:
        """Advance ``cache_seqlens`` by ``seqlen`` tokens (after a forward that wrote them)."""
        seqlen = int(seqlen)
        if not torch.compiler.is_compiling():  # compiled: the write op checked the capacity
            self.check_capacity(seqlen, advanced=True)
        self.cache_seqlens.add_(seqlen)
        self._seqlen_cpu.add_(seqlen)

    def current_position(self) -> torch.Tensor:
        """The 0-dim ``cache_seqlens`` tensor itself (start position of the next tokens)."""
        return self.cache_seqlens

    def zero_cache(self) -> None:
        """Zero all four buffers (reuse the allocation for a new generation)."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.cache_leftpad.zero_()
        self.cache_seqlens.zero_()
        self._seqlen_cpu.zero_()
        self._leftpad_host = (0,) * self._batch_size

    def reallocate(self, batch_size: int, max_seq_len: int) -> None:
        """Free the buffers, then allocate zero buffers ``[batch_size, max_seq_len, H_kv, D]`` (same dtype/device)."""
        device, dtype = self.k_cache.device, self.k_cache.dtype
        self._batch_size = batch_size
        self._max_seq_len = max_seq_len
        self.kv_cache_shape = (batch_size, max_seq_len, self.num_kv_heads, self.head_dim)
        # drop every reference first so the allocator can reuse the memory for the new buffers
        for name in ("k_cache", "v_cache", "cache_leftpad", "cache_seqlens"):
            self._buffers[name] = None  # type: ignore[assignment]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self._allocate(device, dtype)

    def is_reusable(self, batch_size: int, max_seq_len: int) -> bool:
        """Same batch size and enough capacity."""
        return self._batch_size == batch_size and self._max_seq_len >= max_seq_len

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        """``zero_cache()`` when reusable, else ``reallocate(batch_size, max_seq_len)``."""
        if self.is_reusable(batch_size, max_seq_len):
            self.zero_cache()
        else:
            self.reallocate(batch_size, max_seq_len)

    # ----- used by the backends --------------------------------------------------------------------
    def check_capacity(self, n_new: int, *, advanced: bool = False) -> None:
        """Raise :class:`KVCacheOverflowError` if ``n_new`` more tokens do not fit."""
        if self._seqlen_host + n_new > self._max_seq_len:
            what = "advancing cache_seqlens by" if advanced else "writing"
            raise KVCacheOverflowError(
                f"KV cache overflow: {what} {n_new} token(s) at position {self._seqlen_host} exceeds "
                f"max_seq_len={self._max_seq_len}; allocate a larger cache with "
                f"reset(batch_size={self._batch_size}, max_seq_len={self._seqlen_host + n_new}) "
                "(or Attention.init_kv_cache_manager)"
            )

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> int:
        """Write ``k_new, v_new [B, T_new, H_kv, D]`` at ``[seqlen, seqlen + T_new)``; return that start.

        Positions below a row's left padding are not written (a left-padded prefill leaves them
        zero). Does not advance ``cache_seqlens`` (the caller's :meth:`update_seqlen` does).
        """
        self.check_new_kv(k_new, v_new)
        n = k_new.shape[1]
        self.check_capacity(n)
        start = self._seqlen_host
        with torch.no_grad():
            pos = torch.arange(start, start + n, device=self.k_cache.device)
            write = (pos[None, :] >= self.cache_leftpad[:, None].to(torch.int64))[
                ..., None, None
            ]  # [B, T_new, 1, 1]
            for cache, new in ((self.k_cache, k_new), (self.v_cache, v_new)):
                dst = cache[:, start : start + n]
                dst.copy_(torch.where(write, new.detach().to(cache.dtype), dst))
        return start

    def check_new_kv(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Shapes of new keys/values: ``[B, T_new, H_kv, D]`` of this cache (metadata only)."""
        if k_new.shape != v_new.shape:
            raise ValueError(
                f"k and v must have the same shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        if (
            k_new.dim() != 4
            or k_new.shape[0] != self._batch_size
            or k_new.shape[2:] != self.k_cache.shape[2:]
        ):
            raise ValueError(
                f"new keys must be [B={self._batch_size}, T_new, H_kv={self.num_kv_heads}, D={self.head_dim}], "
                f"got {tuple(k_new.shape)}; build the KV cache with the model's batch size and head layout"
            )

    def extra_repr(self) -> str:
        return (
            f"batch_size={self._batch_size}, max_seq_len={self._max_seq_len}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.k_cache.dtype}, seqlen={self._seqlen_host}"
        )
