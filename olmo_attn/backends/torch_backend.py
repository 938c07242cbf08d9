"""``TorchAttentionBackend``: every attention feature with nothing but PyTorch, never a T×T mask.

Per call (``olmo_attn.ops.torch_kernel`` holds the kernels):

==========================================  =====================================  ==========================
mask                                        CUDA                                   CPU
==========================================  =====================================  ==========================
causal, no window/documents                 SDPA ``enable_gqa`` (cuDNN > flash)    SDPA (CPU flash kernel) for
                                                                                   float32/64; half: blockwise
window, documents, both, KV cache           FlexAttention block mask (documents:   blockwise kernel
                                            or ``varlen_attn``, one flag)
dropout outside plain causal                blockwise kernel (counter-based mask)  blockwise kernel
==========================================  =====================================  ==========================

The output is always ``[B, T, H, D]`` (OLMo-core returns ``[B*T, H, D]`` with documents).

Under ``torch.compile`` the masked paths (window, documents, KV cache, dropout) run as opaque
custom ops (:mod:`olmo_attn.ops.compiled`) with the same kernels: one graph, no graph break, and
no recompile for new document offsets or decode positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..masks import DocSegments
from ..ops import compiled as compiled_ops
from ..ops.dropout import new_seed
from ..ops.flex import flex_supported
from ..ops.kernel import KernelCall
from ..ops.sdpa import sdpa_attention, sdpa_supported
from ..ops.torch_kernel import DEFAULT_BLOCKS, TorchKernel, attend, prepare_mask
from .base import AttentionBackend

if TYPE_CHECKING:
    from ..kv_cache import KVCacheManager


class TorchAttentionBackend(AttentionBackend):
    """PyTorch-only backend: causal/window/documents/KV cache/packed QKV/dropout on CPU and CUDA.

    Inputs ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` (GQA/MQA without repeating K/V) or packed
    ``[B, T, 3, H, D]``; output ``[B, T, Hq, D]``.
    """

    name: ClassVar[str] = "torch"

    def kernel(self) -> TorchKernel:
        """The ``(out, lse)`` kernel ring attention runs on."""
        return TorchKernel()

    def _call(self, dropout_p: float, **segments: object) -> KernelCall:
        # while compiling, the seed is drawn in the graph instead (_traced_seed): no host read
        draw = dropout_p > 0.0 and not torch.compiler.is_compiling()
        return KernelCall(
            scale=self.softmax_scale,
            causal=True,
            window=self.window_size,
            dropout_p=dropout_p,
            dropout_seed=new_seed() if draw else None,
            **segments,  # type: ignore[arg-type]
        )

    @staticmethod
    def _traced_seed(call: KernelCall) -> torch.Tensor | None:
        return compiled_ops.draw_seed() if call.dropout_p > 0.0 else None

    # ----- hooks --------------------------------------------------------------------------------
    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        """Causal attention ``[B, T, Hq, D]`` with the backend's window; documents per ``docs``."""
        if docs is None:
            if self.window_size == (-1, -1) and q.shape[1] == k.shape[1] and sdpa_supported(q, k, dropout_p):
                return sdpa_attention(q, k, v, causal=True, scale=self.softmax_scale, dropout_p=dropout_p)
            call = self._call(dropout_p)
            if torch.compiler.is_compiling():
                return compiled_ops.masked_attention(q, k, v, call, self._traced_seed(call))
            return attend(q, k, v, call)
        B, T, Hq, D = q.shape
        k_flat = k.reshape(-1, *k.shape[2:])  # [B*T, Hkv, D]; flat index b*T + t
        v_flat = v.reshape(-1, *v.shape[2:])
        if docs.local_k_slice is not None:
            k_flat, v_flat = k_flat[docs.local_k_slice], v_flat[docs.local_k_slice]
        call = self._call(
            dropout_p,
            cu_seqlens_q=docs.cu_q,
            cu_seqlens_k=docs.cu_k,
            max_seqlen_q=docs.max_q,
            max_seqlen_k=docs.max_k,
            cu_seqlens_q_host=docs.cu_q_host,
            cu_seqlens_k_host=docs.cu_k_host,
        )
        if torch.compiler.is_compiling():
            out = compiled_ops.masked_attention(
                q.reshape(B * T, Hq, D), k_flat, v_flat, call, self._traced_seed(call)
            )
        else:
            out = attend(q.reshape(B * T, Hq, D), k_flat, v_flat, call)
        return out.view(B, T, Hq, D)

    def _attend_packed(self, qkv: torch.Tensor, docs: DocSegments | None, dropout_p: float) -> torch.Tensor:
        """Packed ``[B, T, 3, H, D]``: strided views into ``_attend`` (the kernels take any strides)."""
        q, k, v = qkv.unbind(dim=2)
        return self._attend(q, k, v, docs, dropout_p)

    def _attend_kvcache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manager: KVCacheManager, dropout_p: float
    ) -> torch.Tensor:
        """Write ``k, v [B, T_new, Hkv, D]`` into the cache and attend ``q [B, T_new, Hq, D]`` over it.

        Query ``t`` sits at cache index ``cache_seqlens + t`` and sees ``leftpad[b] <= j <= that``
        (window-clipped). Gradients flow to ``q`` only (the cache holds detached copies). CPU
        attends over the used prefix of the cache; CUDA over the whole cache with the unused tail
        masked, so shapes (and compiled kernels) stay fixed while decoding.
        """
        if manager.k_cache.shape[2:] != k.shape[2:]:
            raise ValueError(
                f"KV cache holds [.., H_kv={manager.num_kv_heads}, D={manager.head_dim}] but k has shape "
                f"{tuple(k.shape)}; build the manager with this layer's n_kv_heads and head_dim"
            )
        call = self._call(dropout_p)
        if torch.compiler.is_compiling():
            # the position is the manager's CPU counter tensor, read inside the ops when they
            # run: no guard on its value, so decoding does not recompile per token
            manager.check_new_kv(k, v)
            return compiled_ops.kv_cache_attention(
                q,
                k,
                v,
                k_cache=manager.k_cache,
                v_cache=manager.v_cache,
                leftpad=manager.cache_leftpad,
                position=manager.position_counter,
                call=call,
                seed=self._traced_seed(call),
            )
        start = manager.append(k, v)
        n = q.shape[1]
        used = start + n
        if q.is_cuda:
            kc, vc = manager.k_cache, manager.v_cache
        else:
            kc, vc = manager.k_cache[:, :used], manager.v_cache[:, :used]
        # Slots no query may see (before a row's left padding, past the used length) are masked
        # out of the softmax, but 0 * NaN is NaN in P @ V: never let their contents (garbage or
        # poison) reach the output. One select over the cache, cheap next to the attention.
        j = torch.arange(kc.shape[1], device=kc.device)
        visible = ((j[None, :] >= manager.cache_leftpad[:, None].to(j.dtype)) & (j[None, :] < used))[
            ..., None, None
        ]
        kc = torch.where(visible, kc, 0).to(q.dtype)
        vc = torch.where(visible, vc, 0).to(q.dtype)
        return attend(q, kc, vc, call, q_start=start, key_lo=manager.cache_leftpad, key_hi=used)

    def warmup_cache(self, max_seq_len: int, device: torch.device) -> None:
        """Pre-build the window block plan / mask for ``max_seq_len`` so the first step pays nothing."""
        if self.window_size == (-1, -1):
            return  # plain causal runs on SDPA: nothing to build
        dev = torch.device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        # zero-stride stand-ins: the mask depends only on shapes, device and dtype
        q = torch.empty((), device=dev, dtype=dtype).expand(1, max_seq_len, self.n_heads, self.head_dim)
        k = torch.empty((), device=dev, dtype=dtype).expand(1, max_seq_len, self.n_kv_heads, self.head_dim)
        kind = "flex" if flex_supported(q, 0.0) else "blockwise"
        prepare_mask(
            q, k, self._call(0.0), kind=kind, q_start=None, key_lo=None, key_hi=None, blocks=DEFAULT_BLOCKS
        )
