"""``te``: the Transformer Engine adapter (``transformer_engine.pytorch.DotProductAttention``).

The backend owns one ``DotProductAttention`` as ``self.te_attn`` (so TE's extra state, if any,
lives under ``te_attn.`` as in OLMo-core), built with ``num_attention_heads=H``,
``kv_channels=D``, ``num_gqa_groups=H_kv``, ``attention_dropout=dropout_p``,
``attn_mask_type="causal"``, ``window_size=(left, 0)``, ``qkv_format="bshd"`` and
``softmax_scale``. TE applies dropout only in training mode, like our modules.

Per call:

* plain causal / window: ``te_attn(q, k, v, qkv_format="bshd", attn_mask_type="causal",
  window_size=(left, 0))`` -> ``[B, T, H*D]``, viewed as ``[B, T, H, D]``;
* documents (``cu_doc_lens``): ``qkv_format="thd"`` on the flattened batch with
  ``cu_seqlens_q = cu_seqlens_kv = cu_doc_lens``, ``max_seqlen_q/kv`` and
  ``attn_mask_type="padding_causal"``. OLMo-core has this code but a guard in front of it rejects
  every document argument, so its TE backend can never mask documents; ours does. Separate
  query/key segmentations (llama3) are not offered;
* ring CP (zig-zag balancer only): TE's own ring, ``set_context_parallel_group(...,
  cp_comm_type="p2p")`` on the default stream; TE expects each rank to hold chunks ``r`` and
  ``2W-1-r``, which is the zig-zag layout. No window and no documents on this path;
* Ulysses CP: our all-to-all (:mod:`olmo_attn.cp.ulysses`) around a plain TE call. OLMo-core used
  TE's ``"a2a"`` mode, which assumes the zig-zag chunk layout while the Ulysses balancer shards
  contiguously; ours never hands TE a layout it does not expect.

No KV cache, no LSE kernel (TE returns no log-sum-exp), fp16/bf16.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..exceptions import UnsupportedFeatureError
from ..masks import DocSegments, resolve_doc_args
from . import capabilities as caps
from .base import AttentionBackend
from .flash2 import flatten_batch, import_backend_module

if TYPE_CHECKING:
    from ..kv_cache import KVCacheManager

#: our ring load balancer -> TE ``cp_comm_type``
TE_RING_COMM = {"zig_zag": "p2p"}


def _te() -> ModuleType:
    return import_backend_module("te", "transformer_engine.pytorch")


class TEAttentionBackend(AttentionBackend):
    """Transformer Engine ``DotProductAttention``: fp16/bf16, GQA, window, documents, ring/Ulysses CP.

    Inputs ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` or packed ``[B, T, 3, H, D]``; output
    ``[B, T, Hq, D]``.
    """

    name: ClassVar[str] = "te"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        caps.assert_head_dim(self.name, self.head_dim)
        te = _te()
        self.te_attn = te.DotProductAttention(
            self.n_heads,
            self.head_dim,
            num_gqa_groups=self.n_kv_heads,
            attention_dropout=self.dropout_p,
            attn_mask_type="causal",
            window_size=self._te_window(),
            qkv_format="bshd",
            softmax_scale=self.softmax_scale,
        )

    def _te_window(self) -> tuple[int, int]:
        # TE's causal masks need right == 0; (-1, 0) is plain causal
        return (self.window_size[0], 0)

    def kernel(self):  # type: ignore[override]
        """TE returns no log-sum-exp: raises the capability error naming the backends that do."""
        caps.assert_feature(self.name, "lse", " (Transformer Engine returns no log-sum-exp)")
        return super().kernel()

    # ----- CP --------------------------------------------------------------------------------
    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Ring: TE's own p2p ring (zig-zag layout); Ulysses: our all-to-all around plain TE calls."""
        super().apply_cp(cp_mesh, ring=ring, uly=uly)
        if self.ring is not None:
            import torch.distributed as dist

            self.te_attn.set_context_parallel_group(
                cp_group=self.cp_pg,
                cp_global_ranks=dist.get_process_group_ranks(self.cp_pg),
                cp_stream=torch.cuda.default_stream(),
                cp_comm_type=TE_RING_COMM[str(self.ring.load_balancer)],
            )

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
        """As :meth:`AttentionBackend.forward`; with ring CP, TE runs the ring itself."""
        if not (self.cp_enabled and self.ring is not None):
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
        if kv_cache_manager is not None:
            self.assert_supports_kv_cache()
        if isinstance(qkv, torch.Tensor):
            if qkv.dim() != 5 or qkv.shape[2] != 3:
                raise ValueError(f"packed qkv must be [B, T, 3, H, D], got shape {tuple(qkv.shape)}")
            q, k, v = qkv.unbind(dim=2)
        else:
            q, k, v = qkv
        self._check_inputs(q, k, v)
        B, T = q.shape[:2]
        docs = resolve_doc_args(
            total_q=B * T,
            total_k=B * T,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
        )
        if docs is not None or self.window_size != (-1, -1):
            raise UnsupportedFeatureError(
                "attention backend 'te' runs ring CP through Transformer Engine's p2p ring, which takes "
                "neither documents nor a sliding window here; use backend='flash_4' / 'flash_2' / 'torch' "
                "(our LSE ring) or UlyssesContextParallelStyle()"
            )
        return self._attend(q, k, v, None, self.effective_dropout())

    # ----- hooks -----------------------------------------------------------------------------
    @torch.compiler.disable
    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        """``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, Hq, D]``."""
        if docs is None:
            out = self.te_attn(
                q, k, v, qkv_format="bshd", attn_mask_type="causal", window_size=self._te_window()
            )
            return out.view(q.shape)
        if not docs.shared or docs.local_k_slice is not None:
            caps.assert_feature(self.name, "documents_qk")
        out = self.te_attn(
            flatten_batch(q),
            flatten_batch(k),
            flatten_batch(v),
            qkv_format="thd",
            cu_seqlens_q=docs.cu_q,
            cu_seqlens_kv=docs.cu_k,
            max_seqlen_q=docs.max_q,
            max_seqlen_kv=docs.max_k,
            attn_mask_type="padding_causal",
            window_size=self._te_window(),
        )
        return out.view(q.shape)
