"""``AttentionBackend``: the shared front half of every backend.

The base class validates inputs, resolves document arguments, unpacks packed QKV, applies the
train/eval dropout rule, and routes to the KV-cache, ring-CP, Ulysses-CP or plain path. Concrete
backends implement only the hooks ``_attend`` (and optionally ``_attend_packed``,
``_attend_kvcache``) plus ``kernel()`` for ring attention. Capability checks read
:mod:`.capabilities`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ..config import StrEnum
from ..exceptions import ConfigurationError
from ..masks import DocSegments, resolve_doc_args, validate_window
from ..ops.containment import contain_documents, fault_containment_enabled
from . import capabilities as caps
from .capabilities import Feature

if TYPE_CHECKING:
    from ..buffer_cache import BufferCache
    from ..kv_cache import KVCacheManager
    from ..ops.kernel import AttentionKernel


class AttentionBackendName(StrEnum):
    """The attention backends (values equal the names)."""

    torch = "torch"
    flash_2 = "flash_2"
    flash_3 = "flash_3"
    flash_4 = "flash_4"
    te = "te"

    def get_class(self) -> type[AttentionBackend]:
        import importlib

        module = {
            "torch": "torch_backend",
            "flash_2": "flash2",
            "flash_3": "flash3",
            "flash_4": "flash4",
            "te": "te",
        }[self.value]
        mod = importlib.import_module(f"olmo_attn.backends.{module}")
        return getattr(mod, caps.get_spec(self.value).class_name)

    def build(
        self,
        *,
        head_dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        scale: float | None = None,
        dropout_p: float = 0.0,
        window_size: tuple[int, int] = (-1, -1),
        cache: BufferCache | None = None,
    ) -> AttentionBackend:
        return self.get_class()(
            head_dim=head_dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            scale=scale,
            dropout_p=dropout_p,
            window_size=window_size,
            cache=cache.with_namespace(f"attn_backend={self.value}") if cache is not None else None,
        )

    def assert_supported(self) -> None:
        self.get_class().assert_supported()

    def assert_supports_swa(self) -> None:
        self.get_class().assert_supports_swa()

    def assert_supports_ring_cp(self) -> None:
        self.get_class().assert_supports_ring_cp()

    def assert_supports_ulysses_cp(self) -> None:
        self.get_class().assert_supports_ulysses_cp()

    def assert_supports_packed_qkv(self) -> None:
        self.get_class().assert_supports_packed_qkv()

    def assert_supports_kv_cache(self) -> None:
        self.get_class().assert_supports_kv_cache()


class AttentionBackend(nn.Module):
    """Scaled dot-product attention with a fixed configuration (always causal at module level).

    ``forward`` takes ``(q, k, v)`` with ``q [B, T, H, D]``, ``k, v [B, T, H_kv, D]`` or a packed
    ``[B, T, 3, H, D]`` tensor and returns ``[B, T, H, D]`` on every path (OLMo-core returns
    ``[B*T, H, D]`` for document masking; callers that ``view(B, T, -1)`` see no difference).
    """

    name: ClassVar[str]

    def __init__(
        self,
        *,
        head_dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        scale: float | None = None,
        dropout_p: float = 0.0,
        window_size: tuple[int, int] = (-1, -1),
        cache: BufferCache | None = None,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if head_dim <= 0 or n_heads <= 0 or n_kv_heads <= 0:
            raise ConfigurationError(
                f"head_dim, n_heads and n_kv_heads must be positive, got {head_dim}, {n_heads}, {n_kv_heads}"
            )
        if n_heads % n_kv_heads:
            raise ConfigurationError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; choose n_kv_heads among "
                f"{[d for d in range(1, n_heads + 1) if n_heads % d == 0]}"
            )
        if not 0.0 <= dropout_p < 1.0:
            raise ConfigurationError(f"dropout_p={dropout_p} must be in [0, 1)")
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.scale = scale
        self.dropout_p = dropout_p
        self.window_size = validate_window(window_size)
        self.cache = cache
        self.cp_pg: Any = None
        self.cp_enabled = False
        self.ring: Any = None
        self.uly: Any = None
        self.head_stride = 1
        self.assert_supported()
        if self.window_size != (-1, -1):
            self.assert_supports_swa()
        if dropout_p > 0:
            caps.assert_feature(self.name, Feature.dropout, " (construct it with dropout_p=0.0)")

    # ----- capability checks: all read the one table -------------------------------------------
    @classmethod
    def spec(cls) -> caps.BackendSpec:
        return caps.get_spec(cls.name)

    @classmethod
    def assert_supported(cls) -> None:
        caps.assert_available(cls.name)

    @classmethod
    def assert_supports(cls, feature: Feature | str, detail: str = "") -> None:
        caps.assert_feature(cls.name, feature, detail)

    @classmethod
    def assert_supports_swa(cls) -> None:
        cls.assert_supports(Feature.sliding_window)

    @classmethod
    def assert_supports_ring_cp(cls) -> None:
        cls.assert_supports(Feature.ring_cp)

    @classmethod
    def assert_supports_ulysses_cp(cls) -> None:
        cls.assert_supports(Feature.ulysses_cp)

    @classmethod
    def assert_supports_packed_qkv(cls) -> None:
        cls.assert_supports(Feature.packed_qkv)

    @classmethod
    def assert_supports_kv_cache(cls) -> None:
        cls.assert_supports(Feature.kv_cache)

    # ----- configuration ------------------------------------------------------------------------
    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def effective_dropout(self) -> float:
        """Dropout only in training mode (OLMo-core also drops in eval mode; we don't)."""
        return self.dropout_p if self.training else 0.0

    def warmup_cache(self, max_seq_len: int, device: torch.device) -> None:
        """Pre-build whatever the backend caches per sequence length (default: nothing)."""

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Enable context parallelism over ``cp_mesh`` (a 1-D ``DeviceMesh``)."""
        if ring is not None:
            self.assert_supports_ring_cp()
            strategy = str(ring.load_balancer)
            if strategy not in self.spec().ring_strategies:
                raise ValueError(
                    f"ring load balancer '{strategy}' is not a ring strategy of backend '{self.name}'; "
                    f"use one of {list(self.spec().ring_strategies)} or UlyssesContextParallelStyle()"
                )
            self.head_stride = ring.head_stride
        elif uly is not None:
            self.assert_supports_ulysses_cp()
        else:
            raise ValueError("One of ring or uly must be specified")
        self.cp_pg = cp_mesh.get_group()
        self.ring = ring
        self.uly = uly
        self.cp_enabled = True

    def kernel(self) -> AttentionKernel:
        """The ``(out, lse)`` kernel ring attention runs on."""
        raise NotImplementedError(
            f"backend '{self.name}' exposes no LSE kernel"
        )  # overridden where supported

    # ----- forward ------------------------------------------------------------------------------
    def forward(
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
        packed = isinstance(qkv, torch.Tensor)
        if packed:
            self.assert_supports_packed_qkv()
            if qkv.dim() != 5 or qkv.shape[2] != 3:
                raise ValueError(f"packed qkv must be [B, T, 3, H, D], got shape {tuple(qkv.shape)}")
            q, k, v = qkv.unbind(dim=2)
        else:
            if not (isinstance(qkv, (tuple, list)) and len(qkv) == 3):
                raise TypeError("qkv must be a (q, k, v) tuple or a packed [B, T, 3, H, D] tensor")
            q, k, v = qkv
        self._check_inputs(q, k, v)
        B, T = q.shape[:2]
        # Ulysses attends over the whole sequence: its document offsets are global (W x the shard)
        cp_factor = self._ulysses_world() if self.cp_enabled and self.ring is None else 1
        total_k = (
            (local_k_slice.stop - local_k_slice.start)
            if local_k_slice is not None
            else k.shape[0] * k.shape[1] * cp_factor
        )
        try:
            docs = (
                resolve_doc_args(
                    total_q=B * T * cp_factor,
                    total_k=total_k,
                    cu_doc_lens=cu_doc_lens,
                    cu_doc_lens_q=cu_doc_lens_q,
                    cu_doc_lens_k=cu_doc_lens_k,
                    max_doc_len=max_doc_len,
                    max_doc_len_q=max_doc_len_q,
                    max_doc_len_k=max_doc_len_k,
                    local_k_slice=local_k_slice,
                )
                if not self.cp_enabled or self.uly is not None
                else None
            )
        except (ValueError, TypeError) as e:
            if self.cp_enabled and self.uly is not None:  # the other ranks must not wait in the all-to-all
                from ..cp.ulysses import report_local_error

                report_local_error(self, q, k, v, e)
            raise
        if docs is not None:
            self.assert_supports(Feature.documents_qk if not docs.shared else Feature.documents)
            if self.window_size != (-1, -1):
                self.assert_supports(
                    Feature.documents_window,
                    f" (window_size={self.window_size} with cu_doc_lens; drop one of them or build the layer "
                    "with another backend)",
                )
        dropout_p = self.effective_dropout()

        if kv_cache_manager is not None:
            self.assert_supports_kv_cache()
            if self.cp_enabled:
                raise ValueError("KV caching cannot be combined with context parallelism; decode without CP")
            if docs is not None:
                raise ValueError(
                    "KV-cache decoding does not take cu_doc_lens; decode one document per batch row "
                    "(use cache_leftpad for left-padded prompts)"
                )
            return self._attend_kvcache(q, k, v, kv_cache_manager, dropout_p)
        if self.cp_enabled and self.ring is not None:
            from ..cp.ring import ring_attention

            return ring_attention(
                self,
                q,
                k,
                v,
                cu_doc_lens=cu_doc_lens,
                cu_doc_lens_q=cu_doc_lens_q,
                cu_doc_lens_k=cu_doc_lens_k,
                max_doc_len=max_doc_len,
                max_doc_len_q=max_doc_len_q,
                max_doc_len_k=max_doc_len_k,
                local_k_slice=local_k_slice,
                dropout_p=dropout_p,
            )
        if self.cp_enabled and self.uly is not None:
            from ..cp.ulysses import ulysses_attention

            return ulysses_attention(self, q, k, v, docs=docs, dropout_p=dropout_p)
        if docs is not None and docs.local_k_slice is None and fault_containment_enabled():
            segs = docs
            return contain_documents(
                lambda q_, k_, v_: self._attend(q_, k_, v_, segs, dropout_p), q, k, v, docs.cu_q, docs.cu_k
            )
        if packed:
            return self._attend_packed(qkv, docs, dropout_p)
        return self._attend(q, k, v, docs, dropout_p)

    def _ulysses_world(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.cp_pg)

    def _check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, T, heads, head_dim], got shape {tuple(t.shape)}")
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim or v.shape[-1] != self.head_dim:
            raise ValueError(
                f"head_dim mismatch: backend built for {self.head_dim}, got q/k/v last dims "
                f"{q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]}"
            )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
        hq, hkv = q.shape[2], k.shape[2]
        if hkv == 0 or hq % hkv:
            raise ValueError(
                f"q has {hq} heads, k/v have {hkv}: the query heads must be a multiple of the kv heads"
            )
        if q.dtype != k.dtype or q.dtype != v.dtype:
            raise TypeError(
                f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
            )
        if not q.is_floating_point():
            raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
        caps.assert_dtype(self.name, q.dtype)

    # ----- hooks ------------------------------------------------------------------------------
    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        """Causal attention ``[B, T, H, D]`` with this backend's window; documents per ``docs``.

        Abstract hook: every concrete backend overrides it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _attend (abstract hook)")

    def _attend_packed(self, qkv: torch.Tensor, docs: DocSegments | None, dropout_p: float) -> torch.Tensor:
        """Packed ``[B, T, 3, H, D]`` input; default: views into the unpacked path."""
        q, k, v = qkv.unbind(dim=2)
        return self._attend(q, k, v, docs, dropout_p)

    def _attend_kvcache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manager: KVCacheManager, dropout_p: float
    ) -> torch.Tensor:
        """Write the new ``k, v`` into ``manager``'s cache and attend over it (bottom-right causal)."""
        self.assert_supports_kv_cache()
        raise NotImplementedError(
            f"{type(self).__name__} claims kv_cache in the capability table but does not implement "
            "_attend_kvcache (abstract hook)"
        )
