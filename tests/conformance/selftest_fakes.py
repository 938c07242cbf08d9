"""More deliberately wrong backends for the harness's own tests (test-only, never shipped).

Each carries one bug that the budgets against the low-precision baseline cannot all see, or that only
part of the case matrix reaches:

* :class:`HalfSoftmax` — drops the float32 upcast: scores, softmax and accumulation stay in the input
  dtype (it is the plain-PyTorch baseline itself, so ``2 x`` that baseline's error is no bound on it).
* :class:`Float16GQAShortcut` — a GQA fast path taken only for float16 inputs with grouped heads
  (``n_kv_heads < n_heads``), which maps query head ``h`` to kv head ``h % Hkv``.
* :class:`UlyssesAveragedReplicas` — Ulysses CP with kv heads replicated to fill the ranks
  (``n_kv_heads`` not a multiple of the world size) whose backward *averages* the replicas'
  gradients instead of summing them.

The classes live at module level so that worker processes can unpickle them.
"""

from __future__ import annotations

from typing import Any

import torch
from conformance_fakes import ExactBackend, ExactKernel

from conformance import baseline
from olmo_attn.masks import DocSegments
from olmo_attn.ops.kernel import KernelCall
from reference.attention import allowed_mask


def _host(t: torch.Tensor | None, host: tuple[int, ...] | None) -> list[int] | None:
    if host is not None:
        return list(host)
    return None if t is None else [int(x) for x in t.tolist()]


# ----------------------------------------------------------------------------- precision


class HalfKernel(ExactKernel):
    """The LSE kernel computed by plain PyTorch in the input dtype; backward by autograd, same dtype."""

    def _plain(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        varlen = call.varlen
        q4, k4, v4 = (t[None] if varlen else t for t in (q, k, v))
        cu_q = cu_k = None
        if varlen:
            cu_q = _host(call.cu_seqlens_q, call.cu_seqlens_q_host)
            cu_k = _host(call.cu_seqlens_k, call.cu_seqlens_k_host) or cu_q
        mask = allowed_mask(
            q4.shape[1],
            k4.shape[1],
            causal=call.causal,
            window=tuple(call.window),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
        )
        out, lse = baseline.attention(q4, k4, v4, torch.from_numpy(mask)[None], scale=call.scale)
        return (out[0], lse[0]) if varlen else (out, lse)

    def forward(self, q, k, v, call):
        with torch.no_grad():
            return self._plain(q, k, v, call)

    def backward(self, dout, q, k, v, out, lse, call):
        with torch.enable_grad():
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            o, _ = self._plain(*leaves, call)
            return torch.autograd.grad(o, leaves, dout)


class HalfSoftmax(ExactBackend):
    """Drops the float32 upcast: softmax attention computed in the input dtype (bf16 / fp16)."""

    def kernel(self) -> HalfKernel:
        return HalfKernel(self)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        if dropout_p > 0:
            raise NotImplementedError("HalfSoftmax has no dropout")
        B, T, Hq, D = q.shape
        scale = self.softmax_scale
        if docs is None:
            mask = allowed_mask(T, k.shape[1], causal=True, window=tuple(self.window_size))
            out, _ = baseline.attention(q, k, v, torch.from_numpy(mask)[None], scale=scale)
            return out
        ks = docs.local_k_slice or slice(0, k.shape[0] * k.shape[1])
        kf = k.reshape(-1, *k.shape[2:])[ks][None]
        vf = v.reshape(-1, *v.shape[2:])[ks][None]
        mask = allowed_mask(
            B * T,
            kf.shape[1],
            causal=True,
            window=tuple(self.window_size),
            cu_seqlens_q=list(docs.cu_q_host),
            cu_seqlens_k=list(docs.cu_k_host),
        )
        out, _ = baseline.attention(
            q.reshape(1, B * T, Hq, D), kf, vf, torch.from_numpy(mask)[None], scale=scale
        )
        return out.reshape(B, T, Hq, D)


# ----------------------------------------------------------------------------- dtype x layout


class _Float16GQAKernel(ExactKernel):
    def forward(self, q, k, v, call):
        self.owner.input_dtype = q.dtype
        return super().forward(q, k, v, call)

    def backward(self, dout, q, k, v, out, lse, call):
        self.owner.input_dtype = q.dtype
        return super().backward(dout, q, k, v, out, lse, call)


class Float16GQAShortcut(ExactBackend):
    """Right for every dtype and layout but one: float16 with grouped heads takes a shortcut that
    pairs query head ``h`` with kv head ``h % Hkv`` (instead of ``h // (Hq / Hkv)``)."""

    input_dtype: torch.dtype | None = None

    def kernel(self) -> _Float16GQAKernel:
        return _Float16GQAKernel(self)

    def _attend(self, q, k, v, docs, dropout_p):
        self.input_dtype = q.dtype
        return super()._attend(q, k, v, docs, dropout_p)

    def group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        G = q.shape[-2] // k.shape[-2]
        if self.input_dtype != torch.float16 or G == 1:
            return q, k, v
        tile = (1,) * (k.dim() - 2) + (G, 1)
        return q, k.tile(tile), v.tile(tile)


# ----------------------------------------------------------------------------- Ulysses


class _AveragedReplicas(torch.autograd.Function):
    """Forward: ``repeat_interleave(f)`` over heads; backward: the *mean* of the replicas' gradients
    (the right merge is their sum)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, f: int) -> torch.Tensor:
        ctx.f = f
        return t.repeat_interleave(f, dim=2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, T, Hf, D = grad.shape
        return grad.reshape(B, T, Hf // ctx.f, ctx.f, D).mean(3), None


class UlyssesAveragedReplicas(ExactBackend):
    """Ulysses CP whose replicated kv heads (``n_kv_heads`` not a multiple of the world size) merge
    their gradients by averaging; everything else (no CP, ring CP, Ulysses without replicas) is right."""

    def forward(self, qkv: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (self.cp_enabled and self.uly is not None):
            return super().forward(qkv, *args, **kwargs)
        import olmo_attn.cp.ulysses as uly

        original = uly.ulysses_attention

        def wrong(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
            import torch.distributed as dist

            f = uly.kv_replication_factor(q.shape[2], k.shape[2], dist.get_world_size(backend.cp_pg))
            if f > 1:  # replicate here; the library then sees a multiple of the world size (f = 1)
                k, v = _AveragedReplicas.apply(k, f), _AveragedReplicas.apply(v, f)
            return original(backend, q, k, v, **kw)

        uly.ulysses_attention = wrong
        try:
            return super().forward(qkv, *args, **kwargs)
        finally:
            uly.ulysses_attention = original
