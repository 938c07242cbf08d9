"""Validation and resolution of the masking arguments every backend receives.

The one place that checks ``cu_doc_lens`` & co. Backends never see raw user arguments: they get a
validated :class:`DocSegments` (or ``None``) and a window tuple whose meaning is fixed by
``docs/CONVENTIONS.md`` (bottom-right causal alignment, inclusive ``(left, right)``, ``-1`` = unbounded).
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .exceptions import InvalidInputError, InvalidInputTypeError


@dataclass(frozen=True)
class DocSegments:
    """Validated document segmentation over flattened tokens.

    Attributes:
        cu_q: ``[n_seg + 1]`` int32 offsets into the flattened queries (``B * Tq`` of them).
        cu_k: ``[n_seg + 1]`` int32 offsets into the flattened keys (same object as ``cu_q`` when
            queries and keys share one segmentation).
        max_q, max_k: longest query / key segment.
        cu_q_host, cu_k_host: the same offsets as Python ints (kernels that build block masks on the
            host need them; reading them costs one device sync per distinct tensor, cached).
            ``None`` while ``torch.compile`` traces: the offsets then stay on the device, unread
            and unvalidated, so a new document layout neither breaks the graph nor recompiles it.
        local_k_slice: llama3 CP only: which rows of the all-gathered keys this rank uses.
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    cu_q_host: tuple[int, ...] | None
    cu_k_host: tuple[int, ...] | None
    local_k_slice: slice | None = None

    @property
    def shared(self) -> bool:
        """True when queries and keys use the same segmentation (plain packed documents)."""
        if self.cu_q_host is None or self.cu_k_host is None:
            return self.cu_q is self.cu_k
        return self.cu_q_host == self.cu_k_host

    @property
    def n_segments(self) -> int:
        return self.cu_q.numel() - 1


_HOST_CACHE: OrderedDict[tuple, tuple[weakref.ref, tuple[int, ...]]] = OrderedDict()


def _host_values(t: torch.Tensor) -> tuple[int, ...]:
    """``t.tolist()`` as a tuple, cached per (storage, version) so 32 layers pay one sync.

    The entry also holds a weak reference to the tensor: a new tensor allocated at a freed one's
    address (same pointer, size and version) must not inherit its values.
    """
    key = (t.device, t.data_ptr(), t.storage_offset(), t.numel(), t._version)
    entry = _HOST_CACHE.get(key)
    if entry is not None and entry[0]() is t:
        return entry[1]
    values = tuple(int(x) for x in t.tolist())
    _HOST_CACHE[key] = (weakref.ref(t), values)
    _HOST_CACHE.move_to_end(key)
    if len(_HOST_CACHE) > 64:
        _HOST_CACHE.popitem(last=False)
    return values


def check_cu_seqlens_meta(cu: torch.Tensor, name: str) -> None:
    """The checks of :func:`validate_cu_seqlens` that read no values (type, dtype, shape, device)."""
    if not isinstance(cu, torch.Tensor):
        raise InvalidInputTypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise InvalidInputTypeError(
            f"{name} must have dtype torch.int32, got {cu.dtype}; pass {name}.to(torch.int32)"
        )
    if cu.dim() != 1:
        raise InvalidInputError(f"{name} must be 1-D [n_docs + 1], got shape {tuple(cu.shape)}")
    if cu.numel() < 2:
        raise InvalidInputError(f"{name} needs at least 2 entries ([0, total]), got {cu.numel()}")
    if cu.device.type == "meta":
        raise InvalidInputError(
            f"{name} is on the meta device and holds no values; document offsets must be real: build "
            f"{name} on the CPU or on the inputs' device"
        )


