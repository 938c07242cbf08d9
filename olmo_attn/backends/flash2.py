"""``flash_2``: the flash-attn 2 adapter (``pip install flash-attn``, Ampere or newer).

Written against flash-attn 2.8.3 (any release >= 2.7 has these signatures). Which library entry
point serves which call:

=====================================  ==========================================================
call                                   flash-attn function
=====================================  ==========================================================
``(q, k, v)``, no documents            ``flash_attn_func``
``(q, k, v)`` with documents           ``flash_attn_varlen_func`` on the flattened batch
packed ``[B, T, 3, H, D]``             ``flash_attn_qkvpacked_func`` /
                                       ``flash_attn_varlen_qkvpacked_func`` (one segmentation)
KV cache                               ``flash_attn_with_kvcache`` (writes the cache in place,
                                       honours ``cache_leftpad``)
``kernel()`` (ring attention)          ``_wrapped_flash_attn_{,varlen_}{forward,backward}``
                                       (the torch-op names; ``_flash_attn_*`` on older builds)
ring CP with ring-flash-attn           ``zigzag_ring_flash_attn_{,varlen_}{,qkvpacked_}func``,
installed                              ``llama3_flash_attn_varlen_func``; any other combination
                                       (e.g. zig-zag with a window) runs our own ring on ``kernel()``
=====================================  ==========================================================

Conventions shared by the flash adapters (this module holds the helpers ``flash3`` and ``flash4``
reuse): windows are the library's own ``(left, right)`` with ``-1`` = unbounded, which is ours;
causal alignment is bottom-right in every entry point; documents flatten the batch
(``[B, T, H, D] -> [B*T, H, D]``, flat index ``b*T + t``) and pass ``cu_doc_lens`` as
``cu_seqlens``; GQA passes ``k, v`` with ``Hkv`` heads untouched (the kernels share kv head
``h // (Hq // Hkv)``); ``deterministic`` follows ``torch.are_deterministic_algorithms_enabled()``.
flash-attn marks rows without a visible key with ``lse = +inf``; :class:`Flash2Kernel` returns our
``-inf``.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import math
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..exceptions import BackendUnavailableError
from ..hardware import package_status
from ..masks import DocSegments, resolve_doc_args
from ..ops.kernel import KernelCall
from . import capabilities as caps
from .base import AttentionBackend

if TYPE_CHECKING:
    from ..kv_cache import KVCacheManager

_MIN_VERSION = (2, 7)
RING_FLASH_ATTN_ENV = "OLMO_ATTN_RING_FLASH_ATTN"  # "0" disables ring-flash-attn for flash_2


# ----- helpers shared by the flash adapters ---------------------------------------------------------
def import_backend_module(backend: str, module: str) -> ModuleType:
    """Import ``module`` for ``backend`` or raise :class:`BackendUnavailableError` naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        spec = caps.get_spec(backend)
        raise BackendUnavailableError(
            f"attention backend '{backend}' needs the module {module!r}, which does not import "
            f"({type(e).__name__}: {e}); install with: {spec.install}"
        ) from e


def flatten_batch(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D] -> [B*T, H, D]`` (a view when ``x`` is contiguous); flat index ``b*T + t``."""
    return x.reshape(-1, *x.shape[2:])


def flat_keys(k: torch.Tensor, docs: DocSegments) -> torch.Tensor:
    """Flattened keys ``[total_k, Hkv, D]``; llama3 CP keeps only ``docs.local_k_slice`` of them."""
    flat = flatten_batch(k)
    return flat[docs.local_k_slice] if docs.local_k_slice is not None else flat


def deterministic_requested() -> bool:
    """Deterministic backward when PyTorch's deterministic mode is on."""
    return torch.are_deterministic_algorithms_enabled()


def first(result: Any) -> torch.Tensor:
    """The output of a flash call that returns ``out`` or ``(out, lse, ...)`` depending on version."""
    return result[0] if isinstance(result, (tuple, list)) else result


