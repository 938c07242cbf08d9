"""Scaled dot-product attention in NumPy float64 — the ground truth for every backend.

For batch row ``b``, query head ``h`` and query ``i`` (kv head ``g = h // (Hq // Hkv)``)::

    s[i, j]  = scale * <q[b, i, h], k[b, j, g]>             scale = 1/sqrt(D) by default
    lse[i]   = log sum_{j allowed} exp(s[i, j])
    P[i, j]  = exp(s[i, j] - lse[i])  if allowed(i, j)  else 0
    out[i]   = sum_j P[i, j] * keep[i, j] / (1 - p) * v[b, j, g]     (keep = 1, p = 0 without dropout)

``allowed(i, j)`` is the AND of causal, window, document and key-validity masks
(docs/CONVENTIONS.md). Inside one segment with ``Lq`` queries and ``Lk`` keys, query ``iq`` sits at
key coordinate ``d = iq + (Lk - Lq)`` (bottom-right alignment) and

    causal:  jk <= d
    window:  d - left <= jk <= d + right        (-1 = unbounded on that side)

A row with no allowed key has ``out = 0`` and ``lse = -inf``.

The computation runs in query blocks; each block only touches the span of keys that its mask can
see, so causal and document masks skip most of the work. Blocks never change the math.
"""

from __future__ import annotations

import numpy as np

_BLOCK_BYTES = 64 * 2**20  # size of one block of scores


