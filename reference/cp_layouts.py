"""Context-parallel load balancers and layout transforms (OLMo-core's zig-zag, llama3 and Ulysses
balancers, their document metadata, and the all-to-all transforms) as pure NumPy functions of one
array, with their exact inverses.

Notation: ``W`` ranks, rank ``r``; ``seq_dim`` is the sequence axis of ``x`` (negative allowed).
Padding always appends ``pad_value`` at the end of the sequence axis.

* zig-zag: split into ``2W`` equal chunks ``c_0 … c_{2W−1}``; rank ``r`` keeps ``cat(c_r, c_{2W−1−r})``
  (by document: every document is split that way on its own, padded to a multiple of ``2W``).
* llama3: contiguous ``[r·L, (r+1)·L)`` slices of the total padded to a multiple of
  ``length_multiple·W`` (the intended behaviour; OLMo-core's padding has a sign bug), plus the
  per-rank query/key segment metadata (:func:`llama3_metadata`).
* Ulysses: contiguous ``[r·L, (r+1)·L)`` slices; document metadata stays global.
* cp2hp / hp2cp: the all-to-all transforms between sequence- and head-sharded layouts.

Bad inputs raise ``ValueError`` (OLMo-core uses ``RuntimeError``/``AssertionError`` in places).
"""

from __future__ import annotations

import numpy as np


