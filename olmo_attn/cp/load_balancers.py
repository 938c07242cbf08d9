"""Load balancers: how a sequence is cut into context-parallel shards, and how to put it back.

OLMo-core's zig-zag, llama3 and Ulysses balancers. Every balancer is a pure function of ``(cp_rank,
cp_world_size)`` and the inputs: no process group is needed, so all of it is testable on one
process. Each balancer describes its layout as an *index map*: for rank ``r`` a 1-D ``int64``
tensor ``[T_local]`` holding, for every local token, its index in the global sequence, or ``-1`` for
a padding token. ``batch_shard*`` gathers with that map; ``unshard*`` scatters the ranks' shards back
with the maps of all ranks (padding removed), so outputs and gradients can be gathered exactly.

Differences from OLMo-core (documented in the README):

* the llama3 balancer pads as intended (one synthetic trailing document) instead of the reference's
  sign-inverted arithmetic, and needs no ``ring-flash-attn``;
* the llama3 balancer also shards plain sequences (contiguous shards, no document metadata);
* negative ``seq_dims`` are normalised instead of silently padding the wrong axis;
* ``cu_doc_lens`` must also be non-decreasing and integer, and the Ulysses document mode checks
  that the inputs are exactly ``cu_doc_lens[-1]`` long (the reference silently desynchronises).
"""

from __future__ import annotations

import bisect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import StrEnum
from .errors import ShardingArgumentError, ShardingError, ShardingNotSupportedError

PadValue = int | float | bool