def validate_cu_seqlens(cu: torch.Tensor, name: str, total: int) -> tuple[int, ...]:
    """Check a cumulative-length tensor and return its values; raise
    :class:`InvalidInputTypeError` (a ``TypeError``) / :class:`InvalidInputError` (a ``ValueError``)."""
    check_cu_seqlens_meta(cu, name)
    values = _host_values(cu)
    if values[0] != 0:
        raise InvalidInputError(
            f"{name}[0] must be 0, got {values[0]}; prepend a 0 to the cumulative lengths"
        )
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise InvalidInputError(
                f"{name} must be non-decreasing, but {name}[{i}]={values[i]} < {name}[{i - 1}]={values[i - 1]}"
            )
    if values[-1] != total:
        raise InvalidInputError(
            f"{name}[-1]={values[-1]} must equal the number of flattened tokens ({total}); "
            "documents must cover the whole (batch * sequence), including any padding document"
        )
    return values


def _max_len(values: tuple[int, ...]) -> int:
    return max(b - a for a, b in itertools.pairwise(values))


def _check_max(name: str, given: int | None, actual: int) -> int:
    if given is None:
        return actual
    if not isinstance(given, int) or isinstance(given, bool):
        raise InvalidInputTypeError(f"{name} must be a Python int, got {type(given).__name__}")
    if given < actual:
        raise InvalidInputError(
            f"{name}={given} is smaller than the longest document ({actual}); pass {name}={actual}"
        )
    return given


def _traced_doc_segments(
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    cu_doc_lens_q: torch.Tensor | None,
    cu_doc_lens_k: torch.Tensor | None,
    mq: int | None,
    mk: int | None,
    max_doc_len_q: int | None,
    max_doc_len_k: int | None,
    total_q: int,
    total_k: int,
    local_k_slice: slice | None,
) -> DocSegments:
    """:func:`resolve_doc_args` while ``torch.compile`` traces: metadata checks only, offsets stay
    on the device (no host read, so no graph break and no recompile per document layout). A missing
    ``max_doc_len`` becomes the token count (an upper bound)."""
    name_q = "cu_doc_lens_q" if cu_doc_lens_q is not None else "cu_doc_lens"
    name_k = "cu_doc_lens_k" if cu_doc_lens_k is not None else "cu_doc_lens"
    check_cu_seqlens_meta(cu_q, name_q)
    if cu_k is not cu_q:
        check_cu_seqlens_meta(cu_k, name_k)
        if cu_q.numel() != cu_k.numel():
            raise InvalidInputError(
                f"cu_doc_lens_q has {cu_q.numel() - 1} segments but cu_doc_lens_k has {cu_k.numel() - 1}; "
                "they must describe the same documents"
            )
    for name, given in (
        ("max_doc_len_q" if max_doc_len_q is not None else "max_doc_len", mq),
        ("max_doc_len_k" if max_doc_len_k is not None else "max_doc_len", mk),
    ):
        if given is not None and (not isinstance(given, int) or isinstance(given, bool)):
            raise InvalidInputTypeError(f"{name} must be a Python int, got {type(given).__name__}")
    return DocSegments(
        cu_q=cu_q,
        cu_k=cu_k,
        max_q=total_q if mq is None else mq,
        max_k=total_k if mk is None else mk,
        cu_q_host=None,
        cu_k_host=None,
        local_k_slice=local_k_slice,
    )


