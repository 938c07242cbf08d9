"""Cross-rank consistency check of a context-parallel attention call.

Context-parallel ranks that disagree on their inputs fail badly: ranks with different document
metadata return wrong outputs without any error, ranks with different local lengths or dtypes abort
inside the communication library ("Received data size doesn't match expected size"), and a rank
that rejects its own inputs leaves the others waiting in the first exchange. So before the first
collective of a ring or Ulysses call every rank packs a small fixed-size ``int64`` fingerprint of
its call — the strategy, the local ``q``/``k``/``v`` shapes and dtypes, the attention settings
(window, causal flag, softmax scale, head stride, dropout), the document metadata (a hash of the
offsets' host values plus ``max_doc_len``; for llama3 the rank's place in the packed sequence) and
whether the rank's own validation failed — and the ranks all-gather it over the CP process group
(one collective of ``world × 48`` integers, on the device under NCCL). When the fingerprints do not
fit together, **every** rank raises :class:`~olmo_attn.exceptions.CPInputMismatchError` naming what
differs and on which ranks (a second small gather, only on this error path, fetches the offsets for
the message). When only some ranks rejected their own inputs, those ranks raise their own error and
the others raise ``CPInputMismatchError`` naming them.

Cost: a rank skips the check when its fingerprint equals one that already passed on the same group
(an LRU of 64 per group), so a training loop pays one tiny collective per distinct input signature
(e.g. once per step when every batch packs different documents, and not again for the other layers).

Limit of that cache: the skip is decided by each rank alone. A disagreement is caught whenever no
rank skips: on the first call, and whenever every rank's fingerprint is new (all ranks changing their
inputs together, as a training loop does). But if, after a check passed, one rank's inputs change
while another rank's still match a fingerprint it has already seen, only the changed rank enters the
check and waits there for the others until the process group's timeout (and ranks that each match a
different fingerprint seen before all skip, as without the check).
``OLMO_ATTN_CP_CHECK=always`` closes that gap: every call checks (one collective and, under NCCL, one
host sync per attention call), which is the setting for hunting such a bug.

Switch: ``OLMO_ATTN_CP_CHECK=0`` (or ``false``/``off``/``no``) turns the check off; it must be set
the same way on every rank. It is also skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import hashlib
import os
import struct
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..exceptions import CPInputMismatchError

__all__ = [
    "CHECK_ENV_VAR",
    "CPDocs",
    "Llama3Docs",
    "check_enabled",
    "check_mode",
    "clear_cache",
    "host_ints",
    "verify_cp_inputs",
]

CHECK_ENV_VAR = "OLMO_ATTN_CP_CHECK"

_MAGIC = 0x0A77C9C4
_N = 48  # header slots
_STRATEGIES = ("zig_zag", "llama3", "ulysses", "gather_sequence")
_DTYPE_NAMES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "complex64",
    "complex128",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)
_DTYPES = [getattr(torch, n, None) for n in _DTYPE_NAMES]
_ABSENT = -1  # list / scalar not given
_UNREADABLE = -2  # given, but not a 1-D integer tensor with values (or not an int)
_MAX_DIMS = 6
_ERR_BYTES = 400
_CACHE_SIZE = 64
_SHOWN_SCALAR = {_ABSENT: "none", _UNREADABLE: "a non-int"}


@dataclass(frozen=True)
class CPDocs:
    """Document metadata every rank must pass identically (zig-zag local offsets, Ulysses global ones).

    ``lists``: ``(name, values)`` pairs, at most two (``values`` ``None``: unreadable);
    ``scalars``: ``(name, value)`` pairs, at most two (``value`` ``None``: not given).
    """

    lists: tuple[tuple[str, tuple[int, ...] | None], ...]
    scalars: tuple[tuple[str, Any], ...] = ()
    fix: str = ""


@dataclass(frozen=True)
class Llama3Docs:
    """A llama3 rank's document metadata: per-rank by design, so the ranks are checked for fitting
    together (each rank's first key document starts where the previous rank's last one does, or at
    the rank's own first token) rather than for equality."""

    cu_q: tuple[int, ...] | None
    cu_k: tuple[int, ...] | None
    k_start: int | None
    k_stop: int | None
    valid: bool = field(default=True)
    tensors: tuple[Any, ...] = ()  # the offset tensors themselves: the cache keys on their identity


def check_mode() -> str:
    """``"off"`` (``OLMO_ATTN_CP_CHECK=0``/``false``/``off``/``no``, or while ``torch.compile``
    traces), ``"always"`` (``OLMO_ATTN_CP_CHECK=always``: every call, no cache) or ``"on"``."""
    value = os.environ.get(CHECK_ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "off", "no") or torch.compiler.is_compiling():
        return "off"
    return "always" if value == "always" else "on"


def check_enabled() -> bool:
    """False when ``OLMO_ATTN_CP_CHECK`` turns the check off or ``torch.compile`` is tracing."""
    return check_mode() != "off"


def host_ints(t: Any) -> tuple[int, ...] | None:
    """Host values of a 1-D integer tensor (cached per tensor, see ``masks._host_values``); ``None``
    when ``t`` is not one (the rank's own validation reports that)."""
    if (
        not isinstance(t, torch.Tensor)
        or t.dim() != 1
        or t.is_floating_point()
        or t.is_complex()
        or t.device.type == "meta"
    ):
        return None
    from ..masks import _host_values

    return _host_values(t)


# ---------------------------------------------------------------------------------------------- header


def _hash(values: Sequence[int]) -> int:
    try:
        data = array("q", values).tobytes()
    except OverflowError:
        data = repr(tuple(values)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _int_or(value: Any, absent: int = _ABSENT) -> int:
    if value is None:
        return absent
    if isinstance(value, bool) or not isinstance(value, int):
        return _UNREADABLE
    return int(value)


def _float_bits(x: Any) -> int:
    try:
        return struct.unpack("<q", struct.pack("<d", float(x)))[0]
    except (TypeError, ValueError):
        return _UNREADABLE


def _tensor_slots(t: Any) -> list[int]:
    if t is None:
        return [0] * (2 + _MAX_DIMS)
    if not isinstance(t, torch.Tensor):
        return [0, _UNREADABLE] + [0] * _MAX_DIMS
    code = (
        _DTYPES.index(t.dtype) + 1
        if t.dtype in _DTYPES
        else 100 + (_hash([ord(c) for c in str(t.dtype)]) % 1000)
    )
    dims = list(t.shape[:_MAX_DIMS]) + [0] * max(0, _MAX_DIMS - t.dim())
    return [code, t.dim(), *dims]


def _encode_setting(value: Any) -> int:
    """One slot: ints and bools as they are, floats as their bits, a ``(left, right)`` window packed."""
    if value is None:
        return _ABSENT
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            left, right = int(value[0]), int(value[1])
        except (TypeError, ValueError):
            return _UNREADABLE
        return ((left + 1) << 32) | ((right + 1) & 0xFFFFFFFF)
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float):
        return _float_bits(value)
    return _UNREADABLE


def _decode_setting(template: Any, slot: int) -> str:
    """Inverse of :func:`_encode_setting` for display; ``template`` is this rank's value (its type)."""
    if slot == _ABSENT:
        return "None"
    if slot == _UNREADABLE:
        return "an unreadable value"
    if isinstance(template, (tuple, list)):
        return str(((slot >> 32) - 1, (slot & 0xFFFFFFFF) - 1))
    if isinstance(template, bool):
        return str(bool(slot))
    if isinstance(template, float):
        return f"{_unpack_float(slot):.8g}"
    return str(slot)


def _build(
    strategy: str,
    tensors: Sequence[Any],
    settings: dict[str, Any],
    docs: CPDocs | Llama3Docs | None,
    local_error: BaseException | None,
) -> tuple[list[int], _Detail]:
    """``(header, detail)``: the fixed-size fingerprint and the variable-size detail for messages."""
    h = [_MAGIC, _N, _STRATEGIES.index(strategy) + 1, int(local_error is not None)]
    padded = list(tensors)[:3] + [None] * (3 - min(3, len(tensors)))
    for t in padded:  # 3 x 8 slots
        h += _tensor_slots(t)
    enc = [_encode_setting(v) for v in list(settings.values())[:6]]
    h += enc + [0] * (6 - len(enc))  # 6 slots -> 34
    lists: list[tuple[int, ...] | None] = []
    llama = [0, _ABSENT, _ABSENT, _ABSENT]
    if docs is None:
        h += [0]
        h += [_ABSENT, 0] * 2 + [_ABSENT] * 2
    elif isinstance(docs, CPDocs):
        h += [1]
        for i in range(2):
            vals = docs.lists[i][1] if i < len(docs.lists) else None
            present = i < len(docs.lists)
            if not present:
                h += [_ABSENT, 0]
            elif vals is None:
                h += [_UNREADABLE, 0]
            else:
                h += [len(vals), _hash(vals)]
            if present:
                lists.append(vals)
        for i in range(2):
            h.append(_int_or(docs.scalars[i][1]) if i < len(docs.scalars) else _ABSENT)
    else:
        h += [2]
        ok = docs.valid and docs.cu_q is not None and docs.cu_k is not None and docs.k_start is not None
        h += [len(docs.cu_q) if docs.cu_q is not None else _UNREADABLE, _hash(docs.cu_q or ())]
        h += [len(docs.cu_k) if docs.cu_k is not None else _UNREADABLE, _hash(docs.cu_k or ())]
        h += [_ABSENT, _ABSENT]
        if ok and len(docs.cu_k) >= 2:  # type: ignore[arg-type]
            a = int(docs.k_start)  # type: ignore[arg-type]
            last = a + docs.cu_k[-2]  # type: ignore[index]  # global start of the last key document
            llama = [1, a, _int_or(docs.k_stop), last]
            lists.append(tuple(a + x for x in docs.cu_k[:-1]))  # type: ignore[index]  # global starts
        else:
            llama = [_UNREADABLE, _ABSENT, _ABSENT, _ABSENT]
            lists.append(None)
    h += llama  # 4 slots
    text = b""
    if local_error is not None:
        text = f"{type(local_error).__name__}: {local_error}".encode()[:_ERR_BYTES]
    h.append(sum(1 + (len(x) if x is not None else 0) for x in lists) + 1 + len(text))
    h += [0] * (_N - len(h))
    assert len(h) == _N, len(h)
    return h, _Detail(lists, text)


@dataclass(frozen=True)
class _Detail:
    """What the error message needs beyond the header (sent only on the error path)."""

    lists: list[tuple[int, ...] | None]
    text: bytes

    def values(self) -> list[int]:
        out: list[int] = []
        for vals in self.lists:
            if vals is None:
                out.append(-1)
            else:
                out += [len(vals), *vals]
        return [*out, len(self.text), *self.text]


# Slots of the header (see _build).
_S_STRATEGY, _S_ERROR = 2, 3
_S_TENSORS = 4  # 3 x (dtype, ndim, 6 dims)
_S_SETTINGS = 28  # 6 named settings
_S_DOC_MODE = 34
_S_LISTS = 35  # 2 x (len, hash)
_S_SCALARS = 39
_S_LLAMA = 41  # flag, k_start, k_stop, last start
_S_DETAIL = 45


# ---------------------------------------------------------------------------------------------- comms


def _comm_device(group: Any, like: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if isinstance(like, torch.Tensor) and like.device.type not in ("cpu", "meta") and backend != "gloo":
        return like.device
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(values: list[int], group: Any, world: int, device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (equal lengths on all ranks) as host lists, rank-major."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    out = torch.empty(world * len(values), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(out, t, group=group)
    return out.view(world, len(values)).tolist()


_Cache = OrderedDict[tuple, "tuple[weakref.ref, ...] | None"]
_PASSED: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()
_PASSED_BY_ID: dict[int, _Cache] = {}


def _cache_key(header: list[int], docs: Any) -> tuple[tuple | None, tuple[weakref.ref, ...] | None]:
    """The key a passed check is remembered under (``None``: not remembered), and the weak
    references a hit must match.

    Zig-zag, Ulysses and gather headers are equal on every rank of a correct program, so keying on
    their values makes every rank hit or miss together. A llama3 rank's metadata are its own: two
    different packed sequences can look the same to one rank and different to another, so a value
    key would let some ranks skip while others check. llama3 keys on the identity of the offset
    tensors instead (new tensors on every rank for every batch, as ``shard_batch`` makes them)."""
    if not isinstance(docs, Llama3Docs):
        return tuple(header), None
    if not docs.tensors:
        return None, None
    try:
        refs = tuple(weakref.ref(t) for t in docs.tensors)
    except TypeError:
        return None, None
    return (tuple(header), tuple((id(t), getattr(t, "_version", 0)) for t in docs.tensors)), refs


def _cache_for(group: Any) -> _Cache:
    try:
        return _PASSED.setdefault(group, OrderedDict())
    except TypeError:  # not weak-referenceable
        return _PASSED_BY_ID.setdefault(id(group), OrderedDict())


def clear_cache() -> None:
    """Forget every fingerprint that passed (the next call on every group checks again)."""
    _PASSED.clear()
    _PASSED_BY_ID.clear()


# ---------------------------------------------------------------------------------------------- messages


def _ranks(rs: Sequence[int]) -> str:
    return f"rank {rs[0]}" if len(rs) == 1 else f"ranks {list(rs)}"


def _by_value(values: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    groups: dict[Any, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return list(groups.items())


def _describe(values: Sequence[Any], show) -> str:
    """``rank 0 has X, ranks [1, 2] have Y`` (``show(value) -> str``; grouped by equal values)."""
    parts = []
    for v, rs in _by_value(values):
        parts.append(f"{_ranks(rs)} {'has' if len(rs) == 1 else 'have'} {show(v)}")
    return ", ".join(parts)


def _fmt_list(vals: Sequence[int]) -> str:
    if len(vals) <= 12:
        return str(list(vals))
    return f"[{', '.join(map(str, vals[:8]))}, ..., {', '.join(map(str, vals[-2:]))}] ({len(vals)} offsets)"


def _dtype_name(code: int) -> str:
    if 1 <= code <= len(_DTYPE_NAMES):
        return f"torch.{_DTYPE_NAMES[code - 1]}"
    return "no tensor" if code == 0 else f"dtype #{code}"


def _parse_detail(detail: list[int], n_lists: int) -> tuple[list[tuple[int, ...] | None], str | None]:
    lists: list[tuple[int, ...] | None] = []
    i = 0
    for _ in range(n_lists):
        n = detail[i]
        i += 1
        if n < 0:
            lists.append(None)
        else:
            lists.append(tuple(detail[i : i + n]))
            i += n
    n = detail[i]
    text = bytes(detail[i + 1 : i + 1 + n]).decode(errors="replace") if n > 0 else None
    return lists, text


def _n_lists(h: list[int]) -> int:
    mode = h[_S_DOC_MODE]
    if mode == 0:
        return 0
    if mode == 2:
        return 1
    return sum(1 for j in range(2) if h[_S_LISTS + 2 * j] != _ABSENT)


def _unpack_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _shapes(h: list[int]) -> tuple[tuple[int, ...], ...]:
    out = []
    for i in range(3):
        base = _S_TENSORS + 8 * i
        out.append(tuple(h[base + 2 : base + 2 + max(0, min(h[base + 1], _MAX_DIMS))]))
    return tuple(out)


def _problems(
    heads: list[list[int]],
    details: list[list[int]] | None,
    names: _Names,
    errors: Sequence[int] = (),
) -> list[str]:
    """One sentence per thing the ranks' headers disagree on (``details``: for the values)."""
    out: list[str] = []
    strat = [h[_S_STRATEGY] for h in heads]
    if len(set(strat)) > 1:
        out.append(
            "the context-parallel strategy differs across context-parallel ranks: "
            + _describe(strat, lambda c: f"{_STRATEGIES[c - 1]}")
            + "; every rank must apply the same context-parallel style (apply_cp with the same "
            "RingContextParallelStyle / UlyssesContextParallelStyle)"
        )
        return out  # everything else is laid out differently per strategy
    tnames = names.tensors
    nt = len(tnames)
    dt = [tuple(h[_S_TENSORS + 8 * i] for i in range(nt)) for h in heads]
    if len(set(dt)) > 1:
        which = [tnames[i] for i in range(nt) if len({d[i] for d in dt}) > 1]

        def show_dt(d: tuple[int, ...]) -> str:
            if len(set(d)) == 1:
                return f"{'/'.join(tnames)} {_dtype_name(d[0])}"
            return ", ".join(f"{n} {_dtype_name(c)}" for n, c in zip(tnames, d))

        out.append(
            f"dtype of {'/'.join(which)} differs across context-parallel ranks: {_describe(dt, show_dt)}; "
            f"{names.dtype_fix}"
        )
    shp = [_shapes(h) for h in heads]
    if len(set(shp)) > 1:
        which_i = [i for i in range(nt) if len({s[i] for s in shp}) > 1]

        def show_shape(s: tuple[tuple[int, ...], ...]) -> str:
            return ", ".join(f"{tnames[i]} {s[i]}" for i in which_i)

        out.append(
            f"local shape of {'/'.join(tnames[i] for i in which_i)} differs across context-parallel ranks: "
            f"{_describe(shp, show_shape)}; {names.shape_fix}"
        )
    for i, (name, template) in enumerate(list(names.settings.items())[:6]):
        vals = [h[_S_SETTINGS + i] for h in heads]
        if len(set(vals)) > 1:
            out.append(
                f"{name} differs across context-parallel ranks: "
                f"{_describe(vals, lambda x, t=template: _decode_setting(t, x))}; every rank must "
                f"{names.settings_fix.format(name=name)}"
                + (" (and run in the same train/eval mode)" if name == "dropout_p" else "")
            )
    mode = [h[_S_DOC_MODE] for h in heads]
    per_rank = None
    if details is not None:
        per_rank = [_parse_detail(d, _n_lists(h))[0] for d, h in zip(details, heads)]
    if len(set(mode)) > 1:
        given = {0: "no document metadata", 1: names.lists[0], 2: "cu_doc_lens_q/cu_doc_lens_k/local_k_slice"}
        out.append(
            "document metadata differ across context-parallel ranks: "
            + _describe(mode, lambda m: f"{given.get(m, m)}")
            + f"; {names.fix}"
        )
        return out
    if mode[0] == 1:
        for j in range(2):
            meta = [tuple(h[_S_LISTS + 2 * j : _S_LISTS + 2 * j + 2]) for h in heads]
            if len(set(meta)) <= 1:
                continue
            name = names.lists[min(j, len(names.lists) - 1)]

            def show_list(vals: tuple[int, ...] | None) -> str:
                if vals is None:
                    return "none (or not a 1-D integer tensor)"
                n = len(vals) - 1
                return f"{n} document{'s' if n != 1 else ''} {_fmt_list(vals)}"

            if per_rank is not None:
                desc = _describe([lp[j] if j < len(lp) else None for lp in per_rank], show_list)
            else:
                desc = _describe([m[0] for m in meta], lambda n: f"{n} offsets")
            out.append(f"{name} differs across context-parallel ranks: {desc}; {names.fix}")
        lists_differ = any(
            len({tuple(h[_S_LISTS + 2 * j : _S_LISTS + 2 * j + 2]) for h in heads}) > 1 for j in range(2)
        )
        for j in range(2):
            sc = [h[_S_SCALARS + j] for h in heads]
            if len(set(sc)) > 1 and not lists_differ:  # different offsets explain different maxima
                name = names.scalars[min(j, len(names.scalars) - 1)]
                out.append(
                    f"{name} differs across context-parallel ranks: "
                    + _describe(sc, lambda x: _SHOWN_SCALAR.get(x, str(x)))
                    + f"; pass every rank the {name} the load balancer (or shard_batch) returns, or leave it out"
                )
    elif mode[0] == 2 and len(set(shp)) <= 1:
        out += _llama3_problems(heads, per_rank, names, errors, shp[0])
    return out


def _llama3_problems(
    heads: list[list[int]],
    per_rank: list[list[tuple[int, ...] | None]] | None,
    names: _Names,
    errors: Sequence[int],
    shape: tuple[tuple[int, ...], ...],
) -> list[str]:
    """llama3: rank ``r`` keeps tokens ``[r·L, (r+1)·L)``; its keys start at the first document it
    overlaps, which is where rank ``r−1``'s last document starts (or at ``r·L`` itself)."""
    W = len(heads)
    ll = [h[_S_LLAMA : _S_LLAMA + 4] for h in heads]
    L = shape[0][1] if len(shape[0]) >= 2 else 0
    bad: list[str] = []
    unreadable = [r for r in range(W) if ll[r][0] != 1 and r not in errors]
    if unreadable:
        bad.append(f"{_ranks(unreadable)} passed metadata that cannot be read as 1-D integer offsets")
    elif not any(ll[r][0] != 1 for r in range(W)):
        if ll[0][1] != 0:
            bad.append(f"rank 0's local_k_slice starts at {ll[0][1]}, expected 0")
        for r in range(W):
            if ll[r][2] != (r + 1) * L:
                bad.append(f"rank {r}'s local_k_slice ends at {ll[r][2]}, expected {(r + 1) * L}")
        for r in range(1, W):
            ok = sorted({r * L, ll[r - 1][3]})
            if ll[r][1] not in ok:
                bad.append(
                    f"rank {r}'s local_k_slice starts at {ll[r][1]}, but rank {r - 1}'s last document starts "
                    f"at {ll[r - 1][3]} (expected {' or '.join(map(str, ok))})"
                )
    if not bad:
        return []
    sees = ""
    if per_rank is not None:
        sees = (
            " ("
            + ", ".join(
                f"rank {r} sees documents starting at "
                + (_fmt_list(lp[0]) if lp and lp[0] is not None else "(unreadable)")
                + f" before token {(r + 1) * L}"
                for r, lp in enumerate(per_rank)
            )
            + ")"
        )
    return [
        "the llama3 document metadata (cu_doc_lens_q, cu_doc_lens_k, local_k_slice) of the context-parallel "
        f"ranks do not describe one packed sequence: {'; '.join(bad)}{sees}; {names.fix}"
    ]


# ---------------------------------------------------------------------------------------------- entry


_SHAPE_FIX = (
    "every rank must pass shards of the same shape [B, T_local, heads, head_dim] (shard every rank's batch "
    "with the same load balancer, global length and length_multiple, e.g. with shard_batch)"
)
_DTYPE_FIX = "every rank must run attention in the same dtype (same model dtype and autocast settings)"
_SETTINGS_FIX = "build attention with the same {name}"


@dataclass(frozen=True)
class _Names:
    """How this rank's call names the header's fields in messages (the same on every rank that runs
    the same strategy)."""

    lists: tuple[str, ...] = ("cu_doc_lens",)
    scalars: tuple[str, ...] = ("max_doc_len",)
    fix: str = "every rank must pass the same document metadata"
    tensors: tuple[str, ...] = ("q", "k", "v")
    settings: dict[str, Any] = field(default_factory=dict)
    shape_fix: str = _SHAPE_FIX
    dtype_fix: str = _DTYPE_FIX
    settings_fix: str = _SETTINGS_FIX


def _same(heads: list[list[int]]) -> bool:
    """Whether the headers are equal where they must be (llama3's per-rank metadata: see _problems)."""
    ref = heads[0]
    end = _S_DOC_MODE + 1 if ref[_S_DOC_MODE] != 1 else _S_LLAMA
    return all(
        h[_S_STRATEGY:_S_ERROR] + h[_S_ERROR + 1 : end] == ref[_S_STRATEGY:_S_ERROR] + ref[_S_ERROR + 1 : end]
        for h in heads
    )


def verify_cp_inputs(
    group: Any,
    *,
    strategy: str,
    tensors: Sequence[Any],
    settings: dict[str, Any],
    docs: CPDocs | Llama3Docs | None,
    fix: str,
    local_error: BaseException | None = None,
    tensor_names: Sequence[str] = ("q", "k", "v"),
    shape_fix: str = _SHAPE_FIX,
    dtype_fix: str = _DTYPE_FIX,
    settings_fix: str = _SETTINGS_FIX,
) -> None:
    """Check that every rank of ``group`` makes a fitting call; raise on every rank if not.

    ``tensors``: the local ``(q, k, v)`` (at most 3, named by ``tensor_names``). ``settings``: at
    most 6 named values every rank must agree on (ints, bools, floats, ``(left, right)`` windows).
    ``fix``: how to pass the document metadata right (ends the
    message). ``local_error``: the error this rank's own validation raised, or ``None``; when this
    returns, the caller raises it. Raises :class:`~olmo_attn.exceptions.CPInputMismatchError`.
    """
    mode = check_mode()
    if mode == "off" or not dist.is_initialized():
        return
    if group is None:
        group = dist.group.WORLD
    world = dist.get_world_size(group)
    if world <= 1:
        return
    header, detail = _build(strategy, tensors, settings, docs, local_error)
    key, refs = _cache_key(header, docs)
    cache = _cache_for(group)
    if mode == "on" and local_error is None and key is not None and key in cache:
        entry = cache[key]
        if entry is None or all(r() is t for r, t in zip(entry, docs.tensors)):  # type: ignore[union-attr]
            cache.move_to_end(key)
            return
    lists, scalars = ("cu_doc_lens",), ("max_doc_len",)
    if isinstance(docs, CPDocs) and docs.lists:
        lists = tuple(n for n, _ in docs.lists)
        scalars = tuple(n for n, _ in docs.scalars) or scalars
    names = _Names(
        lists=lists,
        scalars=scalars,
        fix=fix,
        tensors=tuple(tensor_names)[:3],
        settings=dict(settings),
        shape_fix=shape_fix,
        dtype_fix=dtype_fix,
        settings_fix=settings_fix,
    )
    device = _comm_device(group, tensors[0] if tensors else None)
    heads = _gather(header, group, world, device)
    rank = dist.get_rank(group)
    foreign = [r for r, h in enumerate(heads) if h[0] != _MAGIC or h[1] != _N]
    if foreign:
        raise CPInputMismatchError(
            f"{_ranks(foreign)} sent something other than the context-parallel input check; every rank must "
            f"run the same code with the same {CHECK_ENV_VAR} setting"
        )
    errors = [r for r, h in enumerate(heads) if h[_S_ERROR]]
    same = _same(heads)
    if same and heads[0][_S_DOC_MODE] == 2:
        same = not _problems(heads, None, names, errors)  # llama3: the ranks must fit, not be equal
    if same and not errors:
        if mode == "on" and key is not None:
            cache[key] = refs
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return
    # error path: every rank fetches the details (their size comes from the headers: all ranks agree)
    n = max(h[_S_DETAIL] for h in heads)
    mine = detail.values()
    details = _gather(mine + [0] * (n - len(mine)), group, world, device)
    problems = [] if same else _problems(heads, details, names, errors)
    if not same and not problems:
        problems = ["the context-parallel ranks' inputs differ"]  # every header slot has a message above
    if errors:
        texts = [f"rank {r}: {_parse_detail(details[r], _n_lists(heads[r]))[1]}" for r in errors]
        note = (
            f"{_ranks(errors)} rejected {'its' if len(errors) == 1 else 'their'} inputs before the first "
            f"collective ({'; '.join(texts)})"
        )
        if not problems:
            if rank in errors:
                return  # the caller raises this rank's own error
            raise CPInputMismatchError(
                f"{note}; this rank's inputs were accepted; fix the inputs of {_ranks(errors)}"
            )
        problems.append(note)
    if len(problems) == 1:
        msg = problems[0]
    else:
        msg = (
            f"the context-parallel ranks' inputs do not fit together ({len(problems)} problems):\n- "
            + "\n- ".join(problems)
        )
    raise CPInputMismatchError(msg) from local_error