class RingAttentionLoadBalancerType(StrEnum):
    """The sharding strategies (values equal the names)."""

    zig_zag = "zig_zag"
    llama3 = "llama3"
    ulysses = "ulysses"

    def get_class(self) -> type[RingAttentionLoadBalancer]:
        if self == RingAttentionLoadBalancerType.zig_zag:
            return RingAttentionZigZagLoadBalancer
        if self == RingAttentionLoadBalancerType.llama3:
            return RingAttentionLlama3LoadBalancer
        if self == RingAttentionLoadBalancerType.ulysses:
            return UlyssesLoadBalancer
        raise NotImplementedError(f"load balancer {self!r} has no implementation")

    def build(self, cp_mesh: Any) -> RingAttentionLoadBalancer:
        """The balancer for this process: rank and size of ``cp_mesh``'s (1-D) process group."""
        import torch.distributed as dist

        pg = cp_mesh.get_group()
        return self.build_for(cp_rank=dist.get_rank(pg), cp_world_size=dist.get_world_size(pg))

    def build_for(self, *, cp_rank: int, cp_world_size: int) -> RingAttentionLoadBalancer:
        """The balancer of rank ``cp_rank`` out of ``cp_world_size`` (no process group needed)."""
        return self.get_class()(cp_rank=cp_rank, cp_world_size=cp_world_size)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_lists(
    inputs: Sequence[torch.Tensor], seq_dims: Sequence[int], pad_values: Sequence[Any] | None
) -> list[int]:
    """Validate the parallel lists and return the normalised (non-negative) sequence axes."""
    if len(inputs) != len(seq_dims):
        raise ShardingArgumentError(
            f"got {len(inputs)} inputs but {len(seq_dims)} seq_dims; pass one sequence axis per input"
        )
    if pad_values is not None and len(pad_values) != len(inputs):
        raise ShardingArgumentError(
            f"got {len(inputs)} inputs but {len(pad_values)} pad_values; pass one pad value per input "
            "(or pad_values=None)"
        )
    dims = []
    for i, (x, d) in enumerate(zip(inputs, seq_dims)):
        if not isinstance(x, torch.Tensor):
            raise ShardingArgumentError(f"inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if not -x.dim() <= d < x.dim():
            raise ShardingArgumentError(
                f"seq_dims[{i}]={d} is out of range for inputs[{i}] of shape {tuple(x.shape)}"
            )
        dims.append(d % x.dim())
    return dims


def _pad_value(pad_values: Sequence[Any] | None, i: int) -> Any:
    return None if pad_values is None else pad_values[i]


def _check_cu(cu_doc_lens: torch.Tensor) -> tuple[int, ...]:
    """Validate ``cu_doc_lens`` (CPU, 1-D, integer, starts at 0, non-decreasing); return its values."""
    if not isinstance(cu_doc_lens, torch.Tensor):
        raise ShardingError(f"cu_doc_lens must be a torch.Tensor, got {type(cu_doc_lens).__name__}")
    if cu_doc_lens.device.type != "cpu":
        raise ShardingError(
            f"cu_doc_lens must be on the CPU for sharding, got device {cu_doc_lens.device}; "
            "pass cu_doc_lens.cpu() (the balancer returns CPU metadata you can move to the GPU)"
        )
    if cu_doc_lens.dim() != 1:
        raise ShardingError(f"cu_doc_lens must be 1-D [n_docs + 1], got shape {tuple(cu_doc_lens.shape)}")
    if cu_doc_lens.dtype.is_floating_point or cu_doc_lens.dtype.is_complex or cu_doc_lens.dtype == torch.bool:
        raise ShardingError(f"cu_doc_lens must have an integer dtype (int32/int64), got {cu_doc_lens.dtype}")
    values = tuple(int(v) for v in cu_doc_lens.tolist())
    if len(values) < 2:
        raise ShardingError(f"cu_doc_lens needs at least 2 entries ([0, total]), got {list(values)}")
    if values[0] != 0:
        raise ShardingError(
            f"cu_doc_lens must start with 0, got cu_doc_lens[0]={values[0]}; prepend a 0 to the "
            "cumulative document lengths"
        )
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ShardingError(
                f"cu_doc_lens must be non-decreasing, but cu_doc_lens[{i}]={values[i]} < "
                f"cu_doc_lens[{i - 1}]={values[i - 1]}"
            )
    return values


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor, pad_value: Any, what: str) -> torch.Tensor:
    """``x`` gathered along ``dim`` at ``index`` (``-1`` → ``pad_value``); contiguous result."""
    index = index.to(x.device)
    pad = index < 0
    n_pad = int(pad.sum())
    if n_pad and pad_value is None:
        raise ShardingError(
            f"{what} needs {n_pad} padding element(s) on this rank but no pad value was given; pass "
            "pad_values=[...] (one per input, e.g. 0 for token ids, 0.0 for RoPE buffers, the loss's "
            "ignore_index for labels)"
        )
    if n_pad == index.numel():
        shape = list(x.shape)
        shape[dim] = index.numel()
        return torch.full(shape, pad_value, dtype=x.dtype, device=x.device)
    out = x.index_select(dim, index.clamp(min=0))
    if n_pad:
        view = [1] * x.dim()
        view[dim] = -1
        out = out.masked_fill(pad.view(view), pad_value)
    return out.contiguous()


def _gather_all(
    inputs: Sequence[torch.Tensor],
    dims: Sequence[int],
    index: torch.Tensor,
    pad_values: list[PadValue] | None,
) -> list[torch.Tensor]:
    """:func:`_gather` of every input along its sequence dim with its own pad value."""
    return [
        _gather(x, d, index, _pad_value(pad_values, i), f"inputs[{i}]")
        for i, (x, d) in enumerate(zip(inputs, dims))
    ]