def resolve_doc_args(
    *,
    total_q: int,
    total_k: int,
    cu_doc_lens: torch.Tensor | None = None,
    cu_doc_lens_q: torch.Tensor | None = None,
    cu_doc_lens_k: torch.Tensor | None = None,
    max_doc_len: int | None = None,
    max_doc_len_q: int | None = None,
    max_doc_len_k: int | None = None,
    local_k_slice: slice | None = None,
) -> DocSegments | None:
    """Resolve OLMo-core's six document arguments into one validated :class:`DocSegments`.

    ``cu_doc_lens`` fills whichever of ``cu_doc_lens_q/_k`` is missing (likewise ``max_doc_len``).
    Unlike OLMo-core, a missing ``max_doc_len`` is derived from the offsets instead of silently
    disabling document masking, and a ``max_doc_len`` without offsets is an error.
    ``total_q`` / ``total_k`` are the flattened token counts (``B * T``; for llama3 CP ``total_k`` is
    the length of ``local_k_slice``).
    """
    cu_q = cu_doc_lens_q if cu_doc_lens_q is not None else cu_doc_lens
    cu_k = cu_doc_lens_k if cu_doc_lens_k is not None else cu_doc_lens
    mq = max_doc_len_q if max_doc_len_q is not None else max_doc_len
    mk = max_doc_len_k if max_doc_len_k is not None else max_doc_len
    if cu_q is None and cu_k is None:
        if mq is not None or mk is not None:
            raise InvalidInputError(
                "max_doc_len was given without cu_doc_lens; intra-document masking needs the cumulative "
                "document lengths (cu_doc_lens, int32 [n_docs + 1])"
            )
        if local_k_slice is not None:
            raise InvalidInputError(
                "local_k_slice is only meaningful with cu_doc_lens_q/cu_doc_lens_k (llama3 ring CP)"
            )
        return None
    if cu_q is None or cu_k is None:
        missing = "cu_doc_lens_q" if cu_q is None else "cu_doc_lens_k"
        raise InvalidInputError(
            f"{missing} is missing: pass cu_doc_lens, or both cu_doc_lens_q and cu_doc_lens_k"
        )
    if torch.compiler.is_compiling():
        return _traced_doc_segments(
            cu_q, cu_k, cu_doc_lens_q, cu_doc_lens_k, mq, mk, max_doc_len_q, max_doc_len_k, total_q, total_k,
            local_k_slice,
        )  # fmt: skip
    q_vals = validate_cu_seqlens(
        cu_q, "cu_doc_lens_q" if cu_doc_lens_q is not None else "cu_doc_lens", total_q
    )
    k_vals = (
        q_vals
        if cu_k is cu_q
        else validate_cu_seqlens(
            cu_k, "cu_doc_lens_k" if cu_doc_lens_k is not None else "cu_doc_lens", total_k
        )
    )
    if len(q_vals) != len(k_vals):
        raise InvalidInputError(
            f"cu_doc_lens_q has {len(q_vals) - 1} segments but cu_doc_lens_k has {len(k_vals) - 1}; "
            "they must describe the same documents"
        )
    return DocSegments(
        cu_q=cu_q,
        cu_k=cu_k,
        max_q=_check_max(
            "max_doc_len_q" if max_doc_len_q is not None else "max_doc_len", mq, _max_len(q_vals)
        ),
        max_k=_check_max(
            "max_doc_len_k" if max_doc_len_k is not None else "max_doc_len", mk, _max_len(k_vals)
        ),
        cu_q_host=q_vals,
        cu_k_host=k_vals,
        local_k_slice=local_k_slice,
    )


def validate_window(window_size: tuple[int, int], name: str = "window_size") -> tuple[int, int]:
    """Check a ``(left, right)`` window tuple: each side ``-1`` (unbounded) or ``>= 0``."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"{name} must be a (left, right) tuple, got {window_size!r}")
    left, right = (int(x) for x in window_size)
    for side, val in (("left", left), ("right", right)):
        if val < -1:
            raise ValueError(f"{name} {side}={val} is invalid; use -1 (unbounded) or a value >= 0")
    return left, right


def window_from_size(window_size: int | None) -> tuple[int, int]:
    """User-facing window ``w`` (keys visible per query, itself included) -> ``(w - 1, 0)``."""
    if window_size is None:
        return (-1, -1)
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be a positive int or None, got {window_size!r}")
    if window_size <= 0:
        from .exceptions import ConfigurationError

        raise ConfigurationError(
            f"window_size={window_size} is invalid: a sliding window must be a positive number of keys "
            "(or None / -1 in a pattern for full attention)"
        )
    return (window_size - 1, 0)
