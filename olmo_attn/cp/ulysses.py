"""Ulysses context parallelism: all-to-all to head-sharded, ordinary attention, all-to-all back.

Each rank holds a contiguous shard ``[B, T_l, H, D]``. ``cp2hp`` turns that into the full sequence
``[B, W·T_l, H/W, D]`` for ``H/W`` of the heads; the backend then runs its ordinary attention hook
(``_attend``) over the whole sequence, with its own window and the **global** document offsets, so
every mask the backend supports works (this is how the sliding-window crash of OLMo-core's torch
backend disappears: the mask is built for the full length). ``hp2cp`` sends the result back.

GQA: query heads are split ``Hq/W`` per rank. When ``Hkv`` is not a multiple of ``W`` (e.g. MQA),
the kv heads are replicated by the smallest factor ``f`` (a divisor of ``Hq/Hkv``) that makes
``f·Hkv`` divisible by ``W``: each rank then receives exactly the kv heads its query heads use, and
autograd sums the replicas' gradients. Only ``Hq % W != 0`` cannot be run (typed error).

Before the first all-to-all the ranks run the cross-rank input check of :mod:`.check` (the same
shapes, dtypes, settings and global document offsets on every rank, else every rank raises
:class:`~olmo_attn.exceptions.CPInputMismatchError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..masks import DocSegments
from .all_to_all import all_to_all_cp2hp, all_to_all_single_hp2cp
from .errors import ContextParallelInputError, CPDivisibilityError

if TYPE_CHECKING:
    from ..backends.base import AttentionBackend

__all__ = ["kv_replication_factor", "ulysses_attention"]


def kv_replication_factor(n_heads: int, n_kv_heads: int, world_size: int) -> int:
    """Smallest ``f`` dividing ``n_heads / n_kv_heads`` with ``f · n_kv_heads`` divisible by ``world_size``.

    Raises :class:`CPDivisibilityError` when ``n_heads`` itself is not divisible by ``world_size``.
    """
    if n_heads % world_size:
        raise CPDivisibilityError(
            f"Ulysses context parallelism splits the query heads over the CP ranks: n_heads={n_heads} is "
            f"not divisible by the CP world size {world_size}; use a CP degree that divides {n_heads} "
            f"(one of {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}) or ring attention"
        )
    group = n_heads // n_kv_heads
    for f in range(1, group + 1):
        if group % f == 0 and (f * n_kv_heads) % world_size == 0:
            return f
    raise CPDivisibilityError(  # unreachable: f = group gives n_heads, divisible by world_size
        f"n_kv_heads={n_kv_heads} cannot be spread over {world_size} ranks"
    )


def ulysses_attention(
    backend: AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    docs: DocSegments | None,
    dropout_p: float,
) -> torch.Tensor:
    """Ulysses attention for ``backend`` (called by ``AttentionBackend.forward`` under Ulysses CP).

    Args:
        q: ``[B, T_l, Hq, D]`` contiguous shard (rank ``r`` holds tokens ``[r·T_l, (r+1)·T_l)``).
        k, v: ``[B, T_l, Hkv, D]``.
        docs: the *global* document segmentation over the flattened ``B · W · T_l`` tokens (the
            Ulysses balancer's metadata), or ``None``.
        dropout_p: attention dropout (applied by the backend on its heads).

    Returns:
        ``[B, T_l, Hq, D]``.
    """
    group: Any = backend.cp_pg
    if not dist.is_initialized():
        raise ContextParallelInputError(
            "Ulysses context parallelism needs torch.distributed to be initialised"
        )
    W = dist.get_world_size(group)
    error: Exception | None = None
    f = 1
    try:
        Hq, Hkv = q.shape[2], k.shape[2]
        f = kv_replication_factor(Hq, Hkv, W)
    except Exception as exc:  # raised after the cross-rank check, so every rank raises
        error = exc
    if W > 1:
        _verify(backend, group, q, k, v, docs, dropout_p, error)
    if error is not None:
        raise error
    if f > 1:  # [B, T_l, Hkv, D] -> [B, T_l, f·Hkv, D]: replica i of kv head g is head g·f + i
        k = k.repeat_interleave(f, dim=2)
        v = v.repeat_interleave(f, dim=2)
    qh, kh, vh = all_to_all_cp2hp([q, k, v], group)  # [B, W·T_l, Hq/W, D], [B, W·T_l, f·Hkv/W, D]
    out = backend._attend(qh, kh, vh, docs, dropout_p)  # [B, W·T_l, Hq/W, D]
    return all_to_all_single_hp2cp(out, group)  # [B, T_l, Hq, D]


_DOCS_FIX = (
    "every rank must pass the same, whole-sequence document offsets (shard_batch with the Ulysses "
    "balancer does this)"
)


def report_local_error(
    backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, error: BaseException
) -> None:
    """This rank rejected its own Ulysses inputs (e.g. document offsets that do not fit its shard)
    before the collectives: run the cross-rank check with that error, so the other ranks raise
    :class:`~olmo_attn.exceptions.CPInputMismatchError` naming this rank instead of waiting for it
    in the all-to-all. The caller then raises ``error``."""
    group: Any = backend.cp_pg
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        _verify(backend, group, q, k, v, None, backend.effective_dropout(), error)


def _verify(backend: Any, group: Any, q, k, v, docs: DocSegments | None, dropout_p: float, error) -> None:
    """The cross-rank check of the call (see :mod:`olmo_attn.cp.check`)."""
    from .check import CPDocs, host_ints, verify_cp_inputs

    fp = None
    if docs is not None:
        cu_q = docs.cu_q_host if docs.cu_q_host is not None else host_ints(docs.cu_q)
        cu_k = docs.cu_k_host if docs.cu_k_host is not None else host_ints(docs.cu_k)
        if docs.cu_k is docs.cu_q or cu_q == cu_k:
            fp = CPDocs(lists=(("cu_doc_lens", cu_q),), scalars=(("max_doc_len", docs.max_q),))
        else:
            fp = CPDocs(
                lists=(("cu_doc_lens_q", cu_q), ("cu_doc_lens_k", cu_k)),
                scalars=(("max_doc_len_q", docs.max_q), ("max_doc_len_k", docs.max_k)),
            )
    verify_cp_inputs(
        group,
        strategy="ulysses",
        tensors=(q, k, v),
        settings={
            "window": tuple(backend.window_size),
            "causal": True,
            "softmax scale": float(backend.softmax_scale),
            "dropout_p": float(dropout_p),
        },
        docs=fp,
        fix=_DOCS_FIX,
        local_error=error,
    )