def lse_to_ours(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn 2/3 write ``+inf`` for rows without a visible key; our convention is ``-inf``."""
    return lse.masked_fill(torch.isposinf(lse), -math.inf)


def lse_to_flash(lse: torch.Tensor) -> torch.Tensor:
    """Our ``-inf`` rows back to the ``+inf`` flash-attn 2/3 write (their backward then yields P = 0)."""
    return lse.float().masked_fill(torch.isneginf(lse), math.inf).contiguous()


def max_seqlens(call: KernelCall) -> tuple[int, int]:
    """Longest query / key segment of a varlen :class:`KernelCall` (host values when present)."""

    def longest(given: int | None, host: tuple[int, ...] | None, cu: torch.Tensor) -> int:
        if given is not None:
            return int(given)
        values = host if host is not None else tuple(int(x) for x in cu.tolist())
        return max((b - a for a, b in itertools.pairwise(values)), default=0)

    assert call.cu_seqlens_q is not None and call.cu_seqlens_k is not None
    return (
        longest(call.max_seqlen_q, call.cu_seqlens_q_host, call.cu_seqlens_q),
        longest(call.max_seqlen_k, call.cu_seqlens_k_host, call.cu_seqlens_k),
    )


def kv_cache_position(manager: KVCacheManager, q: torch.Tensor, k: torch.Tensor) -> int:
    """Validate a KV-cache call and return the number of cache positions already used (host int).

    ``q [B, T_new, Hq, D]``, ``k [B, T_new, Hkv, D]``; the cache is ``[B, S, Hkv, D]``. Raises
    ``ValueError`` / ``TypeError`` (and the manager's overflow error) naming the fix.
    """
    B, T_new = q.shape[:2]
    if manager.k_cache.shape[0] != B or manager.k_cache.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"KV cache is [B, S, Hkv, D] = {tuple(manager.k_cache.shape)} but the new keys are "
            f"{tuple(k.shape)}; reset the cache for batch size {B} (Attention.init_kv_cache_manager)"
        )
    if manager.k_cache.dtype != q.dtype:
        raise TypeError(
            f"KV cache dtype {manager.k_cache.dtype} differs from the activations' {q.dtype}; flash kernels "
            "need one dtype (build the cache with the activation dtype, or run under torch.autocast)"
        )
    if hasattr(manager, "check_capacity"):
        manager.check_capacity(T_new)
    pos = int(manager.seqlen) if hasattr(manager, "seqlen") else int(manager.cache_seqlens)
    if pos + T_new > manager.k_cache.shape[1]:
        raise ValueError(
            f"KV cache overflow: {T_new} new token(s) at position {pos} exceed max_seq_len="
            f"{manager.k_cache.shape[1]}; reset the cache with a larger max_seq_len"
        )
    return pos


def visible_cache(
    manager: KVCacheManager, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Append ``k, v [B, T_new, Hkv, D]`` to the cache at ``pos`` and gather, for a varlen call,
    exactly the slots each row may see: ``[leftpad_b, pos + T_new)`` of row ``b``, back to back.

    Returns ``(q [B·T_new, Hq, D], k_vis, v_vis [Σ visible, Hkv, D], cu_q, cu_k [B + 1] int32,
    max_seqlen_k)``. Flash kernels handed the whole cache (``flash_attn_with_kvcache``, or a view
    with ``seqused_k``) let NaN in slots no query may see reach the output, and FA3 3.0.0 wrote the
    new keys over a row's left padding (both seen on an H200): a kernel that never gets those
    slots cannot read them. Costs one copy of the visible cache per call.
    """
    B, T_new, Hq, D = q.shape
    S = manager.k_cache.shape[1]
    if hasattr(manager, "append"):
        manager.append(k, v)
    else:
        with torch.no_grad():
            manager.k_cache[:, pos : pos + T_new] = k
            manager.v_cache[:, pos : pos + T_new] = v
    dev = q.device
    leftpad = manager.cache_leftpad.to(device=dev, dtype=torch.int32)
    slot = torch.arange(S, device=dev)
    visible = (slot[None, :] >= leftpad[:, None]) & (slot[None, :] < pos + T_new)  # [B, S]
    rows = visible.reshape(-1).nonzero().squeeze(1)
    k_vis = manager.k_cache.view(B * S, *manager.k_cache.shape[2:]).index_select(0, rows)
    v_vis = manager.v_cache.view(B * S, *manager.v_cache.shape[2:]).index_select(0, rows)
    seqused_k = (pos + T_new - leftpad).clamp_min(0).to(torch.int32)  # [B] visible keys per row
    cu_k = torch.cat([seqused_k.new_zeros(1), seqused_k.cumsum(0, dtype=torch.int32)])
    cu_q = torch.arange(0, (B + 1) * T_new, T_new, dtype=torch.int32, device=dev)
    return q.reshape(B * T_new, Hq, D), k_vis, v_vis, cu_q, cu_k, pos + T_new


def refuse_kv_cache_dropout(backend: str, dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError(
            f"KV-cache decoding on backend '{backend}' runs without attention dropout, but dropout_p="
            f"{dropout_p} is active; call model.eval() before decoding"
        )


class _RngStates:
    """flash-attn 2 dropout: the ``rng_state`` each forward used, looked up by the call's seed.

    Our kernel contract makes dropout a function of ``KernelCall.dropout_seed``: the forward runs
    with the CUDA generator seeded by it (so the Philox state is ``(seed, offset 0)``) and the
    backward hands the same state back to the library.
    """

    def __init__(self, capacity: int = 256):
        self._states: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._capacity = capacity

    def remember(self, key: tuple, state: torch.Tensor) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self._capacity:
            self._states.popitem(last=False)

    def get(self, key: tuple, device: torch.device) -> torch.Tensor:
        state = self._states.get(key)
        if state is None:  # same state the forward's freshly seeded generator produced
            state = torch.tensor([key[0], 0], dtype=torch.int64, device=device)
        return state


# ----- the LSE kernel ---------------------------------------------------------------------------------
class Flash2Kernel:
    """flash-attn 2 forward with log-sum-exp and its backward (``AttentionKernel`` protocol).

    Dense: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` -> ``out [B, Tq, Hq, D]``, ``lse [B, Hq, Tq]``.
    Varlen: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` -> ``out [total_q, Hq, D]``,
    ``lse [Hq, total_q]``. Dropout needs ``call.dropout_seed``.
    """

    name = "flash_2"

    def __init__(self) -> None:
        self._rng = _RngStates()

    @staticmethod
    def _interface() -> ModuleType:
        return import_backend_module("flash_2", "flash_attn.flash_attn_interface")

    @staticmethod
    def _op(fi: ModuleType, name: str) -> Any:
        return getattr(fi, f"_wrapped{name}", None) or getattr(fi, name)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fi = self._interface()
        left, right = call.window
        if call.dropout_p > 0.0 and call.dropout_seed is None:
            raise ValueError(
                "flash_2 kernel: dropout_p > 0 needs call.dropout_seed (an int) to replay the mask"
            )

        def run() -> tuple[torch.Tensor, ...]:
            if call.varlen:
                max_q, max_k = max_seqlens(call)
                return self._op(fi, "_flash_attn_varlen_forward")(
                    q,
                    k,
                    v,
                    call.cu_seqlens_q,
                    call.cu_seqlens_k,
                    max_q,
                    max_k,
                    call.dropout_p,
                    call.scale,
                    call.causal,
                    left,
                    right,
                    0.0,  # softcap
                    None,  # alibi_slopes
                    False,  # return_softmax
                )
            return self._op(fi, "_flash_attn_forward")(
                q, k, v, call.dropout_p, call.scale, call.causal, left, right, 0.0, None, False
            )

        with torch.no_grad():
            if call.dropout_p > 0.0:
                with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else []):
                    if q.device.type == "cuda":
                        torch.cuda.manual_seed(int(call.dropout_seed))  # type: ignore[arg-type]
                    out, lse, _, rng_state = run()
                self._rng.remember((int(call.dropout_seed), q.device), rng_state)  # type: ignore[arg-type]
            else:
                out, lse, _, _ = run()
        return out, lse_to_ours(lse)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: KernelCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fi = self._interface()
        left, right = call.window
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # the kernels need every operand in the input dtype (ring attention may merge out in fp32)
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        rng_state = (
            self._rng.get((int(call.dropout_seed), q.device), q.device)
            if call.dropout_p > 0.0 and call.dropout_seed is not None
            else None
        )
        deterministic = call.deterministic or deterministic_requested()
        with torch.no_grad():
            if call.varlen:
                max_q, max_k = max_seqlens(call)
                self._op(fi, "_flash_attn_varlen_backward")(
                    dout,
                    q,
                    k,
                    v,
                    out,
                    lse_to_flash(lse),
                    dq,
                    dk,
                    dv,
                    call.cu_seqlens_q,
                    call.cu_seqlens_k,
                    max_q,
                    max_k,
                    call.dropout_p,
                    call.scale,
                    call.causal,
                    left,
                    right,
                    0.0,
                    None,
                    deterministic,
                    rng_state,
                )
            else:
                self._op(fi, "_flash_attn_backward")(
                    dout,
                    q,
                    k,
                    v,
                    out,
                    lse_to_flash(lse),
                    dq,
                    dk,
                    dv,
                    call.dropout_p,
                    call.scale,
                    call.causal,
                    left,
                    right,
                    0.0,
                    None,
                    deterministic,
                    rng_state,
                )
        return dq, dk, dv


# ----- the backend ------------------------------------------------------------------------------------
class FlashAttention2Backend(AttentionBackend):
    """flash-attn 2 (``flash_attn``): every feature, fp16/bf16, head_dim <= 256 (multiple of 8).

    Inputs ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` or packed ``[B, T, 3, H, D]``; output
    ``[B, T, Hq, D]`` on every path.
    """

    name: ClassVar[str] = "flash_2"
    #: use ring-flash-attn for ring CP where it covers the call (set False, or the environment
    #: variable ``OLMO_ATTN_RING_FLASH_ATTN=0``, to always run our own ring on :meth:`kernel`)
    use_ring_flash_attn: ClassVar[bool] = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        caps.assert_head_dim(self.name, self.head_dim)
        fa = self._lib()
        version = getattr(fa, "__version__", None)
        if version is not None and _version_tuple(version) < _MIN_VERSION:
            raise BackendUnavailableError(
                f"attention backend 'flash_2' needs flash-attn >= {'.'.join(map(str, _MIN_VERSION))}, "
                f"found {version}; upgrade with: pip install -U flash-attn --no-build-isolation"
            )

    @staticmethod
    def _lib() -> ModuleType:
        return import_backend_module("flash_2", "flash_attn")

    def kernel(self) -> Flash2Kernel:
        return Flash2Kernel()

    def _common(self, dropout_p: float) -> dict[str, Any]:
        return {
            "dropout_p": dropout_p,
            "softmax_scale": self.softmax_scale,
            "causal": True,
            "window_size": self.window_size,
            "deterministic": deterministic_requested(),
        }

    # ----- hooks ------------------------------------------------------------------------------
    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        """``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, Hq, D]``."""
        fa = self._lib()
        if docs is None:
            return fa.flash_attn_func(q, k, v, **self._common(dropout_p))
        out = fa.flash_attn_varlen_func(
            flatten_batch(q),
            flat_keys(k, docs),
            flat_keys(v, docs),
            docs.cu_q,
            docs.cu_k,
            docs.max_q,
            docs.max_k,
            **self._common(dropout_p),
        )
        return out.view(q.shape)

    def _attend_packed(self, qkv: torch.Tensor, docs: DocSegments | None, dropout_p: float) -> torch.Tensor:
        """Packed ``[B, T, 3, H, D]`` -> ``[B, T, H, D]`` (one kernel reads Q, K and V in place)."""
        fa = self._lib()
        B, T, _, H, D = qkv.shape
        if docs is None:
            return fa.flash_attn_qkvpacked_func(qkv, **self._common(dropout_p))
        if docs.shared and docs.local_k_slice is None:
            out = fa.flash_attn_varlen_qkvpacked_func(
                qkv.reshape(B * T, 3, H, D), docs.cu_q, docs.max_q, **self._common(dropout_p)
            )
            return out.view(B, T, H, D)
        return super()._attend_packed(qkv, docs, dropout_p)

    def _attend_kvcache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manager: KVCacheManager, dropout_p: float
    ) -> torch.Tensor:
        """``flash_attn_with_kvcache``: appends ``k, v [B, T_new, Hkv, D]`` in place, honours leftpad."""
        refuse_kv_cache_dropout(self.name, dropout_p)
        pos = kv_cache_position(manager, q, k)
        return self._lib().flash_attn_with_kvcache(
            q,
            manager.k_cache,
            manager.v_cache,
            k=k,
            v=v,
            cache_seqlens=pos,
            cache_leftpad=manager.cache_leftpad,
            softmax_scale=self.softmax_scale,
            causal=True,
            window_size=self.window_size,
        )

    # ----- ring CP through ring-flash-attn ------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        kv_cache_manager: KVCacheManager | None = None,
    ) -> torch.Tensor:
        """As :meth:`AttentionBackend.forward`; ring CP goes to ring-flash-attn when it covers the call."""
        if self.cp_enabled and self.ring is not None and kv_cache_manager is None:
            ring = self._ring_flash_attn()
            if ring is not None:
                out = self._ring_flash_attn_forward(
                    ring,
                    qkv,
                    cu_doc_lens=cu_doc_lens,
                    cu_doc_lens_q=cu_doc_lens_q,
                    cu_doc_lens_k=cu_doc_lens_k,
                    max_doc_len=max_doc_len,
                    max_doc_len_q=max_doc_len_q,
                    max_doc_len_k=max_doc_len_k,
                    local_k_slice=local_k_slice,
                )
                if out is not None:
                    return out
        return super().forward(
            qkv,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
            kv_cache_manager=kv_cache_manager,
        )

    def _ring_flash_attn(self) -> ModuleType | None:
        if not self.use_ring_flash_attn or os.environ.get(RING_FLASH_ATTN_ENV, "1") == "0":
            return None
        status = package_status("ring_flash_attn", "ring-flash-attn")
        return importlib.import_module("ring_flash_attn") if status else None

    def _ring_flash_attn_forward(
        self,
        ring: ModuleType,
        qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        cu_doc_lens: torch.Tensor | None,
        cu_doc_lens_q: torch.Tensor | None,
        cu_doc_lens_k: torch.Tensor | None,
        max_doc_len: int | None,
        max_doc_len_q: int | None,
        max_doc_len_k: int | None,
        local_k_slice: slice | None,
    ) -> torch.Tensor | None:
        """ring-flash-attn for the combinations it computes correctly; ``None`` = use our ring.

        zig-zag: one segmentation (or none), no window (ring-flash-attn issue 35). llama3: separate
        ``cu_doc_lens_q/_k`` and ``local_k_slice`` (its only form). Local shapes in and out:
        ``[B, T_local, H, D]``.
        """
        packed = isinstance(qkv, torch.Tensor)
        if packed:
            self.assert_supports_packed_qkv()
            if qkv.dim() != 5 or qkv.shape[2] != 3:
                raise ValueError(f"packed qkv must be [B, T, 3, H, D], got shape {tuple(qkv.shape)}")
            q, k, v = qkv.unbind(dim=2)
        else:
            q, k, v = qkv
        self._check_inputs(q, k, v)
        B, T, H, D = q.shape
        strategy = str(self.ring.load_balancer)
        dropout_p = self.effective_dropout()
        common = {
            "dropout_p": dropout_p,
            "softmax_scale": self.softmax_scale,
            "causal": True,
            "window_size": self.window_size,
            "deterministic": deterministic_requested(),
            "group": self.cp_pg,
        }
        if strategy == "zig_zag":
            if self.window_size != (-1, -1) or local_k_slice is not None:
                return None
            if any(x is not None for x in (cu_doc_lens_q, cu_doc_lens_k, max_doc_len_q, max_doc_len_k)):
                return None
            docs = resolve_doc_args(
                total_q=B * T, total_k=B * T, cu_doc_lens=cu_doc_lens, max_doc_len=max_doc_len
            )
            if docs is None:
                if packed:
                    return ring.zigzag_ring_flash_attn_qkvpacked_func(qkv, **common)
                return ring.zigzag_ring_flash_attn_func(q, k, v, **common)
            if packed:
                out = ring.zigzag_ring_flash_attn_varlen_qkvpacked_func(
                    qkv.reshape(B * T, 3, H, D), docs.cu_q, docs.max_q, **common
                )
            else:
                out = ring.zigzag_ring_flash_attn_varlen_func(
                    flatten_batch(q), flatten_batch(k), flatten_batch(v), docs.cu_q, docs.max_q, **common
                )
            return out.view(B, T, H, D)
        if strategy == "llama3":
            if cu_doc_lens is not None or max_doc_len is not None or local_k_slice is None:
                return None
            if cu_doc_lens_q is None or cu_doc_lens_k is None:
                return None
            total_k = local_k_slice.stop - local_k_slice.start
            docs = resolve_doc_args(
                total_q=B * T,
                total_k=total_k,
                cu_doc_lens_q=cu_doc_lens_q,
                cu_doc_lens_k=cu_doc_lens_k,
                max_doc_len_q=max_doc_len_q,
                max_doc_len_k=max_doc_len_k,
                local_k_slice=local_k_slice,
            )
            assert docs is not None
            out = ring.llama3_flash_attn_varlen_func(
                flatten_batch(q),
                flatten_batch(k),
                flatten_batch(v),
                docs.cu_q,
                docs.cu_k,
                docs.max_q,
                docs.max_k,
                self.head_stride,
                local_k_slice,
                **common,
            )
            return out.view(B, T, H, D)
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