def _as_f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _check_cu(cu, total: int, name: str) -> np.ndarray:
    cu = np.asarray(cu, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0:
        raise ValueError(f"{name} must be a 1-D array starting with 0, got {cu.tolist()}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if cu[-1] > total:
        raise ValueError(f"{name}[-1] = {cu[-1]} exceeds the sequence length {total}")
    return cu


def _segments(cu: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: segment id (-1 outside every segment), local index and segment length."""
    pos = np.arange(n)
    seg = np.searchsorted(cu, pos, side="right") - 1
    seg = np.where(pos < cu[-1], seg, -1)
    start = cu[np.maximum(seg, 0)]
    length = cu[np.maximum(seg, 0) + 1] - start
    return seg, pos - start, length


def allowed_mask(
    Tq: int,
    Tk: int,
    *,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    cu_seqlens_q=None,
    cu_seqlens_k=None,
) -> np.ndarray:
    """Boolean mask ``[Tq, Tk]``: may query ``i`` see key ``j`` (causal, window, segments)?

    ``cu_seqlens_q`` / ``cu_seqlens_k`` (``[n_seg + 1]``, starting at 0) cut queries and keys into
    segments; segment ``s`` pairs queries ``[cu_q[s], cu_q[s+1])`` with keys ``[cu_k[s], cu_k[s+1])``.
    Giving only one of them uses it for both sides (then ``Tq == Tk`` is required). Positions past
    ``cu[-1]`` belong to no segment and see nothing. Without segments the whole ``Tq x Tk`` block is
    one segment. Causal and window use the bottom-right alignment inside each segment.
    """
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window entries must be >= -1, got {window}")
    if cu_seqlens_q is None and cu_seqlens_k is None:
        cu_q, cu_k = np.array([0, Tq]), np.array([0, Tk])
    else:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            if Tq != Tk:
                raise ValueError(f"one cu_seqlens for both sides needs Tq == Tk, got {Tq} and {Tk}")
            cu_seqlens_q = cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        cu_q = _check_cu(cu_seqlens_q, Tq, "cu_seqlens_q")
        cu_k = _check_cu(cu_seqlens_k, Tk, "cu_seqlens_k")
        if cu_q.size != cu_k.size:
            raise ValueError(f"cu_seqlens_q has {cu_q.size} entries but cu_seqlens_k has {cu_k.size}")
    if cu_q.size == 1:  # no segment at all
        return np.zeros((Tq, Tk), dtype=bool)
    seg_q, iq, len_q = _segments(cu_q, Tq)
    seg_k, jk, _ = _segments(cu_k, Tk)
    len_k_of_q = (cu_k[1:] - cu_k[:-1])[np.maximum(seg_q, 0)]
    d = (iq + len_k_of_q - len_q)[:, None]  # aligned diagonal, in key-local coordinates
    jk = jk[None, :]
    mask = (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] >= 0)
    if causal:
        mask &= jk <= d
    if left >= 0:
        mask &= jk >= d - left
    if right >= 0:
        mask &= jk <= d + right
    return mask


def attention(
    q,
    k,
    v,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    key_valid=None,
    keep_mask=None,
    dropout_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Masked softmax attention with log-sum-exp; see the module docstring for the formula.

    Args:
        q: ``[B, Tq, Hq, D]`` (or varlen ``[total_q, Hq, D]``, treated as ``[1, total_q, Hq, D]``).
        k, v: ``[B, Tk, Hkv, D]`` (or ``[total_k, Hkv, D]``); ``Hq % Hkv == 0``.
        scale: softmax scale, default ``1/sqrt(D)``.
        causal, window: masks as in :func:`allowed_mask`.
        cu_seqlens_q, cu_seqlens_k: segments of the (single, ``B == 1``) flattened sequence.
        key_valid: ``[B, Tk]`` bool, ``False`` hides key ``j`` from every query of row ``b``.
        keep_mask: ``[B, Hq, Tq, Tk]`` bool dropout keep-mask, used with ``dropout_p``:
            ``P' = P * keep / (1 - dropout_p)``; ``lse`` is computed before dropout.

    Returns:
        ``out [B, Tq, Hq, D]`` and ``lse [B, Hq, Tq]`` (varlen input: ``[total_q, Hq, D]`` and
        ``[Hq, total_q]``). Rows with no allowed key give ``out = 0``, ``lse = -inf``.
    """
    q, k, v = _as_f64(q), _as_f64(k), _as_f64(v)
    varlen = q.ndim == 3
    if varlen:
        q, k, v = q[None], k[None], v[None]
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Tq,Hq,D], k=v [B,Tk,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if (cu_seqlens_q is not None or cu_seqlens_k is not None) and B != 1:
        raise ValueError(f"cu_seqlens need one flattened sequence (B == 1), got B={B}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    G = Hq // Hkv

    base = allowed_mask(
        Tq, Tk, causal=causal, window=window, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k
    )[None]  # [1, Tq, Tk]
    if key_valid is not None:
        key_valid = np.asarray(key_valid, dtype=bool)
        if key_valid.shape != (B, Tk):
            raise ValueError(f"key_valid must have shape {(B, Tk)}, got {key_valid.shape}")
        base = base & key_valid[:, None, :]  # [B, Tq, Tk]
    if keep_mask is not None:
        keep_mask = np.asarray(keep_mask, dtype=bool)
        if keep_mask.shape != (B, Hq, Tq, Tk):
            raise ValueError(f"keep_mask must have shape {(B, Hq, Tq, Tk)}, got {keep_mask.shape}")

    qh = q.transpose(0, 2, 1, 3).reshape(B, Hkv, G, Tq, D)  # query head h = g_kv * G + j
    kh = k.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Tk, D]
    vh = v.transpose(0, 2, 1, 3)[:, :, None]
    out = np.zeros((B, Hkv, G, Tq, D))
    lse = np.full((B, Hkv, G, Tq), -np.inf)
    block = max(1, _BLOCK_BYTES // (8 * B * Hq * max(Tk, 1)))
    for i0 in range(0, Tq, block):
        i1 = min(Tq, i0 + block)
        allowed = base[:, i0:i1]  # [B or 1, bq, Tk]
        cols = np.flatnonzero(allowed.any(axis=(0, 1)))
        if cols.size == 0:
            continue
        lo, hi = cols[0], cols[-1] + 1
        mask = allowed[:, None, None, :, lo:hi]  # [B or 1, 1, 1, bq, span]
        s = scale * (qh[:, :, :, i0:i1] @ kh[:, :, :, lo:hi].swapaxes(-1, -2))
        s = np.where(mask, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)  # empty rows: any finite shift, exp(-inf) = 0
        p = np.exp(s - m)
        total = p.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            lse[:, :, :, i0:i1] = (m + np.log(total))[..., 0]
        if keep_mask is not None:
            keep = keep_mask[:, :, i0:i1, lo:hi].reshape(B, Hkv, G, i1 - i0, hi - lo)
            p = p * keep / (1.0 - dropout_p)
        out[:, :, :, i0:i1] = (p @ vh[:, :, :, lo:hi]) / np.where(total > 0, total, 1.0)

    out = out.reshape(B, Hq, Tq, D).transpose(0, 2, 1, 3)
    lse = lse.reshape(B, Hq, Tq)
    if varlen:
        return out[0], lse[0]
    return out, lse


def sdpa(
    q,
    k,
    v,
    *,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    cu_doc_lens=None,
    cu_doc_lens_q=None,
    cu_doc_lens_k=None,
    local_k_slice: slice | None = None,
    causal: bool = True,
    keep_mask=None,
    dropout_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """OLMo-core's backend-level attention.

    Args:
        q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]``.
        cu_doc_lens: documents over the flattened batch (flat index ``b * T + t``); fills whichever
            of ``cu_doc_lens_q`` / ``cu_doc_lens_k`` is missing.
        cu_doc_lens_q, cu_doc_lens_k: separate query / key segmentations (llama3 ring layout): ``q``
            is the local ``[1, Lq, Hq, D]`` shard, ``k, v`` the gathered global ``[1, N, Hkv, D]``.
        local_k_slice: keys used are ``k_flat[local_k_slice]`` (applied after flattening the batch).
        keep_mask: dropout keep-mask for the problem actually solved: ``[B, Hq, Tq, Tk]`` without
            documents, ``[1, Hq, B*Tq, len(keys)]`` with them.

    Returns:
        ``out [B, Tq, Hq, D]`` and ``lse [B, Hq, Tq]``.
    """
    q, k, v = _as_f64(q), _as_f64(k), _as_f64(v)
    if cu_doc_lens is not None:
        cu_doc_lens_q = cu_doc_lens if cu_doc_lens_q is None else cu_doc_lens_q
        cu_doc_lens_k = cu_doc_lens if cu_doc_lens_k is None else cu_doc_lens_k
    if (cu_doc_lens_q is None) != (cu_doc_lens_k is None):
        raise ValueError("give both cu_doc_lens_q and cu_doc_lens_k (or cu_doc_lens)")
    options = dict(scale=scale, causal=causal, window=window, keep_mask=keep_mask, dropout_p=dropout_p)
    if cu_doc_lens_q is None:
        if local_k_slice is not None:
            k, v = k[:, local_k_slice], v[:, local_k_slice]
        return attention(q, k, v, **options)
    B, Tq, Hq, D = q.shape
    k_flat = k.reshape(-1, *k.shape[2:])
    v_flat = v.reshape(-1, *v.shape[2:])
    if local_k_slice is not None:
        k_flat, v_flat = k_flat[local_k_slice], v_flat[local_k_slice]
    out, lse = attention(
        q.reshape(1, B * Tq, Hq, D),
        k_flat[None],
        v_flat[None],
        cu_seqlens_q=cu_doc_lens_q,
        cu_seqlens_k=cu_doc_lens_k,
        **options,
    )
    return out.reshape(B, Tq, Hq, D), lse.reshape(Hq, B, Tq).transpose(1, 0, 2)