def _chunk_index(starts: torch.Tensor, lengths: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Concatenate ``arange(start, start + length)`` per chunk; positions ``>= end`` become ``-1``.

    Host index arithmetic in NumPy: tiny torch ops on the intra-op thread pool cost milliseconds
    each on a busy machine.
    """
    lengths_np = lengths.numpy().astype(np.int64)
    total = int(lengths_np.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    first = np.cumsum(lengths_np) - lengths_np  # exclusive prefix sum
    offset = np.arange(total, dtype=np.int64) - np.repeat(first, lengths_np)
    idx = np.repeat(starts.numpy().astype(np.int64), lengths_np) + offset
    end = np.repeat(ends.numpy().astype(np.int64), lengths_np)
    return torch.from_numpy(np.where(idx < end, idx, -1))


def _scatter_back(
    shards: Sequence[torch.Tensor],
    seq_dim: int,
    indices: Sequence[torch.Tensor],
    length: int | None,
    fill_value: Any,
) -> torch.Tensor:
    """Inverse of :func:`_gather` over all ranks: global tensor ``[..., length, ...]``."""
    if len(shards) != len(indices):
        raise ShardingArgumentError(
            f"got {len(shards)} shards but the balancer has {len(indices)} ranks; pass one shard per rank "
            "in rank order"
        )
    dim = seq_dim % shards[0].dim()
    for r, (s, idx) in enumerate(zip(shards, indices)):
        if s.shape[dim] != idx.numel():
            raise ShardingArgumentError(
                f"shard of rank {r} has {s.shape[dim]} elements along seq_dim={seq_dim}, but this layout "
                f"gives rank {r} {idx.numel()} tokens; pass the shards exactly as batch_shard returned them"
            )
    flat = torch.cat(list(shards), dim=dim)
    index = torch.cat([i.to(torch.int64) for i in indices]).to(flat.device)
    positions = torch.nonzero(index >= 0).flatten()
    order = torch.argsort(index[positions])
    out = flat.index_select(dim, positions[order])
    n = out.shape[dim]
    if length is not None and length != n:
        if length < n:
            raise ShardingArgumentError(f"length={length} is shorter than the {n} sharded real tokens")
        shape = list(out.shape)
        shape[dim] = length - n
        out = torch.cat([out, torch.full(shape, fill_value, dtype=out.dtype, device=out.device)], dim=dim)
    return out


def _check_same_length(inputs: Sequence[torch.Tensor], dims: Sequence[int]) -> int:
    lengths = {x.shape[d] for x, d in zip(inputs, dims)}
    if len(lengths) > 1:
        raise ShardingArgumentError(
            f"all inputs must have the same length along their seq_dims, got {sorted(lengths)}"
        )
    if not lengths:
        raise ShardingArgumentError("inputs is empty; pass at least one tensor to shard")
    return lengths.pop()


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------


class RingAttentionLoadBalancer(ABC):
    """Shards inputs along their sequence axis for one context-parallel rank.

    Subclasses define the layout by :meth:`shard_index` (plain) and :meth:`shard_index_by_document`
    (packed documents); sharding and unsharding are derived from those maps.
    """

    #: default multiple of the *global* length in :meth:`batch_shard` (in units of the world size)
    _default_multiple_factor: int = 1

    def __init__(self, *, cp_rank: int, cp_world_size: int):
        if isinstance(cp_world_size, bool) or not isinstance(cp_world_size, int) or cp_world_size < 1:
            raise ShardingArgumentError(f"cp_world_size must be a positive int, got {cp_world_size!r}")
        if isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_world_size:
            raise ShardingArgumentError(
                f"cp_rank={cp_rank!r} is not a rank of a world of size {cp_world_size} (0..{cp_world_size - 1})"
            )
        self.cp_rank = cp_rank
        self.cp_world_size = cp_world_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cp_rank={self.cp_rank}, cp_world_size={self.cp_world_size})"

    def _rank(self, rank: int | None) -> int:
        r = self.cp_rank if rank is None else rank
        if not 0 <= r < self.cp_world_size:
            raise ShardingArgumentError(f"rank={r} is not in 0..{self.cp_world_size - 1}")
        return r

    # ----- layout -------------------------------------------------------------------------------
    @property
    def default_length_multiple(self) -> int:
        return self._default_multiple_factor * self.cp_world_size

    def _resolve_multiple(self, length_multiple: int | None) -> int:
        base = self.default_length_multiple
        if length_multiple is None:
            return base
        if isinstance(length_multiple, bool) or not isinstance(length_multiple, int) or length_multiple < 1:
            raise ShardingError(f"length_multiple must be a positive int, got {length_multiple!r}")
        if length_multiple % base:
            raise ShardingError(
                f"length_multiple={length_multiple} must be a multiple of {base} "
                f"({self._default_multiple_factor} x cp_world_size={self.cp_world_size}) for "
                f"{type(self).__name__}; use e.g. {base * max(1, length_multiple // base)}"
            )
        return length_multiple

    def padded_length(self, length: int, length_multiple: int | None = None) -> int:
        """Global length after :meth:`batch_shard`'s padding."""
        m = self._resolve_multiple(length_multiple)
        return -(-length // m) * m

    @abstractmethod
    def shard_index(self, length: int, *, length_multiple: int | None = None, rank: int | None = None):
        """``int64 [T_local]``: global index of each local token of :meth:`batch_shard` (``-1`` = pad)."""

    def shard_index_by_document(
        self,
        cu_doc_lens: torch.Tensor,
        *,
        length_multiple: int | None = None,
        pad: bool = True,
        rank: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Index map and metadata of :meth:`batch_shard_by_document` for ``rank`` (default: own)."""
        raise ShardingNotSupportedError(f"{type(self).__name__} has no document layout")

    # ----- sharding -----------------------------------------------------------------------------
    def pad(
        self, x: torch.Tensor, seq_dim: int, value: PadValue, length_multiple: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """Pad ``x`` at the end of ``seq_dim`` to the next multiple; return ``(padded, n_added)``."""
        dim = _check_lists([x], [seq_dim], None)[0]
        n = x.shape[dim]
        n_add = self.padded_length(n, length_multiple) - n
        if n_add == 0:
            return x, 0
        shape = list(x.shape)
        shape[dim] = n_add
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim), n_add

    def batch_shard(
        self,
        *,
        inputs: list[torch.Tensor],
        seq_dims: list[int],
        pad_values: list[PadValue] | None = None,
        length_multiple: int | None = None,
    ) -> list[torch.Tensor]:
        """This rank's shard of every input (same length along every ``seq_dims[i]``)."""
        dims = _check_lists(inputs, seq_dims, pad_values)
        n = _check_same_length(inputs, dims)
        index = self.shard_index(n, length_multiple=length_multiple)
        if pad_values is None and self.padded_length(n, length_multiple) != n:
            raise ShardingError(
                f"sequence length {n} is not a multiple of "
                f"{self._resolve_multiple(length_multiple)} and no pad_values were given; pass pad_values "
                "(one per input) or trim the inputs"
            )
        return _gather_all(inputs, dims, index, pad_values)

    @abstractmethod
    def batch_shard_by_document(
        self,
        *,
        inputs: list[torch.Tensor],
        seq_dims: list[int],
        cu_doc_lens: torch.Tensor,
        pad_values: list[PadValue] | None = None,
        length_multiple: int | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Shard packed documents (``B == 1``) and return this rank's attention metadata."""

    # ----- unsharding ---------------------------------------------------------------------------
    def unshard(
        self,
        shards: Sequence[torch.Tensor],
        *,
        seq_dim: int,
        length: int,
        length_multiple: int | None = None,
    ) -> torch.Tensor:
        """Inverse of :meth:`batch_shard`: the ranks' shards (rank order) → global ``length`` tokens."""
        indices = [
            self.shard_index(length, length_multiple=length_multiple, rank=r)
            for r in range(self.cp_world_size)
        ]
        return _scatter_back(shards, seq_dim, indices, None, 0)

    def unshard_by_document(
        self,
        shards: Sequence[torch.Tensor],
        *,
        seq_dim: int,
        cu_doc_lens: torch.Tensor,
        length_multiple: int | None = None,
        length: int | None = None,
        fill_value: PadValue = 0,
    ) -> torch.Tensor:
        """Inverse of :meth:`batch_shard_by_document` (padding removed).

        Returns ``cu_doc_lens[-1]`` tokens along ``seq_dim``, or ``length`` with the tokens the
        sharding dropped (after ``cu_doc_lens[-1]``) set to ``fill_value``.
        """
        indices = [
            self.shard_index_by_document(cu_doc_lens, length_multiple=length_multiple, rank=r)[0]
            for r in range(self.cp_world_size)
        ]
        return _scatter_back(shards, seq_dim, indices, length, fill_value)


# ----------------------------------------------------------------------------------------------
# zig-zag
# ----------------------------------------------------------------------------------------------


class RingAttentionZigZagLoadBalancer(RingAttentionLoadBalancer):
    """Zig-zag: ``2W`` equal chunks, rank ``r`` keeps chunks ``r`` and ``2W − 1 − r``.

    Under causal attention every rank then has the same amount of work. In document mode every
    document is split that way on its own, so all ranks share one local ``cu_doc_lens``.
    """

    _default_multiple_factor = 2

    def _chunks(self, start: torch.Tensor, chunk: torch.Tensor, end: torch.Tensor, r: int) -> torch.Tensor:
        """Per segment: chunks ``r`` and ``2W−1−r`` of size ``chunk`` starting at ``start``."""
        W = self.cp_world_size
        starts = torch.stack([start + r * chunk, start + (2 * W - 1 - r) * chunk], dim=1).flatten()
        lengths = torch.stack([chunk, chunk], dim=1).flatten()
        ends = torch.stack([end, end], dim=1).flatten()
        return _chunk_index(starts, lengths, ends)

    def shard_index(self, length: int, *, length_multiple: int | None = None, rank: int | None = None):
        r = self._rank(rank)
        n_pad = self.padded_length(length, length_multiple)
        chunk = torch.tensor([n_pad // (2 * self.cp_world_size)])
        return self._chunks(torch.tensor([0]), chunk, torch.tensor([length]), r)

    def shard_index_by_document(
        self,
        cu_doc_lens: torch.Tensor,
        *,
        length_multiple: int | None = None,
        pad: bool = True,
        rank: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        r = self._rank(rank)
        W = self.cp_world_size
        cu = _check_cu(cu_doc_lens)
        lens = torch.tensor(list(itertools.pairwise(cu)), dtype=torch.int64).reshape(-1, 2)
        starts, ends = lens[:, 0], lens[:, 1]
        doc_len = ends - starts
        padded = -(-doc_len // (2 * W)) * (2 * W)
        if not pad and bool((padded != doc_len).any()):
            bad = int(torch.nonzero(padded != doc_len)[0])
            raise ShardingError(
                f"document {bad} has length {int(doc_len[bad])}, not a multiple of 2 * cp_world_size = {2 * W}, "
                "and no pad_values were given; pass pad_values (one per input) so every document is padded"
            )
        index = self._chunks(starts, padded // (2 * W), ends, r)
        local_len = index.numel()
        final_pad = 0
        if length_multiple is not None:
            if (
                isinstance(length_multiple, bool)
                or not isinstance(length_multiple, int)
                or length_multiple < 1
            ):
                raise ShardingError(f"length_multiple must be a positive int, got {length_multiple!r}")
            final_pad = (-local_len) % length_multiple
            index = torch.cat([index, torch.full((final_pad,), -1, dtype=torch.int64)])
        padded_cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(padded, 0)])
        local_cu = padded_cu // W
        if length_multiple is not None:
            local_cu = torch.cat([local_cu, local_cu[-1:] + final_pad])
        meta = {
            "cu_doc_lens": local_cu.to(cu_doc_lens.dtype),
            "max_doc_len": int((local_cu[1:] - local_cu[:-1]).max()),
        }
        return index, meta

    def batch_shard_by_document(
        self,
        *,
        inputs: list[torch.Tensor],
        seq_dims: list[int],
        cu_doc_lens: torch.Tensor,
        pad_values: list[PadValue] | None = None,
        length_multiple: int | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        dims = _check_lists(inputs, seq_dims, pad_values)
        index, meta = self.shard_index_by_document(
            cu_doc_lens, length_multiple=length_multiple, pad=pad_values is not None
        )
        total = int(cu_doc_lens[-1])
        for i, (x, d) in enumerate(zip(inputs, dims)):
            if x.shape[d] < total:
                raise ShardingError(
                    f"inputs[{i}] has {x.shape[d]} elements along seq_dim={seq_dims[i]}, fewer than "
                    f"cu_doc_lens[-1]={total}; cu_doc_lens must describe this input"
                )
        if pad_values is None and length_multiple is not None and bool((index < 0).any()):
            raise ShardingError(
                f"must provide a 'pad_value' when 'length_multiple' is specified (length_multiple="
                f"{length_multiple} needs padding on this rank); pass pad_values (one per input)"
            )
        return _gather_all(inputs, dims, index, pad_values), meta


# ----------------------------------------------------------------------------------------------
# llama3
# ----------------------------------------------------------------------------------------------


def llama3_metadata(cu: Sequence[int], rank: int, world_size: int) -> dict[str, Any]:
    """Per-rank query/key segmentation of the llama3 layout (ring-flash-attn's preparation) from padded offsets ``cu``.

    ``cu[-1]`` must be a multiple of ``world_size``. Returns plain ints and a ``slice``; the
    balancer turns the offsets into tensors.
    """
    n = cu[-1]
    L = n // world_size
    a, e = rank * L, (rank + 1) * L
    left = bisect.bisect_right(cu, a) - 1  # document containing position a
    right = bisect.bisect_left(cu, e)  # first boundary at or after the end of the slice
    seg = list(cu[left : right + 1])
    cu_q = [x - a for x in seg]
    cu_q[0], cu_q[-1] = 0, L
    cu_k = list(seg)
    cu_k[-1] = e
    cu_k = [x - seg[0] for x in cu_k]
    return {
        "cu_doc_lens_q": cu_q,
        "cu_doc_lens_k": cu_k,
        "max_doc_len_q": max(b - a_ for a_, b in itertools.pairwise(cu_q)),
        "max_doc_len_k": max(b - a_ for a_, b in itertools.pairwise(cu_k)),
        "local_k_slice": slice(seg[0], e),
    }


class RingAttentionLlama3LoadBalancer(RingAttentionLoadBalancer):
    """Llama3: contiguous shards plus per-rank query/key document offsets.

    With documents, rank ``r`` keeps ``[r·L, (r+1)·L)`` of the packed sequence padded (as one
    synthetic trailing document) to a multiple of ``W`` (or ``length_multiple · W``). Without
    documents (:meth:`batch_shard`), rank ``r`` keeps ``[r·L, (r+1)·L)`` of every row, the sequence
    padded at its end to a multiple of ``W``; llama3 ring attention then needs no metadata (rank
    ``r``'s queries see keys ``[0, (r+1)·L)``).
    """

    def shard_index(self, length: int, *, length_multiple: int | None = None, rank: int | None = None):
        r = self._rank(rank)
        L = self.padded_length(length, length_multiple) // self.cp_world_size
        index = torch.arange(r * L, (r + 1) * L, dtype=torch.int64)
        return torch.where(index < length, index, torch.full_like(index, -1))

    def _padded_cu(self, cu: tuple[int, ...], length_multiple: int | None) -> tuple[int, ...]:
        if length_multiple is not None and (
            isinstance(length_multiple, bool) or not isinstance(length_multiple, int) or length_multiple < 1
        ):
            raise ShardingError(f"length_multiple must be a positive int, got {length_multiple!r}")
        m = self.cp_world_size * (1 if length_multiple is None else length_multiple)
        n = cu[-1]
        if n == 0:
            raise ShardingError("cu_doc_lens describes no tokens (cu_doc_lens[-1] == 0); nothing to shard")
        pad = (-n) % m
        return (*cu, n + pad) if pad else cu

    def shard_index_by_document(
        self,
        cu_doc_lens: torch.Tensor,
        *,
        length_multiple: int | None = None,
        pad: bool = True,
        rank: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        r = self._rank(rank)
        cu = _check_cu(cu_doc_lens)
        n = cu[-1]
        cu_p = self._padded_cu(cu, length_multiple)
        if not pad and cu_p[-1] != n:
            raise ShardingError(
                f"the packed length {n} is not a multiple of {self.cp_world_size * (length_multiple or 1)} "
                "(cp_world_size x length_multiple) and no pad_values were given; pass pad_values (one per "
                "input) to append a padding document"
            )
        L = cu_p[-1] // self.cp_world_size
        index = torch.arange(r * L, (r + 1) * L, dtype=torch.int64)
        index = torch.where(index < n, index, torch.full_like(index, -1))
        meta = llama3_metadata(cu_p, r, self.cp_world_size)
        for key in ("cu_doc_lens_q", "cu_doc_lens_k"):
            meta[key] = torch.tensor(meta[key], dtype=cu_doc_lens.dtype)
        return index, meta

    def batch_shard_by_document(
        self,
        *,
        inputs: list[torch.Tensor],
        seq_dims: list[int],
        cu_doc_lens: torch.Tensor,
        pad_values: list[PadValue] | None = None,
        length_multiple: int | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        dims = _check_lists(inputs, seq_dims, pad_values)
        index, meta = self.shard_index_by_document(
            cu_doc_lens, length_multiple=length_multiple, pad=pad_values is not None
        )
        total = int(cu_doc_lens[-1])
        for i, (x, d) in enumerate(zip(inputs, dims)):
            if x.shape[d] != total:
                raise ShardingError(
                    f"inputs[{i}] has {x.shape[d]} elements along seq_dim={seq_dims[i]} but cu_doc_lens[-1]="
                    f"{total}; the llama3 balancer needs every input to be exactly the packed documents"
                )
        return _gather_all(inputs, dims, index, pad_values), meta


# ----------------------------------------------------------------------------------------------
# Ulysses
# ----------------------------------------------------------------------------------------------


class UlyssesLoadBalancer(RingAttentionLoadBalancer):
    """Contiguous shards; document metadata stays global (attention sees the whole sequence)."""

    _default_multiple_factor = 1

    def shard_index(self, length: int, *, length_multiple: int | None = None, rank: int | None = None):
        r = self._rank(rank)
        L = self.padded_length(length, length_multiple) // self.cp_world_size
        index = torch.arange(r * L, (r + 1) * L, dtype=torch.int64)
        return torch.where(index < length, index, torch.full_like(index, -1))

    def shard_index_by_document(
        self,
        cu_doc_lens: torch.Tensor,
        *,
        length_multiple: int | None = None,
        pad: bool = True,
        rank: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cu = _check_cu(cu_doc_lens)
        n = cu[-1]
        n_pad = self.padded_length(n, length_multiple) - n
        if not pad and n_pad:
            raise ShardingError(
                f"the packed length {n} is not a multiple of {self._resolve_multiple(length_multiple)} and no "
                "pad_values were given; pass pad_values (one per input)"
            )
        index = self.shard_index(n, length_multiple=length_multiple, rank=rank)
        max_doc_len = max(b - a for a, b in itertools.pairwise(cu))
        cu_out = cu_doc_lens.clone()
        if n_pad:
            cu_out = torch.cat([cu_out, torch.tensor([n + n_pad], dtype=cu_doc_lens.dtype)])
            max_doc_len = max(max_doc_len, n_pad)
        return index, {"cu_doc_lens": cu_out, "max_doc_len": int(max_doc_len)}

    def batch_shard_by_document(
        self,
        *,
        inputs: list[torch.Tensor],
        seq_dims: list[int],
        cu_doc_lens: torch.Tensor,
        pad_values: list[PadValue] | None = None,
        length_multiple: int | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        dims = _check_lists(inputs, seq_dims, pad_values)
        self._resolve_multiple(length_multiple)
        index, meta = self.shard_index_by_document(
            cu_doc_lens, length_multiple=length_multiple, pad=pad_values is not None
        )
        total = int(cu_doc_lens[-1])
        for i, (x, d) in enumerate(zip(inputs, dims)):
            if x.shape[d] != total:
                raise ShardingError(
                    f"inputs[{i}] has {x.shape[d]} elements along seq_dim={seq_dims[i]} but cu_doc_lens[-1]="
                    f"{total}; cu_doc_lens must cover exactly the packed inputs"
                )
        return _gather_all(inputs, dims, index, pad_values), meta


__all__ = [
    "RingAttentionLlama3LoadBalancer",
    "RingAttentionLoadBalancer",
    "RingAttentionLoadBalancerType",
    "RingAttentionZigZagLoadBalancer",
    "UlyssesLoadBalancer",
    "llama3_metadata",
]
