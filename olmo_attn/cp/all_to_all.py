"""All-to-all layout transforms between sequence-sharded and head-sharded tensors.

``cp2hp``: ``[B, T_l, H, D]`` on every rank → ``[B, W·T_l, H/W, D]``: the full sequence (the ranks'
shards concatenated in rank order) for this rank's block of ``H/W`` heads. ``hp2cp`` is the exact
inverse. Both are autograd-aware: the backward pass performs the inverse exchange. 3-D inputs
``[B, T_l, C]`` are treated as ``D = 1`` (channels are exchanged instead of heads) and stay 3-D.

One generic primitive does the work: split the tensor into ``W`` blocks along ``scatter_dim``, send
block ``s`` to rank ``s``, and concatenate the received blocks along ``gather_dim`` in rank order.
Its adjoint is the same primitive with the two axes swapped. The batched variants pack every
tensor into one buffer and use a single collective; unlike OLMo-core they accept tensors of
different shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import ContextParallelInputError, CPDivisibilityError

ProcessGroup = Any


def _world(group: ProcessGroup) -> int:
    return dist.get_world_size(group)


def _send_blocks(x: torch.Tensor, W: int, scatter_dim: int) -> torch.Tensor:
    """``[W, ...block]``: ``x`` split into ``W`` equal blocks along ``scatter_dim``, block-major."""
    shape = list(x.shape)
    shape[scatter_dim : scatter_dim + 1] = [W, shape[scatter_dim] // W]
    return x.reshape(shape).movedim(scatter_dim, 0).contiguous()


def _join_blocks(recv: torch.Tensor, gather_dim: int) -> torch.Tensor:
    """Inverse layout step: ``recv [W, ...block]`` → blocks concatenated along ``gather_dim``."""
    moved = recv.movedim(0, gather_dim)  # [..., W, block_len, ...]
    shape = list(moved.shape)
    shape[gather_dim : gather_dim + 2] = [shape[gather_dim] * shape[gather_dim + 1]]
    return moved.reshape(shape)


def _check_divisible(x: torch.Tensor, dim: int, W: int, what: str, fix: str) -> None:
    if x.shape[dim] % W:
        raise CPDivisibilityError(
            f"{what}: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) is not divisible by the "
            f"context-parallel world size {W}; {fix}"
        )


def _exchange(
    xs: Sequence[torch.Tensor], W: int, scatter_dims: Sequence[int], gather_dims: Sequence[int], group
):
    """One ``all_to_all_single`` for all tensors; returns the re-laid-out tensors (no autograd)."""
    sends = [_send_blocks(x, W, sd) for x, sd in zip(xs, scatter_dims)]
    if W == 1:  # copies, so autograd never sees an output aliasing an input
        return [_join_blocks(s, gd).clone() for s, gd in zip(sends, gather_dims)]
    flat = torch.cat([s.reshape(W, -1) for s in sends], dim=1) if len(sends) > 1 else sends[0].reshape(W, -1)
    recv = torch.empty_like(flat)
    dist.all_to_all_single(recv, flat, group=group)
    outs = []
    offset = 0
    for s, gd in zip(sends, gather_dims):
        n = s[0].numel()
        block = recv[:, offset : offset + n].reshape(s.shape)
        offset += n
        outs.append(_join_blocks(block, gd))
    return outs


class _AllToAll(torch.autograd.Function):
    """Autograd wrapper: forward exchanges (scatter → gather); backward exchanges (gather → scatter)."""

    @staticmethod
    def forward(ctx, group, scatter_dims, gather_dims, *xs):  # type: ignore[override]
        ctx.group = group
        ctx.scatter_dims = scatter_dims
        ctx.gather_dims = gather_dims
        W = _world(group)
        return tuple(_exchange(xs, W, scatter_dims, gather_dims, group))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        W = _world(ctx.group)
        grads = [g.contiguous() for g in grads]
        back = _exchange(grads, W, ctx.gather_dims, ctx.scatter_dims, ctx.group)
        return (None, None, None, *back)


def all_to_all(
    xs: Sequence[torch.Tensor],
    group: ProcessGroup,
    *,
    scatter_dims: Sequence[int],
    gather_dims: Sequence[int],
) -> list[torch.Tensor]:
    """Generic autograd-aware all-to-all of several tensors in one collective.

    For each tensor: split into ``W`` blocks along ``scatter_dims[i]``, block ``s`` goes to rank ``s``;
    the received blocks are concatenated in rank order along ``gather_dims[i]``.
    """
    if len(xs) == 0:
        return []
    W = _world(group)
    dims_s = [d % x.dim() for x, d in zip(xs, scatter_dims)]
    dims_g = [d % x.dim() for x, d in zip(xs, gather_dims)]
    for i, (x, d) in enumerate(zip(xs, dims_s)):
        _check_divisible(x, d, W, f"all_to_all input {i}", "pad or choose a world size that divides it")
    return list(_AllToAll.apply(group, tuple(dims_s), tuple(dims_g), *xs))


def _check_rank(x: torch.Tensor, name: str) -> None:
    if x.dim() not in (3, 4):
        raise ContextParallelInputError(
            f"{name} expects a 4-D [B, T, H, D] or 3-D [B, T, C] tensor, got shape {tuple(x.shape)}"
        )


def all_to_all_single_cp2hp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sequence-sharded ``[B, T_l, H, D]`` (or ``[B, T_l, C]``) → head-sharded ``[B, W·T_l, H/W, D]``.

    ``out[b, s·T_l + t, j] = x_on_rank_s[b, t, r·(H/W) + j]`` on rank ``r``. ``T_l`` must be equal on all
    ranks.
    """
    _check_rank(x, "all_to_all_single_cp2hp")
    W = _world(group)
    _check_divisible(
        x, 2, W, "all_to_all_single_cp2hp heads", "use a head count divisible by the CP world size"
    )
    return all_to_all([x], group, scatter_dims=[2], gather_dims=[1])[0]