def _roundup(n: int, m: int) -> int:
    return -(-n // m) * m


def _axis(x: np.ndarray, seq_dim: int) -> int:
    return seq_dim % x.ndim


def _slice(x: np.ndarray, seq_dim: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[_axis(x, seq_dim)] = slice(start, stop)
    return x[tuple(index)]


def _pad_end(x: np.ndarray, seq_dim: int, n: int, pad_value, what: str) -> np.ndarray:
    if n == 0:
        return x
    if pad_value is None:
        raise ValueError(f"{what} needs {n} padding tokens: give a pad_value")
    shape = list(x.shape)
    shape[_axis(x, seq_dim)] = n
    return np.concatenate(
        [x, np.full(shape, pad_value, dtype=np.result_type(x, np.asarray(pad_value)))], axis=seq_dim
    )


def _check_cu(cu_doc_lens) -> np.ndarray:
    cu = np.asarray(cu_doc_lens)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0:
        raise ValueError(f"cu_doc_lens must be 1-D and start with 0, got {cu.tolist()}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_doc_lens must be non-decreasing, got {cu.tolist()}")
    return cu


def _multiple(length_multiple: int | None, default: int, unit: int, name: str) -> int:
    if length_multiple is None:
        return default
    if length_multiple % unit:
        raise ValueError(f"{name}: length_multiple={length_multiple} must be divisible by {unit}")
    return length_multiple


def _max_diff(cu: np.ndarray) -> int:
    return int(np.diff(cu).max()) if cu.size > 1 else 0


# ---------------------------------------------------------------------------------------------- zig-zag


def zigzag_pad(x, seq_dim: int, world: int, pad_value, length_multiple: int | None = None):
    """``(x_padded, n_added)``: pad to the next multiple of ``length_multiple`` (default ``2W``)."""
    x = np.asarray(x)
    m = _multiple(length_multiple, 2 * world, 2 * world, "zig-zag")
    n = x.shape[_axis(x, seq_dim)]
    added = _roundup(n, m) - n
    return _pad_end(x, seq_dim, added, pad_value, "zig-zag"), added


def _zigzag_pick(x: np.ndarray, seq_dim: int, rank: int, world: int) -> np.ndarray:
    chunk = x.shape[_axis(x, seq_dim)] // (2 * world)
    first = _slice(x, seq_dim, rank * chunk, (rank + 1) * chunk)
    second = _slice(x, seq_dim, (2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk)
    return np.concatenate([first, second], axis=seq_dim)


def zigzag_shard(
    x, seq_dim: int, rank: int, world: int, pad_value=None, length_multiple: int | None = None
) -> np.ndarray:
    """Zig-zag ``batch_shard``: pad the global length to a multiple of ``length_multiple``
    (default ``2W``), split into ``2W`` chunks, keep chunks ``r`` and ``2W − 1 − r``."""
    padded, _ = zigzag_pad(x, seq_dim, world, pad_value, length_multiple)
    return _zigzag_pick(padded, seq_dim, rank, world)


def _zigzag_join(locals_: list[np.ndarray], seq_dim: int) -> np.ndarray:
    world = len(locals_)
    chunk = locals_[0].shape[_axis(locals_[0], seq_dim)] // 2
    chunks: list[np.ndarray | None] = [None] * (2 * world)
    for r, local in enumerate(locals_):
        chunks[r] = _slice(local, seq_dim, 0, chunk)
        chunks[2 * world - 1 - r] = _slice(local, seq_dim, chunk, 2 * chunk)
    return np.concatenate(chunks, axis=seq_dim)


def zigzag_unshard(locals_: list, seq_dim: int, length: int | None = None) -> np.ndarray:
    """Inverse of :func:`zigzag_shard` from all ranks' locals; ``length`` drops the padding."""
    full = _zigzag_join([np.asarray(a) for a in locals_], seq_dim)
    return full if length is None else _slice(full, seq_dim, 0, length)


def zigzag_shard_by_document(
    x, seq_dim: int, cu_doc_lens, rank: int, world: int, pad_value=None, length_multiple: int | None = None
) -> tuple[np.ndarray, dict]:
    """Zig-zag ``batch_shard_by_document``.

    Each document ``[cu[d], cu[d+1])`` is padded at its end to a multiple of ``2W`` and zig-zag
    split on its own; the kept pieces are concatenated; tokens after ``cu[-1]`` are dropped. With
    ``length_multiple`` the **local** result is padded to a multiple of it. Metadata::

        cu_doc_lens = cu_padded // W   (+ [last + final_padding] with length_multiple: a trailing,
                                         possibly zero-length, padding document)
        max_doc_len = max(diff(cu_doc_lens))
    """
    x = np.asarray(x)
    cu = _check_cu(cu_doc_lens)
    pieces, padded_lens = [], []
    for d in range(cu.size - 1):
        doc = _slice(x, seq_dim, int(cu[d]), int(cu[d + 1]))
        n = int(cu[d + 1] - cu[d])
        doc = _pad_end(doc, seq_dim, _roundup(n, 2 * world) - n, pad_value, f"document {d} (length {n})")
        padded_lens.append(_roundup(n, 2 * world))
        pieces.append(_zigzag_pick(doc, seq_dim, rank, world))
    local = np.concatenate(pieces, axis=seq_dim) if pieces else _slice(x, seq_dim, 0, 0)
    local_cu = np.concatenate([[0], np.cumsum(padded_lens, dtype=np.int64)]) // world
    if length_multiple is not None:
        n = local.shape[_axis(local, seq_dim)]
        final = _roundup(n, length_multiple) - n
        local = _pad_end(local, seq_dim, final, pad_value, "length_multiple")
        local_cu = np.append(local_cu, local_cu[-1] + final)
    local_cu = local_cu.astype(cu.dtype)
    return local, {"cu_doc_lens": local_cu, "max_doc_len": _max_diff(local_cu)}


def zigzag_unshard_by_document(locals_: list, seq_dim: int, cu_doc_lens) -> np.ndarray:
    """Inverse of :func:`zigzag_shard_by_document`: the global ``[cu[-1]]`` tokens (per-document
    and final padding removed) from all ranks' locals, given the **global** ``cu_doc_lens``."""
    locals_ = [np.asarray(a) for a in locals_]
    world = len(locals_)
    cu = _check_cu(cu_doc_lens)
    docs, offset = [], 0
    for d in range(cu.size - 1):
        n = int(cu[d + 1] - cu[d])
        width = 2 * (_roundup(n, 2 * world) // (2 * world))  # this document's length on every rank
        parts = [_slice(local, seq_dim, offset, offset + width) for local in locals_]
        docs.append(_slice(_zigzag_join(parts, seq_dim), seq_dim, 0, n))
        offset += width
    return np.concatenate(docs, axis=seq_dim) if docs else _slice(locals_[0], seq_dim, 0, 0)


# ---------------------------------------------------------------------------------------------- llama3


def llama3_metadata(cu_doc_lens, rank: int, world: int) -> dict:
    """Per-rank metadata of ring-flash-attn's llama3 preparation (causal) for a total
    ``N = cu[-1]`` divisible by ``W``; ``L = N / W``, ``a = r·L``, ``e = (r + 1)·L``::

        left  = largest index with cu[left] <= a,   right = smallest index with cu[right] >= e
        cu_q  = cu[left..right] − a,  cu_q[0] = 0,  cu_q[-1] = L
        cu_k  = cu[left..right],      cu_k[-1] = e,  cu_k −= cu[left]
        local_k_slice = slice(cu[left], e)
    """
    cu = _check_cu(cu_doc_lens).astype(np.int64)
    total = int(cu[-1])
    if total == 0 or total % world:
        raise ValueError(f"llama3 metadata needs cu_doc_lens[-1]={total} > 0 and divisible by W={world}")
    L = total // world
    a, e = rank * L, (rank + 1) * L
    left = int(np.flatnonzero(cu <= a)[-1])
    right = int(np.flatnonzero(cu >= e)[0])
    cu_q = cu[left : right + 1] - a
    cu_q[0], cu_q[-1] = 0, L
    cu_k = cu[left : right + 1].copy()
    cu_k[-1] = e
    cu_k -= cu[left]
    return {
        "cu_doc_lens_q": cu_q,
        "cu_doc_lens_k": cu_k,
        "max_doc_len_q": _max_diff(cu_q),
        "max_doc_len_k": _max_diff(cu_k),
        "local_k_slice": slice(int(cu[left]), e),
    }


def llama3_shard_by_document(
    x, seq_dim: int, cu_doc_lens, rank: int, world: int, pad_value=None, length_multiple: int | None = None
) -> tuple[np.ndarray, dict]:
    """Llama3 ``batch_shard_by_document`` with the intended padding and the
    :func:`llama3_metadata` of each rank.

    ``x`` must hold exactly ``N = cu[-1]`` tokens. The total is padded to a multiple of
    ``m = length_multiple · W`` (``W`` without ``length_multiple``); the padding forms one synthetic
    trailing document. Rank ``r`` keeps ``[r·L, (r+1)·L)``, ``L = N_padded / W``; metadata from
    :func:`llama3_metadata` on the padded ``cu``.
    """
    x = np.asarray(x)
    cu = _check_cu(cu_doc_lens)
    total = int(cu[-1])
    if x.shape[_axis(x, seq_dim)] != total:
        raise ValueError(f"llama3: input has {x.shape[_axis(x, seq_dim)]} tokens, cu_doc_lens[-1] = {total}")
    m = world if length_multiple is None else length_multiple * world
    pad = _roundup(total, m) - total
    x = _pad_end(x, seq_dim, pad, pad_value, "llama3")
    if pad:
        cu = np.append(cu, total + pad).astype(cu.dtype)
    L = (total + pad) // world
    return _slice(x, seq_dim, rank * L, (rank + 1) * L), llama3_metadata(cu, rank, world)


def llama3_unshard_by_document(locals_: list, seq_dim: int, cu_doc_lens) -> np.ndarray:
    """Inverse of :func:`llama3_shard_by_document`: concatenate the ranks, drop the padding."""
    full = np.concatenate([np.asarray(a) for a in locals_], axis=seq_dim)
    return _slice(full, seq_dim, 0, int(_check_cu(cu_doc_lens)[-1]))


# ---------------------------------------------------------------------------------------------- Ulysses


def ulysses_pad(x, seq_dim: int, world: int, pad_value, length_multiple: int | None = None):
    """``(x_padded, n_added)``: pad to the next multiple of ``length_multiple`` (default ``W``)."""
    x = np.asarray(x)
    m = _multiple(length_multiple, world, world, "Ulysses")
    n = x.shape[_axis(x, seq_dim)]
    added = _roundup(n, m) - n
    return _pad_end(x, seq_dim, added, pad_value, "Ulysses"), added


def ulysses_shard(
    x, seq_dim: int, rank: int, world: int, pad_value=None, length_multiple: int | None = None
) -> np.ndarray:
    """Ulysses ``batch_shard``: pad to a multiple of ``length_multiple`` (default ``W``), keep
    the contiguous slice ``[r·L, (r+1)·L)``."""
    padded, _ = ulysses_pad(x, seq_dim, world, pad_value, length_multiple)
    L = padded.shape[_axis(padded, seq_dim)] // world
    return _slice(padded, seq_dim, rank * L, (rank + 1) * L)


def ulysses_unshard(locals_: list, seq_dim: int, length: int | None = None) -> np.ndarray:
    """Inverse of :func:`ulysses_shard`; ``length`` drops the padding."""
    full = np.concatenate([np.asarray(a) for a in locals_], axis=seq_dim)
    return full if length is None else _slice(full, seq_dim, 0, length)


def ulysses_shard_by_document(
    x, seq_dim: int, cu_doc_lens, rank: int, world: int, pad_value=None, length_multiple: int | None = None
) -> tuple[np.ndarray, dict]:
    """Ulysses ``batch_shard_by_document``: :func:`ulysses_shard` plus global metadata::

    pad = roundup(N, length_multiple) − N,   N = cu[-1] (must equal x's length here)
    cu_doc_lens = cu (+ [N + pad] if pad > 0),  max_doc_len = max(max(diff(cu)), pad)
    """
    x = np.asarray(x)
    cu = _check_cu(cu_doc_lens)
    m = _multiple(length_multiple, world, world, "Ulysses")
    total = int(cu[-1])
    if x.shape[_axis(x, seq_dim)] != total:
        raise ValueError(f"Ulysses: input has {x.shape[_axis(x, seq_dim)]} tokens, cu_doc_lens[-1] = {total}")
    pad = _roundup(total, m) - total
    local = ulysses_shard(x, seq_dim, rank, world, pad_value, m)
    max_doc_len = _max_diff(cu)
    if pad:
        cu = np.append(cu, total + pad).astype(cu.dtype)
        max_doc_len = max(max_doc_len, pad)
    return local, {"cu_doc_lens": cu, "max_doc_len": max_doc_len}


def ulysses_unshard_by_document(locals_: list, seq_dim: int, cu_doc_lens) -> np.ndarray:
    """Inverse of :func:`ulysses_shard_by_document` (drops the padding document)."""
    return ulysses_unshard(locals_, seq_dim, int(_check_cu(cu_doc_lens)[-1]))


# ---------------------------------------------------------------------------------------------- all-to-all


def cp2hp(per_rank_inputs: list) -> list[np.ndarray]:
    """Sequence-sharded → head-sharded. Rank ``s`` holds ``[B, T_l, H, D]`` (or ``[B, T_l, C]``);
    rank ``r`` gets ``[B, W·T_l, H/W, D]`` with ``out_r[b, s·T_l + t, j] = x_s[b, t, r·(H/W) + j]``."""
    xs = [np.asarray(a) for a in per_rank_inputs]
    world, H = len(xs), xs[0].shape[2]
    if H % world:
        raise ValueError(f"cp2hp: {H} heads/channels are not divisible by W={world}")
    Hl = H // world
    return [np.concatenate([x[:, :, r * Hl : (r + 1) * Hl] for x in xs], axis=1) for r in range(world)]


def hp2cp(per_rank_inputs: list) -> list[np.ndarray]:
    """Head-sharded → sequence-sharded. Rank ``s`` holds ``[B, T, H_l, D]`` (or ``[B, T, C_l]``);
    rank ``r`` gets ``[B, T/W, W·H_l, D]`` with ``out_r[b, t, s·H_l + j] = x_s[b, r·(T/W) + t, j]``."""
    xs = [np.asarray(a) for a in per_rank_inputs]
    world, T = len(xs), xs[0].shape[1]
    if T % world:
        raise ValueError(f"hp2cp: sequence length {T} is not divisible by W={world}")
    Tl = T // world
    return [np.concatenate([x[:, r * Tl : (r + 1) * Tl] for x in xs], axis=2) for r in range(world)]
