"""``Attention``: multi-head, grouped-query and multi-query attention with OLMo-core's arguments,
parameter names and ``forward``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..backends.base import AttentionBackendName
from ..backends.capabilities import Feature
from ..buffer_cache import BufferCache
from ..exceptions import ConfigurationError
from ..masks import window_from_size
from ..mixer import SequenceMixer
from ..norm import LayerNormConfig
from ..rope import (
    ComplexRotaryEmbedding,
    RoPEConfig,
    RoPEType,
    RotaryEmbedding,
    document_position_ids,
)
from ..validate import check_attention_inputs, empty_attention_output, is_empty_batch
from .common import (
    BackendMixin,
    check_positive_int,
    init_linear,
    init_method_name,
    resolve_backend_name,
    sequence_parallel,
    tp_styles,
    traced_rope_rows,
)
from .config import GateConfig, GateGranularity

if TYPE_CHECKING:
    from ..kv_cache import KVCacheManager


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
class Attention(BackendMixin, SequenceMixer):
    """Multi-head self-attention with GQA / MQA, optional gate, QK-norm, RoPE, QKV clipping and
    sliding window. Always causal.

    Args (keyword-only):
        d_model: input / output width.
        n_heads: query heads ``H``.
        n_kv_heads: key/value heads ``H_kv`` (``None`` → ``H``; must divide ``H``).
        head_dim: ``D`` (``None`` → ``d_model // n_heads``, which must then divide exactly).
        bias: biases on every linear layer.
        gate: :class:`GateConfig` (creates ``w_g``).
        rope: :class:`RoPEConfig` (``default`` or ``complex``).
        clip_qkv: clamp q, k and v to ``[-clip_qkv, clip_qkv]``.
        qk_norm: :class:`LayerNormConfig` for ``q_norm`` / ``k_norm``.
        dropout: attention-probability dropout (training mode only).
        softmax_scale: ``None`` → ``1/sqrt(D)``.
        use_flash: deprecated alias for ``backend="flash_2"``.
        backend: an :class:`AttentionBackendName` (or its string); ``None`` chooses the fastest
            backend that supports this layer's features on this machine.
        window_size: sliding window ``w`` (keys visible per query, itself included).
        dtype: parameter dtype.
        init_device: parameter device (``"meta"`` allowed).
        cache: :class:`BufferCache` shared with RoPE and the backend.
        use_head_qk_norm: normalise each head over ``D`` instead of all heads jointly.

    State-dict keys: ``w_q.*``, ``w_k.*``, ``w_v.*``, ``w_out.*``, ``w_g.*`` (gate),
    ``q_norm.*`` / ``k_norm.*`` (QK-norm); RoPE, backend and KV cache hold no persistent state.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        gate: GateConfig | None = None,
        rope: RoPEConfig | None = None,
        clip_qkv: float | None = None,
        qk_norm: LayerNormConfig | None = None,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        use_flash: bool | None = None,
        backend: AttentionBackendName | str | None = None,
        window_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        init_device: str | torch.device = "cpu",
        cache: BufferCache | None = None,
        use_head_qk_norm: bool = False,
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        check_positive_int("n_kv_heads", self.n_kv_heads)
        if n_heads % self.n_kv_heads:
            raise ConfigurationError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; choose n_kv_heads "
                f"among {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}"
            )
        self.d_model = d_model
        if head_dim is not None:
            self.head_dim = check_positive_int("head_dim", head_dim)
        else:
            if d_model % n_heads:
                raise ConfigurationError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}; set head_dim explicitly "
                    f"(e.g. head_dim={max(d_model // n_heads, 1)}) or choose n_heads dividing d_model"
                )
            self.head_dim = d_model // n_heads
        if not 0.0 <= dropout < 1.0:
            raise ConfigurationError(f"dropout={dropout} must be in [0, 1)")
        if clip_qkv is not None and not clip_qkv > 0:
            raise ConfigurationError(f"clip_qkv={clip_qkv} must be positive (or None for no clipping)")
        if softmax_scale is not None and not softmax_scale > 0:
            raise ConfigurationError(
                f"softmax_scale={softmax_scale} must be positive (or None for 1/sqrt(D))"
            )
        if gate is not None and not isinstance(gate, GateConfig):
            raise ConfigurationError(f"gate must be a GateConfig or None, got {type(gate).__name__}")

        H, Hkv, D = n_heads, self.n_kv_heads, self.head_dim
        factory = dict(dtype=dtype, device=init_device)
        self.w_q = nn.Linear(d_model, H * D, bias=bias, **factory)
        self.w_k = nn.Linear(d_model, Hkv * D, bias=bias, **factory)
        self.w_v = nn.Linear(d_model, Hkv * D, bias=bias, **factory)
        self.w_out = nn.Linear(H * D, d_model, bias=bias, **factory)

        self.gate = gate
        self.w_g: nn.Linear | None = None
        if gate is not None:
            width = H if GateGranularity(gate.granularity) == GateGranularity.headwise else H * D
            self.w_g = nn.Linear(d_model, width, bias=bias, **factory)

        self.clip_qkv = clip_qkv
        self.use_head_qk_norm = use_head_qk_norm
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if qk_norm is not None:
            q_size, k_size = (D, D) if use_head_qk_norm else (H * D, Hkv * D)
            self.q_norm = qk_norm.build(size=q_size, init_device=init_device)
            self.k_norm = qk_norm.build(size=k_size, init_device=init_device)

        self.rope: RotaryEmbedding | ComplexRotaryEmbedding | None = None
        if rope is not None:
            if RoPEType(rope.name) == RoPEType.fused:
                raise ConfigurationError(
                    f"fused RoPE is not compatible with {type(self).__name__}; use RoPEConfig(name='default') "
                    "(same math) or FusedAttention"
                )
            built = rope.build(D, cache=cache)
            assert isinstance(built, (RotaryEmbedding, ComplexRotaryEmbedding))
            self.rope = built

        name = resolve_backend_name(backend, use_flash)
        self.window_size = window_size
        window_tuple = window_from_size(window_size)  # ConfigurationError for window <= 0
        features: list[Feature] = []
        if window_size is not None:
            features.append(Feature.sliding_window)
        if dropout > 0:
            features.append(Feature.dropout)
        self._setup_backend(
            name,
            features=features,
            param_dtype=dtype,
            head_dim=D,
            n_heads=H,
            n_kv_heads=Hkv,
            scale=softmax_scale,
            dropout_p=dropout,
            window_size=window_tuple,
            cache=cache,
        )
        self.kv_cache_manager: KVCacheManager | None = None

    @property
    def cp_enabled(self) -> bool:
        return self.backend.cp_enabled

    # ----- attention core -----------------------------------------------------------------------
    def sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        cache_leftpad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the backend on ``q [B, T, H, D]``, ``k, v [B, T, H_kv, D]`` → ``[B, T, H, D]``.

        With a KV cache the leftpad is recorded first (when given) and the cache length advanced by
        ``T`` afterwards.
        """
        manager = self.kv_cache_manager
        if manager is not None and cache_leftpad is not None:
            manager.record_leftpad(cache_leftpad)
        att = self._backend_for(q)(
            (q, k, v),
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
            kv_cache_manager=manager,
        )
        if manager is not None:
            manager.update_seqlen(q.shape[1])
        return att

    def _apply_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        pos_sin: torch.Tensor | None,
        pos_cos: torch.Tensor | None,
        freqs_cis: torch.Tensor | None,
        cu_doc_lens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on ``q [B, T, H, D]``, ``k [B, T, H_kv, D]`` (with the CP fix)."""
        assert self.rope is not None
        if self.cp_enabled:
            if pos_sin is None and pos_cos is None and freqs_cis is None:
                raise RuntimeError(
                    "RoPE buffers must be passed through to attention after being properly sharded by "
                    "the context parallel load balancer (pos_sin/pos_cos, or freqs_cis for complex RoPE)"
                )
            # Under CP the passed rows are per local token (row j <-> local token j), already built
            # from per-document positions before sharding: cu_doc_lens must not re-index them.
            cu_doc_lens = None
        manager = self.kv_cache_manager
        if torch.compiler.is_compiling() and pos_sin is None and pos_cos is None and freqs_cis is None:
            # RoPE's own position handling reads the cache position / document offsets on the
            # host (a graph break, or a recompile per decode step): gather the rows on the device
            B, T = q.shape[:2]
            if manager is not None:
                positions = manager.position_counter.to(q.device) + torch.arange(T, device=q.device)
                # past the cache's end the KV write raises KVCacheOverflowError: clamp until then
                positions = positions.clamp(max=manager.max_seq_len - 1)
                return self.rope(
                    q, k, head_first=False, **traced_rope_rows(self.rope, positions, manager.max_seq_len, q)
                )
            if cu_doc_lens is not None:
                positions = document_position_ids(cu_doc_lens.to(q.device), B * T)
                rows = traced_rope_rows(self.rope, positions, B * T, q)
                qr, kr = self.rope(
                    q.reshape(1, B * T, *q.shape[2:]),
                    k.reshape(1, B * T, *k.shape[2:]),
                    head_first=False,
                    **rows,
                )
                return qr.view(q.shape), kr.view(k.shape)
        start_pos: int | torch.Tensor | None = None
        if manager is not None:
            # the host mirror of cache_seqlens avoids a device sync per layer and decode step
            start_pos = getattr(manager, "seqlen", None)
            if start_pos is None:
                start_pos = manager.current_position()
        return self.rope(
            q,
            k,
            head_first=False,
            start_pos=start_pos,
            pos_sin=pos_sin,
            pos_cos=pos_cos,
            freqs_cis=freqs_cis,
            cu_doc_lens=cu_doc_lens,
        )

    def _gate(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Gate ``att [B, T, H, D]`` with ``σ(w_g(x))`` (``x [B, T, d_model]``) → ``[B, T, H, D]``."""
        assert self.gate is not None and self.w_g is not None
        g = self.w_g(x)  # [B, T, H] or [B, T, H*D]
        if self.gate.full_precision:  # float32 or wider (float64 stays float64)
            g = g.to(torch.promote_types(g.dtype, torch.float32))
        gate = torch.sigmoid(g).to(att.dtype)
        if GateGranularity(self.gate.granularity) == GateGranularity.headwise:
            return att * gate.unsqueeze(-1)
        return (att.reshape(*att.shape[:2], -1) * gate).view(att.shape)

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
        """Attention over ``x [B, T, d_model]`` → ``[B, T, d_model]``.

        Args:
            cu_doc_lens: ``[n_docs + 1]`` int32 cumulative document lengths over the flattened
                ``B · T`` tokens; attention never crosses a document and RoPE positions restart
                in every document. ``max_doc_len`` is derived when omitted.
            cu_doc_lens_q, cu_doc_lens_k, max_doc_len_q, max_doc_len_k, local_k_slice: separate
                query/key segmentations (llama3 ring context parallelism).
            pos_sin, pos_cos (``[rows, r]``) / freqs_cis (``[rows, r/2]``, complex RoPE): RoPE rows;
                under context parallelism row ``j`` belongs to local token ``j``.
            cache_leftpad: ``[B]`` int32 left-padding per row for KV-cache prefill.

        Bad arguments raise :class:`~olmo_attn.exceptions.InvalidInputError` /
        :class:`~olmo_attn.exceptions.InvalidInputTypeError` (see :mod:`olmo_attn.validate`);
        ``B == 0`` or ``T == 0`` gives an empty ``[B, T, d_model]`` output.
        """
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
            cache_leftpad=cache_leftpad,
        )
        if is_empty_batch(x):
            return empty_attention_output(self, x, self.w_out)
        B, T, _ = x.shape
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # [B, T, H*D], [B, T, Hkv*D] x2

        if self.clip_qkv is not None:
            q.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
            k.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
            v.clamp_(min=-self.clip_qkv, max=self.clip_qkv)

        if not self.use_head_qk_norm:
            if self.q_norm is not None:
                q = self.q_norm(q)
            if self.k_norm is not None:
                k = self.k_norm(k)

        # -1: under tensor parallelism the local head counts are inferred
        q = q.view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = k.view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]

        if self.use_head_qk_norm:
            if self.q_norm is not None:
                q = self.q_norm(q)
            if self.k_norm is not None:
                k = self.k_norm(k)

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
            cache_leftpad=cache_leftpad,
        )  # [B, T, H, D] on every backend path
        if self.gate is not None:
            att = self._gate(x, att)
        return self.w_out(att.reshape(B, T, -1))

    # ----- parallelism ------------------------------------------------------------------------
    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        """Tensor parallelism over the 1-D ``tp_mesh``.

        The input is made replicated; ``w_q/w_k/w_v/w_g`` are column-parallel (each rank owns a
        contiguous block of heads, so ``n_heads`` and ``n_kv_heads`` must divide by the TP size);
        QK-norms run sequence-parallel with replicated parameters; ``w_out`` is row-parallel and
        its output is laid out as ``output_layout``. ``float8_enabled`` uses torchao's float8 styles.
        """
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import parallelize_module

        tp = tp_mesh.size()
        if self.n_heads % tp or self.n_kv_heads % tp:
            raise ConfigurationError(
                f"tensor parallelism of size {tp} needs n_heads={self.n_heads} and "
                f"n_kv_heads={self.n_kv_heads} divisible by {tp}"
            )
        rowwise, colwise, prepare_input = tp_styles(float8_enabled)
        parallelize_module(
            self,
            device_mesh=tp_mesh,
            parallelize_plan=prepare_input(
                input_layouts=None if input_layout is None else (input_layout,),
                desired_input_layouts=(Replicate(),),
            ),
        )
        plan: dict[str, Any] = {
            # with a norm, keep whole feature vectors per token: sequence-sharded DTensor output
            "w_q": colwise(
                output_layouts=None if self.q_norm is None else Shard(1),
                use_local_output=self.q_norm is None,
            ),
            "w_k": colwise(
                output_layouts=None if self.k_norm is None else Shard(1),
                use_local_output=self.k_norm is None,
            ),
            "w_v": colwise(),
            "w_out": rowwise(output_layouts=output_layout, use_local_output=use_local_output),
        }
        if self.w_g is not None:
            plan["w_g"] = colwise()
        # full norm: output [B, T, E] sharded on E (-> heads after the view);
        # per-head norm: output [B, T, H, D] sharded on H
        if self.q_norm is not None:
            plan["q_norm"] = sequence_parallel(Shard(2))
        if self.k_norm is not None:
            plan["k_norm"] = sequence_parallel(Shard(2))
        parallelize_module(module=self, device_mesh=tp_mesh, parallelize_plan=plan)

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Context parallelism: delegated to the backend. The caller shards ``x``, the
        RoPE rows and the document metadata with the matching load balancer."""
        self.backend.apply_cp(cp_mesh, ring=ring, uly=uly)
        self._backend_auto = False  # the CP configuration is bound to this backend

    # ----- init / flops / kv cache -------------------------------------------------------------
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
        """Truncated-normal init of the projections; norms keep ones/zeros.

        ``init_method``: ``"normal" | "normalized" | "llama" | "llama_depth" | "fan_in"`` (or
        OLMo-core's ``InitMethod``). Draw order (``w_q, w_k, w_v, w_g, w_out``) matches OLMo-core,
        so a shared ``generator`` gives identical weights.
        """
        method = init_method_name(init_method)
        if method == "fan_in":
            for w in (self.w_q, self.w_k, self.w_v):
                init_linear(w, w.in_features**-0.5, generator)
        else:
            if method == "normalized":
                std = d_model**-0.5
            for w in (self.w_q, self.w_k, self.w_v):
                init_linear(w, std, generator)
        if self.w_g is not None:
            init_linear(self.w_g, self.w_g.in_features**-0.5 if method == "fan_in" else std, generator)
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
        """``6 · params + 12 · H · D · L_eff`` with ``L_eff = min(window, seq_len)``."""
        param_flops = 6 * sum(p.numel() for p in self.parameters())
        effective = min(self.window_size, seq_len) if self.window_size is not None else seq_len
        return param_flops + 12 * self.n_heads * self.head_dim * effective

    def init_kv_cache_manager(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate a KV cache ``[batch_size, max_seq_len, H_kv, D]``; from now on every forward
        decodes against it (set ``kv_cache_manager = None`` to stop).

        ``dtype``: cache dtype; ``None`` → the parameter dtype, so cached decoding reproduces the
        cache-free forward (OLMo-core always uses bf16: pass ``torch.bfloat16`` for that).
        """
        from ..kv_cache import KVCacheManager

        self.backend.assert_supports_kv_cache()
        self._backend_auto = False
        self.kv_cache_manager = KVCacheManager(
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            num_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            device=self.w_k.weight.device,
            dtype=dtype if dtype is not None else self.w_k.weight.dtype,
        )
