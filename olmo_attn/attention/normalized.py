"""``NormalizedAttention``: nGPT's attention (normalised projections, learned ``sq`` / ``sk``
scales, ``sqrt(head_dim)`` softmax scale)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..backends.base import AttentionBackendName
from ..buffer_cache import BufferCache
from ..norm import LayerNormConfig, l2_normalize
from ..rope import (
    RoPEConfig,
)
from ..validate import check_attention_inputs, empty_attention_output, is_empty_batch
from .common import check_positive_int
from .default import Attention

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------
# NormalizedAttention
# ---------------------------------------------------------------------------------------------
class NormalizedAttention(Attention):
    """nGPT attention (beta): no biases, QK-norm over all heads jointly (nGPT configs use
    ``LayerNormConfig(name="l2_norm")``), learned per-channel scales ``sq [H·D]`` / ``sk [H_kv·D]``
    (effective scale ``sq · sqrt(d_model)``, 1 at init) and softmax scale ``sqrt(D)``.

    Call :meth:`normalize_matrices` after every optimizer step. bf16 activations stay bf16 (the
    scales are cast to the activation dtype; OLMo-core promotes to float32).
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope: RoPEConfig | None = None,
        qk_norm: LayerNormConfig | None = None,
        use_flash: bool | None = None,
        backend: AttentionBackendName | str | None = None,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
    ):
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        super().__init__(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            rope=rope,
            qk_norm=qk_norm,
            use_flash=use_flash,
            backend=backend,
            softmax_scale=math.sqrt(d_model // n_heads),
            bias=False,
            dtype=dtype,
            init_device=init_device,
            cache=cache,
        )
        self.sq_init_value = 1.0
        self.sq_init_scaling = 1.0 / math.sqrt(d_model)
        self.sq = nn.Parameter(torch.empty(self.head_dim * self.n_heads, dtype=dtype, device=init_device))
        self.sk_init_value = 1.0
        self.sk_init_scaling = 1.0 / math.sqrt(d_model)
        self.sk = nn.Parameter(torch.empty(self.head_dim * self.n_kv_heads, dtype=dtype, device=init_device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``sq`` and ``sk`` to ``1/sqrt(d_model)`` everywhere (effective scale 1)."""
        with torch.no_grad():
            nn.init.ones_(self.sq)
            nn.init.ones_(self.sk)
            self.sq.mul_(self.sq_init_scaling)
            self.sk.mul_(self.sk_init_scaling)

    def forward(
        self,
        x: torch.Tensor,
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """nGPT attention over ``x [B, T, d_model]`` → ``[B, T, d_model]`` (arguments as
        :meth:`Attention.forward`; ``cache_leftpad`` is not supported)."""
        if cache_leftpad is not None:
            raise NotImplementedError(
                "cache_leftpad is not supported for the normalized attention variant; use Attention "
                "for left-padded KV-cache decoding"
            )
        local_k_slice = check_attention_inputs(
            self,
            x,
            proj=self.w_q,
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
        )
        if is_empty_batch(x):
            return empty_attention_output(self, x, self.w_out)
        B, T, _ = x.shape
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # [B, T, H*D], [B, T, Hkv*D] x2
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)  # jointly over all heads (checkpoint-compatible with OLMo-core)
            k = self.k_norm(k)
        sq = (self.sq * (self.sq_init_value / self.sq_init_scaling)).to(q.dtype)  # [H*D]
        sk = (self.sk * (self.sk_init_value / self.sk_init_scaling)).to(k.dtype)  # [Hkv*D]
        q = sq.view(1, 1, -1) * q
        k = sk.view(1, 1, -1) * k
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self._apply_rope(
                q, k, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis, cu_doc_lens=cu_doc_lens
            )
        att = self.sdpa(
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
        )  # [B, T, H, D]
        return self.w_out(att.reshape(B, T, -1))

    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        raise NotImplementedError("TP is not implemented for the normalized attention variant")

    @torch.no_grad()
    def normalize_matrices(self) -> None:
        """Unit-norm rows of ``w_q/w_k/w_v.weight`` (over ``d_model``, their input dim) and unit-norm
        columns of ``w_out.weight`` (over ``d_model``, its output dim); norm in float32, no eps."""
        for w in (self.w_q.weight, self.w_k.weight, self.w_v.weight):
            w.copy_(l2_normalize(w, dim=-1))
        self.w_out.weight.copy_(l2_normalize(self.w_out.weight, dim=0))