def all_to_all_single_hp2cp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Head-sharded ``[B, T, H_l, D]`` → sequence-sharded ``[B, T/W, W·H_l, D]`` (inverse of cp2hp)."""
    _check_rank(x, "all_to_all_single_hp2cp")
    W = _world(group)
    _check_divisible(
        x, 1, W, "all_to_all_single_hp2cp sequence", "pad the sequence to a multiple of the CP world size"
    )
    return all_to_all([x], group, scatter_dims=[1], gather_dims=[2])[0]


def all_to_all_cp2hp(xs: Sequence[torch.Tensor], group: ProcessGroup) -> list[torch.Tensor]:
    """:func:`all_to_all_single_cp2hp` of every tensor in one collective (shapes may differ)."""
    for i, x in enumerate(xs):
        _check_rank(x, f"all_to_all_cp2hp input {i}")
        _check_divisible(
            x, 2, _world(group), f"all_to_all_cp2hp input {i} heads", "use a head count divisible by W"
        )
    return all_to_all(list(xs), group, scatter_dims=[2] * len(xs), gather_dims=[1] * len(xs))


def all_to_all_hp2cp(xs: Sequence[torch.Tensor], group: ProcessGroup) -> list[torch.Tensor]:
    """:func:`all_to_all_single_hp2cp` of every tensor in one collective (shapes may differ)."""
    for i, x in enumerate(xs):
        _check_rank(x, f"all_to_all_hp2cp input {i}")
        _check_divisible(
            x, 1, _world(group), f"all_to_all_hp2cp input {i} sequence", "pad the sequence to a multiple of W"
        )
    return all_to_all(list(xs), group, scatter_dims=[1] * len(xs), gather_dims=[2] * len(xs))


def _check_packed(x: torch.Tensor, name: str) -> None:
    if x.dim() != 5 or x.shape[2] != 3:
        raise ContextParallelInputError(
            f"{name} expects packed qkv [B, T, 3, H, D], got shape {tuple(x.shape)}"
        )


def all_to_all_single_cp2hp_qkvpacked(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Packed ``[B, T_l, 3, H, D]`` → ``[B, W·T_l, 3, H/W, D]``."""
    _check_packed(x, "all_to_all_single_cp2hp_qkvpacked")
    _check_divisible(
        x, 3, _world(group), "all_to_all_single_cp2hp_qkvpacked heads", "use a head count divisible by W"
    )
    return all_to_all([x], group, scatter_dims=[3], gather_dims=[1])[0]


def all_to_all_single_hp2cp_qkvpacked(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Packed ``[B, T, 3, H_l, D]`` → ``[B, T/W, 3, W·H_l, D]`` (inverse of the above)."""
    _check_packed(x, "all_to_all_single_hp2cp_qkvpacked")
    _check_divisible(
        x,
        1,
        _world(group),
        "all_to_all_single_hp2cp_qkvpacked sequence",
        "pad the sequence to a multiple of W",
    )
    return all_to_all([x], group, scatter_dims=[1], gather_dims=[3])[0]


__all__ = [
    "all_to_all",
    "all_to_all_cp2hp",
    "all_to_all_hp2cp",
    "all_to_all_single_cp2hp",
    "all_to_all_single_cp2hp_qkvpacked",
    "all_to_all_single_hp2cp",
    "all_to_all_single_hp2cp_qkvpacked",
]
