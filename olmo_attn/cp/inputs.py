"""Sharding a batch for context parallelism: tokens, labels, per-document RoPE rows, metadata.

This is the input preparation OLMo-core's transformer does before a context-parallel forward pass
(sharding the RoPE buffers), with its per-document RoPE bug fixed: the
position of every token inside its document is computed **once, on the full sequence, before
sharding**, and the RoPE rows for those positions are sharded exactly like the tokens. Row ``j`` of
a rank's ``pos_sin``/``pos_cos`` (or ``freqs_cis``) therefore belongs to local token ``j``, and
``Attention`` uses the rows as they are (it does not re-index them with ``cu_doc_lens`` under CP),
so every balancer — zig-zag, llama3, Ulysses — rotates each token by the same position as the
single-device run. Padding tokens get all-zero rows (zero q and k), as in OLMo-core.

:func:`gather_sequence` is the inverse for outputs and gradients: all ranks' shards → the global
tensor (padding removed) on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ShardingArgumentError
from .load_balancers import PadValue, RingAttentionLoadBalancer

__all__ = ["CPBatch", "gather_sequence", "rope_rows", "shard_batch"]


@dataclass
class CPBatch:
    """One rank's share of a batch.

    Attributes:
        inputs: the sharded inputs, in the order given (each along its own sequence axis).
        attention_kwargs: document metadata for ``Attention.forward`` / ``backend.forward`` on the
            target device (offsets as int32): ``cu_doc_lens``/``max_doc_len`` (zig-zag, Ulysses) or
            the llama3 five; empty without documents.
        rope_kwargs: one dict per RoPE module given, ``{"pos_sin", "pos_cos"}`` (default and fused
            RoPE, ``[T_local, r]``) or ``{"freqs_cis"}`` (complex RoPE, ``[T_local, r/2]``).
        position_ids: ``[T_local]`` int64 position of each local token inside its document (global
            position without documents); ``0`` for padding.
        index: ``[T_local]`` int64 global index of each local token, ``-1`` for padding.
    """

    inputs: list[torch.Tensor]
    attention_kwargs: dict[str, Any]
    rope_kwargs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    position_ids: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def kwargs_for(self, rope_idx: int = 0) -> dict[str, Any]:
        """``attention_kwargs`` plus the RoPE rows of RoPE module ``rope_idx`` (if any)."""
        out = dict(self.attention_kwargs)
        if self.rope_kwargs:
            out.update(self.rope_kwargs[rope_idx])
        return out


def rope_rows(rope: Any, position_ids: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
    """RoPE table rows for ``position_ids [N]`` (``-1`` = padding → zero rows) as forward kwargs."""
    pos = position_ids.to(torch.int64)
    pad = pos < 0
    buffers = rope.get_buffers_for_positions(pos.clamp(min=0), device)
    out: dict[str, torch.Tensor] = {}
    for name in ("pos_sin", "pos_cos", "freqs_cis"):
        t = getattr(buffers, name, None)
        if t is None:
            continue
        if bool(pad.any()):
            t = t.masked_fill(pad.to(t.device)[:, None], 0)
        out[name] = t
    if not out:
        raise ShardingArgumentError(f"{type(rope).__name__}.get_buffers_for_positions returned no tables")
    return out


def shard_batch(
    balancer: RingAttentionLoadBalancer,
    *,
    inputs: Sequence[torch.Tensor],
    seq_dims: Sequence[int],
    pad_values: Sequence[PadValue],
    cu_doc_lens: torch.Tensor | None = None,
    rope: Any | Sequence[Any] | None = None,
    length_multiple: int | None = None,
    device: torch.device | str | None = None,
) -> CPBatch:
    """Shard ``inputs`` for this rank, with per-document RoPE rows and attention metadata.

    Args:
        balancer: this rank's load balancer.
        inputs: full-length tensors (token ids ``[B, T]``, labels, ...), ``seq_dims[i]`` their
            sequence axes, ``pad_values[i]`` their padding values (e.g. ``0``, ``-100``).
        cu_doc_lens: ``[n_docs + 1]`` CPU offsets of packed documents over the flattened batch
            (``B == 1``); positions restart at 0 in every document. ``None``: plain sequences.
        rope: a RoPE module (``RotaryEmbedding``, ``FusedRotaryEmbedding``, ``ComplexRotaryEmbedding``)
            or a list of them (one entry of ``rope_kwargs`` each; e.g. layers with different θ).
        length_multiple: passed to the balancer (OLMo-core's transformer uses 16 with documents).
        device: where the metadata and RoPE rows go (default: the first input's device).

    Returns:
        A :class:`CPBatch`.
    """
    if len(inputs) == 0:
        raise ShardingArgumentError("shard_batch needs at least one input to take the sequence length from")
    dims = [d % x.dim() for x, d in zip(inputs, seq_dims)]
    T = inputs[0].shape[dims[0]]
    device = torch.device(device) if device is not None else inputs[0].device
    if cu_doc_lens is not None:
        cu = cu_doc_lens.cpu()
        for i, (x, d) in enumerate(zip(inputs, dims)):
            if d > 0 and x.shape[0] != 1:
                raise ShardingArgumentError(
                    f"inputs[{i}] has batch size {x.shape[0]}; packed documents need the batch flattened "
                    "into one row (B == 1) with cu_doc_lens over it"
                )
        index, _ = balancer.shard_index_by_document(cu, length_multiple=length_multiple, pad=True)
        shards, meta = balancer.batch_shard_by_document(
            inputs=list(inputs),
            seq_dims=list(dims),
            cu_doc_lens=cu,
            pad_values=list(pad_values),
            length_multiple=length_multiple,
        )
        from ..rope import document_position_ids

        positions = document_position_ids(cu, max(T, int(cu[-1])))
    else:
        index = balancer.shard_index(T, length_multiple=length_multiple)
        shards = balancer.batch_shard(
            inputs=list(inputs),
            seq_dims=list(dims),
            pad_values=list(pad_values),
            length_multiple=length_multiple,
        )
        meta = {}
        positions = torch.arange(T, dtype=torch.int64)
    local_pos = torch.where(index >= 0, positions[index.clamp(min=0)], torch.full_like(index, -1))
    attention_kwargs: dict[str, Any] = {}
    for key, val in meta.items():
        attention_kwargs[key] = (
            val.to(device=device, dtype=torch.int32) if isinstance(val, torch.Tensor) else val
        )
    modules = [] if rope is None else (list(rope) if isinstance(rope, (list, tuple)) else [rope])
    rope_kwargs = [rope_rows(m, local_pos, device) for m in modules]
    return CPBatch(
        inputs=shards,
        attention_kwargs=attention_kwargs,
        rope_kwargs=rope_kwargs,
        position_ids=local_pos.clamp(min=0),
        index=index,
    )


def gather_sequence(
    local: torch.Tensor,
    balancer: RingAttentionLoadBalancer,
    *,
    seq_dim: int,
    group: Any = None,
    length: int | None = None,
    cu_doc_lens: torch.Tensor | None = None,
    length_multiple: int | None = None,
) -> torch.Tensor:
    """All ranks' ``local`` shards (equal shapes) → the global tensor on every rank (padding removed).

    Without ``cu_doc_lens`` give the global ``length`` (the inverse of ``batch_shard``); with it, the
    inverse of ``batch_shard_by_document`` (``length`` then pads dropped trailing tokens with 0).
    Not differentiable (use it for outputs and gradients).
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world != balancer.cp_world_size:
        raise ShardingArgumentError(
            f"the process group has {world} ranks but the balancer was built for {balancer.cp_world_size}"
        )
    error = None
    if cu_doc_lens is None and length is None:
        error = ShardingArgumentError("gather_sequence needs the global length (or cu_doc_lens)")
    if world > 1:
        _verify_gather(local, group, seq_dim, length, length_multiple, cu_doc_lens, error)
    if error is not None:
        raise error
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if cu_doc_lens is None:
        assert length is not None
        return balancer.unshard(parts, seq_dim=seq_dim, length=length, length_multiple=length_multiple)
    return balancer.unshard_by_document(
        parts, seq_dim=seq_dim, cu_doc_lens=cu_doc_lens.cpu(), length_multiple=length_multiple, length=length
    )


def _verify_gather(
    local: Any,
    group: Any,
    seq_dim: int,
    length: int | None,
    length_multiple: int | None,
    cu_doc_lens: torch.Tensor | None,
    error: Exception | None,
) -> None:
    """Every rank gathers a shard of the same shape and dtype, with the same arguments (see
    :mod:`olmo_attn.cp.check`): otherwise every rank raises ``CPInputMismatchError``."""
    from .check import CPDocs, host_ints, verify_cp_inputs

    docs = None
    if cu_doc_lens is not None:
        docs = CPDocs(lists=(("cu_doc_lens", host_ints(cu_doc_lens)),))
    verify_cp_inputs(
        group,
        strategy="gather_sequence",
        tensors=(local,),
        tensor_names=("shard",),
        settings={"seq_dim": seq_dim, "length": length, "length_multiple": length_multiple},
        docs=docs,
        fix="every rank must pass the same whole-sequence cu_doc_lens (the one given to shard_batch)",
        local_error=error,
        shape_fix="every rank must pass its shard of the same tensor (shards have one shape on every rank)",
        dtype_fix="every rank must gather shards of the same dtype",
        settings_fix="pass the same {name} on every rank",
    )
