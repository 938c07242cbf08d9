"""``FusedAttention``: one packed QKV projection, the packed-QKV kernel path of every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..backends.base import AttentionBackendName
from ..backends.capabilities import Feature
from ..buffer_cache import BufferCache
from ..exceptions import ConfigurationError
from ..mixer import SequenceMixer
from ..rope import (
    FusedRotaryEmbedding,
    RoPEConfig,
    RoPEType,
    document_position_ids,
)
from ..validate import check_attention_inputs, empty_attention_output, is_empty_batch
from .common import (
    BackendMixin,
    check_positive_int,
    init_linear,
    init_method_name,
    resolve_backend_name,
    traced_rope_rows,
)

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------
# FusedAttention
# ---------------------------------------------------------------------------------------------
class FusedAttention(BackendMixin, SequenceMixer):
    """Multi-head attention with one packed projection ``w_qkv``. MHA only
    (``D = d_model // n_heads``); RoPE must be ``name="fused"``; no gate, QK-norm, window or KV cache.

    ``w_qkv.weight [3·d_model, d_model]`` is ``cat([w_q, w_k, w_v])`` of an :class:`Attention`
    checkpoint. The backend is chosen automatically among those supporting packed QKV (OLMo-core
    requires flash_2); the torch backend runs it on CPU and GPU.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        bias: bool = True,
        rope: RoPEConfig | None = None,
        clip_qkv: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        backend: AttentionBackendName | str | None = None,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ConfigurationError(
                f"FusedAttention needs d_model={d_model} divisible by n_heads={n_heads} (D = d_model // "
                "n_heads); use Attention with head_dim for other shapes"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigurationError(f"dropout={dropout} must be in [0, 1)")
        if clip_qkv is not None and not clip_qkv > 0:
            raise ConfigurationError(f"clip_qkv={clip_qkv} must be positive (or None for no clipping)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.clip_qkv = clip_qkv
        factory = dict(dtype=dtype, device=init_device)
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.w_out = nn.Linear(d_model, d_model, bias=bias, **factory)

        self.rope: FusedRotaryEmbedding | None = None
        if rope is not None:
            if RoPEType(rope.name) != RoPEType.fused:
                raise ConfigurationError(
                    f"FusedAttention needs RoPEConfig(name='fused'), got name='{rope.name}'"
                )
            built = rope.build(self.head_dim, cache=cache)
            assert isinstance(built, FusedRotaryEmbedding)
            self.rope = built

        features = [Feature.packed_qkv] + ([Feature.dropout] if dropout > 0 else [])
        self._setup_backend(
            resolve_backend_name(backend, None),
            features=features,
            param_dtype=dtype,
            head_dim=self.head_dim,
            n_heads=n_heads,
            dropout_p=dropout,
            cache=cache,
        )

    @property
    def cp_enabled(self) -> bool:
        return self.backend.cp_enabled

    def forward(
        self,
        x: torch.Tensor,
        max_doc_len: int | None = None,
        cu_doc_lens: torch.Tensor | None = None,
        pos_sin: torch.Tensor | None = None,
        pos_cos: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``x [B, T, d_model]`` → ``[B, T, d_model]`` (note: ``max_doc_len`` comes
        before ``cu_doc_lens``, as in OLMo-core). ``pos_sin, pos_cos [rows, D/2]``: fused RoPE rows.
        Documents restart RoPE positions (OLMo-core refuses documents together with RoPE)."""
        if cache_leftpad is not None:
            raise NotImplementedError("FusedAttention has no KV cache (cache_leftpad); use Attention")
        check_attention_inputs(self, x, proj=self.w_qkv, cu_doc_lens=cu_doc_lens, max_doc_len=max_doc_len)
        if is_empty_batch(x):
            return empty_attention_output(self, x, self.w_out)
        B, T, _ = x.shape
        qkv = self.w_qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # [B, T, 3, H, D]
        if self.clip_qkv is not None:
            qkv.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
        if self.rope is not None:
            rope_docs = cu_doc_lens
            if self.cp_enabled:
                if pos_sin is None and pos_cos is None and freqs_cis is None:
                    raise RuntimeError(
                        "RoPE buffers must be passed through to attention after being properly sharded "
                        "by the context parallel load balancer"
                    )
                rope_docs = None  # rows are per local token (see Attention._apply_rope)
            if (
                torch.compiler.is_compiling()
                and rope_docs is not None
                and pos_sin is None
                and pos_cos is None
                and freqs_cis is None
            ):
                # per-document rows gathered on the device (see traced_rope_rows)
                positions = document_position_ids(rope_docs.to(qkv.device), B * T)
                rows = traced_rope_rows(self.rope, positions, B * T, qkv)
                qkv = self.rope(qkv.reshape(1, B * T, *qkv.shape[2:]), **rows).view(qkv.shape)
            else:
                qkv = self.rope(
                    qkv, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis, cu_doc_lens=rope_docs
                )
        att = self._backend_for(qkv)(qkv, cu_doc_lens=cu_doc_lens, max_doc_len=max_doc_len)  # [B, T, H, D]
        return self.w_out(att.reshape(B, T, -1))

    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        raise NotImplementedError("TP is not implemented for the fused attention variant; use Attention")

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Context parallelism: delegated to the backend."""
        self.backend.apply_cp(cp_mesh, ring=ring, uly=uly)
        self._backend_auto = False

    def init_weights(
        self,
        *,
        init_method: Any,
        d_model: int,
        block_idx: int,
        num_blocks: int,
        std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        """As :meth:`Attention.init_weights` with ``w_qkv`` drawn as one matrix."""
        method = init_method_name(init_method)
        if method in ("fan_in", "normalized"):
            qkv_std = d_model**-0.5
        else:
            qkv_std = std
        if method == "normalized":
            std = d_model**-0.5
        init_linear(self.w_qkv, qkv_std, generator)
        if method == "fan_in":
            out_std = self.w_out.in_features**-0.5
        elif method in ("llama", "normalized"):
            out_std = std / (2 * num_blocks) ** 0.5
        elif method == "llama_depth":
            out_std = std / (2 * (block_idx + 1)) ** 0.5
        else:
            out_std = std
        init_linear(self.w_out, out_std, generator)

    def num_flops_per_token(self, seq_len: int) -> int:
        """``6 · params + 12 · H · D · seq_len``."""
        return 6 * sum(p.numel() for p in self.parameters()) + 12 * self.n_heads * self.head_dim * seq_len
