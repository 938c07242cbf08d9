"""Counter-based attention dropout: the keep bit is a pure function of ``(seed, b, h, i, j)``.

No RNG state is consumed while attending, so the backward pass (and ring attention, and a test)
regenerates exactly the forward's mask tile by tile, and CPU and CUDA produce the same bits. The
hash works on int64 tensors whose values stay below ``2**32`` and multiplies only by constants below
``2**31``, so no product overflows int64 on any device.

Semantics (``docs/CONVENTIONS.md``): ``P' = P * keep / (1 - p)``; the log-sum-exp is unaffected.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D  # odd multipliers < 2**31 (products of a 32-bit value stay below 2**63)
_C2 = 0x2C1B3C6D
_C3 = 0x297A2D39
_GOLDEN = 0x9E3779B9


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds); ``x`` int64 in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 13)
    x = (x * _C3) & _M32
    x = x ^ (x >> 16)
    return x


def _scalar_mix(x: int) -> int:
    """:func:`_mix` on a Python int (same bits)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    x ^= x >> 13
    x = (x * _C3) & _M32
    x ^= x >> 16
    return x


def _threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1)")
    return min(_M32 + 1, round(p * 2**32))


def new_seed(generator: torch.Generator | None = None) -> int:
    """Draw a fresh dropout seed from torch's CPU generator (no device sync)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def keep_tile(
    seed: int,
    p: float,
    b: torch.Tensor,
    h: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
) -> torch.Tensor:
    """Keep bits for the outer product of index vectors -> bool ``[len(b), len(h), len(i), len(j)]``.

    ``b, h, i, j`` are int64 index vectors on one device (global batch row, query head, query and key
    index); the result on that device is identical on CPU and CUDA.
    """
    s = _scalar_mix(seed & _M32) ^ _scalar_mix(((seed >> 32) & _M32) ^ _GOLDEN)
    row = _mix(_mix(b.to(torch.int64) ^ s)[:, None] ^ h.to(torch.int64)[None, :])  # [nb, nh]
    row = _mix(row[:, :, None] ^ i.to(torch.int64)[None, None, :])  # [nb, nh, ni]
    col = _mix((j.to(torch.int64) + _GOLDEN) & _M32)  # [nj]
    bits = _mix(row[..., None] ^ col)  # [nb, nh, ni, nj]
    return bits >= _threshold(p)


def keep_mask(
    seed: int,
    batch: int,
    heads: int,
    tq: int,
    tk: int,
    p: float,
    *,
    device: torch.device | str = "cpu",
    q_offset: int = 0,
    k_offset: int = 0,
) -> torch.Tensor:
    """The whole keep mask ``[B, H, Tq, Tk]`` (bool) the kernels use with ``dropout_seed=seed``.

    Feed it to ``reference.attention.attention(keep_mask=...)`` to check a kernel's dropout. Varlen
    calls use ``B = 1`` and flattened query/key indices. ``q_offset``/``k_offset`` shift ``i``/``j``.
    """
    dev = torch.device(device)
    ar = lambda n, o=0: torch.arange(o, o + n, device=dev)
    return keep_tile(seed, p, ar(batch), ar(heads), ar(tq, q_offset), ar(tk, k_offset))
