"""Gated DeltaNet: ``GatedDeltaNetConfig`` and the ``GatedDeltaNet`` sequence mixer.

Parameter names, shapes and state-dict keys are OLMo-core's, so its
checkpoints load unchanged. The forward is OLMo-core's (projections, short convolutions, gated delta rule, gated
RMSNorm); the kernel is flash-linear-attention's when it is
installed and known-correct on the device, else this package's own chunked PyTorch kernel
(:mod:`.chunked`, CPU and CUDA, autograd); decoding uses the recurrent step (:mod:`.recurrent`)
with a :class:`GDNCache`. Differences from OLMo-core are listed in ``docs/differences_gdn.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DType, StrEnum
from ..exceptions import ConfigurationError, UnsupportedFeatureError
from ..mixer import SequenceMixer, SequenceMixerConfig
from .chunked import DEFAULT_CHUNK_SIZE, chunk_gated_delta_rule
from .conv import CausalConv1d, causal_conv1d_step
from .recurrent import gated_delta_rule_step

if TYPE_CHECKING:
    from ..buffer_cache import BufferCache

__all__ = ["GDNBackendName", "GDNCache", "GatedDeltaNet", "GatedDeltaNetConfig", "GatedRMSNorm"]


class GDNBackendName(StrEnum):
    """Which Gated DeltaNet kernels run: ``auto`` (the chunk kernel in the order measured on this
    GPU architecture for the pass and layout, :mod:`.kernel_order`, the first whose guard lets it
    run; our PyTorch kernel last, and on CPU), ``triton`` (our Triton kernels or an error),
    ``torch`` (our PyTorch chunked kernel, on any device), ``fla`` (flash-linear-attention or an
    error)."""

    auto = "auto"
    torch = "torch"
    triton = "triton"
    fla = "fla"


def _derived_dims(
    d_model: int,
    n_heads: int,
    n_v_heads: int | None,
    head_dim: int | None,
    expand_v: float,
    conv_size: int,
) -> tuple[int, int, int, int, int, int]:
    """Validate the shape arguments; return ``(H, HV, Dk, Dv, K, V)`` or raise ``ConfigurationError``."""
    for name, val in (("d_model", d_model), ("n_heads", n_heads), ("conv_size", conv_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ConfigurationError(f"{name} must be a positive int, got {val!r}")
    HV = n_heads if n_v_heads is None else n_v_heads
    if isinstance(HV, bool) or not isinstance(HV, int) or HV <= 0:
        raise ConfigurationError(f"n_v_heads must be a positive int or None, got {n_v_heads!r}")
    if n_heads > HV or HV % n_heads:
        raise ConfigurationError(
            f"n_v_heads={HV} must be a multiple of n_heads={n_heads} (grouped value attention: "
            "each q/k head serves n_v_heads // n_heads value heads); use e.g. "
            f"n_v_heads={n_heads * max(1, -(-HV // n_heads))}"
        )
    Dk = d_model // n_heads if head_dim is None else head_dim
    if isinstance(Dk, bool) or not isinstance(Dk, int) or Dk <= 0:
        raise ConfigurationError(
            f"head_dim must be a positive int (default d_model // n_heads), got {Dk!r} "
            f"(d_model={d_model}, n_heads={n_heads})"
        )
    if not (isinstance(expand_v, (int, float)) and expand_v > 0):
        raise ConfigurationError(f"expand_v must be a positive number, got {expand_v!r}")
    Dv = int(Dk * expand_v)
    if Dv <= 0 or not math.isclose(Dk * expand_v, Dv, rel_tol=1e-5):
        raise ConfigurationError(
            f"head_dim * expand_v = {Dk} * {expand_v} = {Dk * expand_v} is not an integer value head "
            "dim; choose expand_v so that head_dim * expand_v is a whole number"
        )
    K, V = n_heads * Dk, HV * Dv
    return n_heads, HV, Dk, Dv, K, V


@dataclasses.dataclass
class GDNCache:
    """Decoding state of one :class:`GatedDeltaNet` layer (O(1) in the sequence length).

    Attributes:
        state: ``[B, HV, Dk, Dv]`` float32 recurrent state.
        conv_q, conv_k: ``[B, K, Kc - 1]`` the last ``Kc - 1`` pre-convolution q/k inputs.
        conv_v: ``[B, V, Kc - 1]``.
        seqlen: tokens consumed so far (a host int, updated by eager calls; a
            ``torch.compile``-d forward leaves it alone, so that decoding does not recompile per
            token, and counts in ``n_tokens`` instead).
        n_tokens: ``[]`` int64 tensor on the state's device, tokens consumed so far, updated in
            place by every call (eager and compiled).
    """

    state: torch.Tensor
    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    seqlen: int = 0
    n_tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.n_tokens is None:
            self.n_tokens = torch.full((), self.seqlen, dtype=torch.int64, device=self.state.device)

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def reset(self) -> None:
        """Forget everything (start new sequences in the same buffers)."""
        for t in (self.state, self.conv_q, self.conv_k, self.conv_v):
            t.zero_()
        self.seqlen = 0
        assert self.n_tokens is not None
        self.n_tokens.zero_()


class GatedRMSNorm(nn.Module):
    """``y = o / sqrt(mean(o^2) + eps) * weight * silu(z)`` per ``[..., Dv]`` row, computed in float32
    and returned in the dtype of ``o`` (OLMo-core's ``o_norm``, fla's ``FusedRMSNormGated``)."""

    def __init__(
        self, size: int, *, eps: float = 1e-5, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def forward(self, o: torch.Tensor, z: torch.Tensor, *, use_fla: bool = False) -> torch.Tensor:
        """``o, z [..., Dv]`` -> ``[..., Dv]`` (dtype of ``o``)."""
        if use_fla:
            from .fla import fla_gated_rms_norm

            return fla_gated_rms_norm(o, z, self.weight, self.eps)
        cdt = torch.float64 if o.dtype == torch.float64 else torch.float32
        of = o.to(cdt)
        y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + self.eps)
        y = y * self.weight.to(cdt) * F.silu(z.to(cdt))
        return y.to(o.dtype)


class GatedDeltaNet(SequenceMixer):
    """Gated DeltaNet layer (OLMo-core's): gated delta rule with short convolutions,
    L2-normalised q/k, optional negative eigenvalues and grouped value heads.

    Keyword args beyond OLMo-core's: ``backend`` (``"auto" | "torch" | "triton" | "fla"``, default
    auto),
    ``chunk_size`` of our chunked kernel (64) and ``recompute`` (our kernel keeps only its inputs
    for the backward and recomputes the rest: about one extra kernel forward, much less memory).
    Attribute ``decode_kernel`` picks the kernel of single-token decoding steps (``"auto"``:
    the fused Triton step on CUDA, eager elsewhere; ``"eager"``, ``"triton"``, ``"compile"``; see
    :func:`olmo_attn.recurrent.gated_delta_rule_step`); ``compile_decode = True`` is
    ``decode_kernel = "compile"``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_v_heads: int | None = None,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        allow_neg_eigval: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        norm_eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
        init_device: str = "cpu",
        backend: GDNBackendName | str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        H, HV, Dk, Dv, K, V = _derived_dims(d_model, n_heads, n_v_heads, head_dim, expand_v, conv_size)
        if not (isinstance(norm_eps, (int, float)) and norm_eps >= 0):
            raise ConfigurationError(f"norm_eps must be a non-negative number, got {norm_eps!r}")
        self.d_model = d_model
        self.n_heads = H
        self.n_v_heads = HV
        self.head_k_dim = Dk
        self.head_v_dim = Dv
        self.key_dim = K
        self.value_dim = V
        self.expand_v = expand_v
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.norm_eps = norm_eps
        self.backend = GDNBackendName(backend) if backend is not None else GDNBackendName.auto
        self.chunk_size = chunk_size
        self.recompute = recompute
        self.compile_decode = False
        self.decode_kernel = "auto"
        factory = {"dtype": dtype, "device": init_device}

        self.w_q = nn.Linear(d_model, K, bias=False, **factory)
        self.w_k = nn.Linear(d_model, K, bias=False, **factory)
        self.w_v = nn.Linear(d_model, V, bias=False, **factory)
        self.w_a = nn.Linear(d_model, HV, bias=False, **factory)
        self.w_b = nn.Linear(d_model, HV, bias=False, **factory)
        self.A_log = nn.Parameter(torch.empty(HV, **factory))
        self.dt_bias = nn.Parameter(torch.empty(HV, **factory))
        self.q_conv1d = CausalConv1d(K, conv_size, bias=conv_bias, **factory)
        self.k_conv1d = CausalConv1d(K, conv_size, bias=conv_bias, **factory)
        self.v_conv1d = CausalConv1d(V, conv_size, bias=conv_bias, **factory)
        self.w_g = nn.Linear(d_model, V, bias=False, **factory)
        self.o_norm = GatedRMSNorm(Dv, eps=norm_eps, **factory)
        self.w_out = nn.Linear(V, d_model, bias=False, **factory)
        if torch.device(init_device).type != "meta":
            self._init_decay(None)  # usable before init_weights (OLMo-core leaves these empty)

        self.cp_enabled = False
        self.cp_group: Any = None
        self.cp_world_size = 1
        self.cp_rank = 0
        self.uly: Any = None

    # ------------------------------------------------------------------------------------- init

    @torch.no_grad()
    def _init_decay(self, generator: torch.Generator | None) -> None:
        """``A ~ U(0, 16)``, ``A_log = ln A``; ``dt = exp(U(ln 1e-3, ln 0.1))`` clamped to ``>= 1e-4``
        and ``dt_bias = dt + ln(-expm1(-dt))`` (inverse softplus: ``softplus(dt_bias) = dt``)."""
        HV = self.n_v_heads
        dev = self.A_log.device
        A = torch.empty(HV, dtype=torch.float32, device=dev).uniform_(0, 16, generator=generator)
        self.A_log.copy_(torch.log(A))
        lo, hi = math.log(0.001), math.log(0.1)
        u = torch.rand(HV, dtype=torch.float32, device=dev, generator=generator)
        dt = torch.exp(u * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
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
        """OLMo-core's initialisation. ``init_method``: an ``InitMethod`` enum or its string
        (``normal``, ``llama``, ``llama_depth``, ``normalized``; ``fan_in`` is not implemented)."""
        method = str(getattr(init_method, "value", init_method))
        if method == "fan_in":
            raise NotImplementedError(
                "init_method='fan_in' is not implemented for GatedDeltaNet (as in OLMo-core); use "
                "'normal', 'llama', 'llama_depth' or 'normalized'"
            )
        if method not in ("normal", "llama", "llama_depth", "normalized"):
            raise ValueError(
                f"init_method={method!r} is unknown; use one of 'normal', 'llama', 'llama_depth', "
                "'normalized'"
            )
        if method == "normalized":
            std = d_model**-0.5

        def trunc(w: torch.Tensor, s: float) -> None:
            nn.init.trunc_normal_(w, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=generator)

        for lin in (self.w_q, self.w_k, self.w_v, self.w_a, self.w_b, self.w_g):
            trunc(lin.weight, std)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            trunc(conv.weight, std)
            if conv.bias is not None:
                conv.bias.zero_()
        self._init_decay(generator)
        if method == "llama":
            out_std = std / math.sqrt(2 * num_blocks)
        elif method == "llama_depth":
            out_std = std / math.sqrt(2 * (block_idx + 1))
        elif method == "normalized":
            out_std = d_model**-0.5 / math.sqrt(2 * num_blocks)
        else:
            out_std = std
        trunc(self.w_out.weight, out_std)

    # ---------------------------------------------------------------------------- parallelism

    def apply_tp(self, tp_mesh: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "GatedDeltaNet does not support tensor parallelism (neither does OLMo-core); use data "
            "parallelism / FSDP, or Ulysses context parallelism (apply_cp(uly=...))"
        )

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        """Ulysses context parallelism over ``cp_mesh`` (1-D ``DeviceMesh``).

        Inputs are then sequence-sharded contiguously (Ulysses balancer); ``cu_doc_lens`` passed to
        ``forward`` must describe the **full** sequence. Requires ``n_heads`` and ``n_v_heads`` to be
        multiples of the mesh size.
        """
        if ring is not None:
            raise NotImplementedError(
                "ring context parallelism is not implemented for GatedDeltaNet: the gated delta rule is "
                "a recurrence over the whole sequence, so each rank would have to wait for the state "
                "of the rank before it (a pipelined scan, not a ring of independent blocks); use "
                "UlyssesContextParallelStyle(), which gives every rank whole sequences of some heads"
            )
        if uly is None:
            raise ValueError("apply_cp needs uly=UlyssesContextParallelStyle() (ring is not supported)")
        W = int(cp_mesh.size())
        if W == 1:
            return
        for name, n in (("n_heads", self.n_heads), ("n_v_heads", self.n_v_heads)):
            if n % W:
                raise ConfigurationError(
                    f"Ulysses context parallelism splits heads over the {W} ranks, but {name}={n} is not "
                    f"a multiple of {W}; use a CP degree that divides both n_heads={self.n_heads} and "
                    f"n_v_heads={self.n_v_heads}"
                )
        rank = int(cp_mesh.get_local_rank())
        self.cp_group = cp_mesh.get_group()
        self.cp_world_size = W
        self.cp_rank = rank
        self.uly = uly
        kw, vw = self.key_dim // W, self.value_dim // W
        self.q_conv1d.cp_channels = slice(rank * kw, (rank + 1) * kw)
        self.k_conv1d.cp_channels = slice(rank * kw, (rank + 1) * kw)
        self.v_conv1d.cp_channels = slice(rank * vw, (rank + 1) * vw)
        self.cp_enabled = True

    # --------------------------------------------------------------------------------- FLOPs

    def _linear_weights(self) -> int:
        return sum(
            m.weight.numel() for m in (self.w_q, self.w_k, self.w_v, self.w_a, self.w_b, self.w_g, self.w_out)
        )

    def num_flops_per_token(self, seq_len: int, *, forward_only: bool = False) -> int:
        """Forward + backward FLOPs per token (3x the forward, like attention's estimate).

        Forward (OLMo-core's number, ``forward_only=True``): ``2 * (linear weights) +
        2 * Kc * (2K + V) + 8 * HV * Dk * Dv``; independent of ``seq_len`` (linear recurrence).
        OLMo-core reports the forward count only, under-reporting GDN about 3x next to attention.
        """
        fwd = (
            2 * self._linear_weights()
            + 2 * self.conv_size * (2 * self.key_dim + self.value_dim)
            + 8 * self.n_v_heads * self.head_k_dim * self.head_v_dim
        )
        return fwd if forward_only else 3 * fwd

    # ------------------------------------------------------------------------------- decoding

    def init_cache(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> GDNCache:
        """Zero decoding cache for ``batch_size`` sequences (state and conv windows in ``dtype``)."""
        dev = self.w_q.weight.device if device is None else torch.device(device)
        kc = self.conv_size - 1
        return GDNCache(
            state=torch.zeros(
                batch_size, self.n_v_heads, self.head_k_dim, self.head_v_dim, dtype=dtype, device=dev
            ),
            conv_q=torch.zeros(batch_size, self.key_dim, kc, dtype=dtype, device=dev),
            conv_k=torch.zeros(batch_size, self.key_dim, kc, dtype=dtype, device=dev),
            conv_v=torch.zeros(batch_size, self.value_dim, kc, dtype=dtype, device=dev),
        )

    # -------------------------------------------------------------------------------- forward

    def _choose(self, x: torch.Tensor, needs_grad: bool, documents: bool = False) -> tuple[bool, bool]:
        """``(fla for the chunk kernel, fla for conv + norm)`` for this call. ``auto`` walks the
        chunk kernels in the order measured on this GPU architecture for this pass (training or
        inference) and layout (rows or ``documents``), :func:`.kernel_order.kernel_order`, taking
        the first whose guard lets it run; our PyTorch kernel last. A module in training mode takes
        the training order even without grad (a reentrant activation checkpoint's first pass), so
        the recomputed forward runs the kernel the first one did."""
        if self.backend == GDNBackendName.torch:
            return False, False
        from .fla import fla_available, fla_kernel_usable

        if self.backend == GDNBackendName.fla:
            if not fla_available():
                from .fla import _require

                _require()
            ok, why = fla_kernel_usable(x.device, x.dtype, backward=needs_grad)
            if not ok:
                raise UnsupportedFeatureError(
                    f"GatedDeltaNet backend='fla' cannot run here: {why}; use backend='auto' (fla where "
                    "it is correct, our chunked kernel elsewhere) or backend='torch'"
                )
            return True, True
        if not fla_available() or torch.compiler.is_compiling():
            # compiled: our conv and norm (Inductor fuses them) and our chunk kernels, which are
            # custom ops; fla's Python wrappers would be traced by Dynamo
            return False, False
        base_ok, _ = fla_kernel_usable(x.device, x.dtype, backward=False)
        if self.backend == GDNBackendName.triton:
            return False, base_ok
        from ..hardware import info_for
        from .kernel_order import kernel_order

        train = needs_grad or self.training
        for name in kernel_order(info_for(x.device).arch, train=train, documents=documents):
            if name == "triton" and self._ours_on_gpu(x):
                return False, base_ok
            if name == "fla" and fla_kernel_usable(x.device, x.dtype, backward=needs_grad)[0]:
                return True, base_ok
        return False, base_ok

    def _ours_on_gpu(self, x: torch.Tensor) -> bool:
        """Whether our Triton kernels can take this call (the ``triton`` entry of ``auto``'s order)."""
        from .chunked import TRITON_FAILURES
        from .triton_chunk import CHUNK, MAX_DK, triton_available

        return (
            x.device.type == "cuda"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and self.chunk_size == CHUNK
            and self.head_k_dim <= MAX_DK
            and "chunk" not in TRITON_FAILURES
            and triton_available()
        )

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """``g = -exp(A_log) * softplus(w_a(x) + dt_bias)`` ``[B, T, HV]`` in float32 (float64 if ``x`` is)."""
        a = self.w_a(x)
        cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
        return -self.A_log.to(cdt).exp() * F.softplus(a.to(cdt) + self.dt_bias.to(cdt))

    @staticmethod
    def _resolve_mask(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, T, 1]`` 0/1 float mask (``None`` without one)."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"attention_mask must be a [B, T] = {tuple(x.shape[:2])} tensor (False / 0 = padding), got "
                f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}"
            )
        if attention_mask.is_floating_point() and not bool(
            ((attention_mask == 0) | (attention_mask == 1)).all()
        ):
            raise ValueError("attention_mask must hold only 0/1 (or bool) values")
        return attention_mask.to(device=x.device, dtype=torch.float32)[..., None]

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def _resolve_docs(self, cu_doc_lens: torch.Tensor | None, total: int) -> tuple[int, ...] | None:
        if cu_doc_lens is None:
            return None
        if not isinstance(cu_doc_lens, torch.Tensor) or cu_doc_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                "cu_doc_lens must be an int32 (or int64) tensor [n_docs + 1], got "
                f"{cu_doc_lens.dtype if isinstance(cu_doc_lens, torch.Tensor) else type(cu_doc_lens).__name__}"
            )
        if torch.compiler.is_compiling():
            # under torch.compile the offsets' values stay on the device (no graph break, no
            # recompile per document layout); only their shape is checked
            if cu_doc_lens.dim() != 1 or cu_doc_lens.numel() < 2:
                raise ValueError(
                    f"cu_doc_lens must be 1-D [n_docs + 1], got shape {tuple(cu_doc_lens.shape)}"
                )
            return None
        from ..masks import validate_cu_seqlens

        return validate_cu_seqlens(cu_doc_lens.to(torch.int32), "cu_doc_lens", total)

    def forward(
        self,
        x: torch.Tensor,
        cu_doc_lens: torch.Tensor | None = None,
        *,
        cache: GDNCache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``x [B, T, d_model]`` -> ``[B, T, d_model]``.

        Args:
            cu_doc_lens: int32 ``[n_docs + 1]`` document offsets into the flattened ``B * T`` tokens
                (``[0, ..., B*T]``, as for attention); the convolution window and the recurrent state
                restart at every offset. Under Ulysses CP it describes the full (unsharded) sequence.
            cache: a :class:`GDNCache` to continue from and update (decoding; ``T == 1`` uses the
                O(1) recurrent step, longer inputs the chunked kernel with the cached state).
            attention_mask: ``[B, T]`` (bool or 0/1; under CP the local shard), ``False`` marks
                padding. Padding tokens are transparent: the state passes through them unchanged,
                the convolution reads zeros there, and their outputs are 0. Exact for left padding
                (a batch of prompts) and right padding.
            kwargs: the other arguments attention layers receive (``max_doc_len``, ``pos_sin``,
                ``cu_doc_lens_q``, ...) are accepted and ignored.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got shape {tuple(x.shape)}")
        mask = self._resolve_mask(attention_mask, x)
        if cache is not None:
            return self._forward_cached(x, cu_doc_lens, cache, mask)
        B, T_local, _ = x.shape
        W = self.cp_world_size if self.cp_enabled else 1
        T = T_local * W
        cu_host = self._resolve_docs(cu_doc_lens, B * T)
        needs_grad = self._needs_grad(x)

        q = self.w_q(x)  # [B, T_l, K]
        k = self.w_k(x)
        v = self.w_v(x)  # [B, T_l, V]
        beta = self.w_b(x).sigmoid()  # [B, T_l, HV]
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = self._log_decay(x)  # [B, T_l, HV] float32 (float64 for float64 modules)
        if mask is not None:
            q, k, v, beta, g = (t * mask.to(t.dtype) for t in (q, k, v, beta, g))

        if self.cp_enabled:
            from ..cp.all_to_all import all_to_all_cp2hp

            # channels (not heads) are exchanged: rank r gets channel block r = its heads
            q, k, v = all_to_all_cp2hp([q, k, v], self.cp_group)  # [B, T, K/W], [B, T, V/W]
            beta_dtype = beta.dtype  # one collective needs one dtype: ship beta as float32
            g, beta = all_to_all_cp2hp([g, beta.to(g.dtype)], self.cp_group)  # [B, T, HV/W]
            beta = beta.to(beta_dtype)

        use_fla_kernel, use_fla_ops = self._choose(q, needs_grad, documents=cu_doc_lens is not None)
        cu = cu_doc_lens
        q, _ = self.q_conv1d(q, cu_seqlens=cu, cu_host=cu_host, use_fla=use_fla_ops)
        k, _ = self.k_conv1d(k, cu_seqlens=cu, cu_host=cu_host, use_fla=use_fla_ops)
        v, _ = self.v_conv1d(v, cu_seqlens=cu, cu_host=cu_host, use_fla=use_fla_ops)
        H, HV = self.n_heads // W, self.n_v_heads // W
        q = q.reshape(B, T, H, self.head_k_dim)
        k = k.reshape(B, T, H, self.head_k_dim)
        v = v.reshape(B, T, HV, self.head_v_dim)
        o = self._kernel(q, k, v, g, beta, cu, use_fla_kernel, None, False)[0]  # [B, T, HV/W, Dv]

        if self.cp_enabled:
            from ..cp.all_to_all import all_to_all_hp2cp

            (o,) = all_to_all_hp2cp([o], self.cp_group)  # [B, T_l, HV, Dv]
        z = self.w_g(x).reshape(B, T_local, self.n_v_heads, self.head_v_dim)
        y = self.o_norm(o, z, use_fla=use_fla_ops)
        out = self.w_out(y.reshape(B, T_local, self.value_dim))
        return out if mask is None else out * mask.to(out.dtype)

    def _kernel(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        cu: torch.Tensor | None,
        use_fla: bool,
        initial_state: torch.Tensor | None,
        output_final_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if use_fla:
            from .fla import fla_chunk_gated_delta_rule

            return fla_chunk_gated_delta_rule(
                q,
                k,
                v,
                g,
                beta,
                initial_state=initial_state,
                output_final_state=output_final_state,
                use_qk_l2norm=True,
                cu_seqlens=cu,
            )
        return chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=True,
            cu_seqlens=cu,
            chunk_size=self.chunk_size,
            recompute=self.recompute,
            kernel={GDNBackendName.torch: "torch", GDNBackendName.triton: "triton"}.get(self.backend, "auto"),
        )

    def _forward_cached(
        self,
        x: torch.Tensor,
        cu_doc_lens: torch.Tensor | None,
        cache: GDNCache,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Continue ``cache``'s sequences with ``x [B, T, d_model]`` and update ``cache`` in place."""
        if self.cp_enabled:
            raise ValueError("decoding with a GDNCache cannot be combined with context parallelism")
        if cu_doc_lens is not None:
            raise ValueError(
                "cu_doc_lens cannot be combined with a decoding cache; each batch row is one sequence"
            )
        B, T, _ = x.shape
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences but x has batch size {B}")
        q = self.w_q(x)
        k = self.w_k(x)
        v = self.w_v(x)
        beta = self.w_b(x).sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = self._log_decay(x)  # [B, T, HV] float32 (float64 for float64 modules)
        if mask is not None:
            q, k, v, beta, g = (t * mask.to(t.dtype) for t in (q, k, v, beta, g))
        Dk, Dv = self.head_k_dim, self.head_v_dim
        if T == 1:
            convs = ((self.q_conv1d, q, "conv_q"), (self.k_conv1d, k, "conv_k"), (self.v_conv1d, v, "conv_v"))
            outs = []
            for conv, inp, name in convs:
                y, new = causal_conv1d_step(inp[:, 0], conv.weight, conv.bias, getattr(cache, name))
                getattr(cache, name).copy_(new)
                outs.append(y)
            qs, ks, vs = outs
            o, new_state = gated_delta_rule_step(
                qs.reshape(B, self.n_heads, Dk),
                ks.reshape(B, self.n_heads, Dk),
                vs.reshape(B, self.n_v_heads, Dv),
                g[:, 0],
                beta[:, 0],
                cache.state,
                use_qk_l2norm=True,
                compile=self.compile_decode,
                kernel=self.decode_kernel,
            )
            if new_state is not cache.state:
                cache.state = new_state
            o = o[:, None]  # [B, 1, HV, Dv]
        else:
            q, cache.conv_q = self.q_conv1d(q, initial_state=cache.conv_q, output_final_state=True)
            k, cache.conv_k = self.k_conv1d(k, initial_state=cache.conv_k, output_final_state=True)
            v, cache.conv_v = self.v_conv1d(v, initial_state=cache.conv_v, output_final_state=True)
            use_fla_kernel, _ = self._choose(q, self._needs_grad(x))
            o, final = self._kernel(
                q.reshape(B, T, self.n_heads, Dk),
                k.reshape(B, T, self.n_heads, Dk),
                v.reshape(B, T, self.n_v_heads, Dv),
                g,
                beta,
                None,
                use_fla_kernel,
                cache.state,
                True,
            )
            assert final is not None
            cache.state = final.to(cache.state.dtype)
        assert cache.n_tokens is not None
        cache.n_tokens.add_(T)
        if not torch.compiler.is_compiling():
            cache.seqlen += T
        z = self.w_g(x).reshape(B, T, self.n_v_heads, Dv)
        y = self.o_norm(o, z)
        out = self.w_out(y.reshape(B, T, self.value_dim))
        return out if mask is None else out * mask.to(out.dtype)


@SequenceMixerConfig.register("gated_delta_net")
@dataclasses.dataclass
class GatedDeltaNetConfig(SequenceMixerConfig[GatedDeltaNet]):
    """Configuration of :class:`GatedDeltaNet` (OLMo-core fields, plus ``backend``)."""

    n_heads: int = 16
    n_v_heads: Optional[int] = None  # noqa: UP045 (runtime type hints for from_dict)
    head_dim: Optional[int] = None  # noqa: UP045
    expand_v: float = 2.0
    allow_neg_eigval: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    norm_eps: float = 1e-5
    dtype: DType = DType.float32
    backend: Optional[GDNBackendName] = None  # noqa: UP045  (extension: None = "auto")
    type: Optional[str] = dataclasses.field(default=None, kw_only=True)  # noqa: UP045

    def __post_init__(self) -> None:
        if self.type is None:
            self.type = "gated_delta_net"
        elif self.type != "gated_delta_net":
            raise ConfigurationError(f"GatedDeltaNetConfig.type must be 'gated_delta_net', got {self.type!r}")
        if isinstance(self.dtype, str):
            self.dtype = DType(self.dtype.replace("torch.", ""))
        elif isinstance(self.dtype, torch.dtype):
            self.dtype = DType.from_pt(self.dtype)
        if isinstance(self.backend, str) and not isinstance(self.backend, GDNBackendName):
            self.backend = GDNBackendName(self.backend)

    def dims(self, d_model: int) -> tuple[int, int, int, int, int, int]:
        """``(H, HV, Dk, Dv, K, V)`` for ``d_model`` (raises ``ConfigurationError`` if invalid)."""
        return _derived_dims(
            d_model, self.n_heads, self.n_v_heads, self.head_dim, self.expand_v, self.conv_size
        )

    def num_params(self, d_model: int) -> int:
        """The parameter count of the built module."""
        _, HV, _, Dv, K, V = self.dims(d_model)
        p = 2 * d_model * K + 2 * d_model * V + V * d_model + 2 * d_model * HV + 2 * HV
        p += self.conv_size * (2 * K + V) + (2 * K + V if self.conv_bias else 0)
        return p + Dv

    def build(
        self,
        d_model: int,
        *,
        layer_idx: int,
        n_layers: int,
        init_device: str = "cpu",
        cache: BufferCache | None = None,
    ) -> GatedDeltaNet:
        """Build the layer (``layer_idx``, ``n_layers`` and ``cache`` are unused, as in OLMo-core)."""
        del layer_idx, n_layers, cache
        return GatedDeltaNet(
            d_model=d_model,
            n_heads=self.n_heads,
            n_v_heads=self.n_v_heads,
            head_dim=self.head_dim,
            expand_v=self.expand_v,
            allow_neg_eigval=self.allow_neg_eigval,
            conv_size=self.conv_size,
            conv_bias=self.conv_bias,
            norm_eps=self.norm_eps,
            dtype=DType(self.dtype).as_pt(),
            init_device=init_device,
            backend=self.backend,
        )
