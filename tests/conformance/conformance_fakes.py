"""Test-only backends for the harness's own tests — never shipped, never in the capability table.

``ExactBackend`` wraps the float64 reference twins (correct by construction: its only error is the
final rounding to the input dtype); every ``Wrong*`` subclass carries one classic bug. They are
registered with :func:`conformance.subjects.register_subject` (the harness's registry hook) under
their own names, with a copy of the torch backend's table entry as their capability declaration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

import reference.twins as twins
from conformance.subjects import Subject
from olmo_attn.backends.base import AttentionBackend
from olmo_attn.backends.capabilities import TABLE, Feature
from olmo_attn.masks import DocSegments
from olmo_attn.ops.kernel import KernelCall
from reference.attention import allowed_mask

F64 = torch.float64


def _host(t: torch.Tensor | None, host: tuple[int, ...] | None) -> list[int] | None:
    if host is not None:
        return list(host)
    return None if t is None else [int(x) for x in t.tolist()]


class ExactKernel:
    """``AttentionKernel`` over the float64 twin: forward ``(out, lse)``; backward by autograd."""

    name = "exact"

    def __init__(self, owner: ExactBackend):
        self.owner = owner

    def _run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kw: dict[str, Any] = dict(
            scale=self.owner.kernel_scale(call.scale, q.shape[-1]),
            causal=call.causal,
            window=self.owner.kernel_window(call.window),
        )
        if call.varlen:
            cu_q = self.owner.segments(_host(call.cu_seqlens_q, call.cu_seqlens_q_host))
            cu_k = self.owner.segments(_host(call.cu_seqlens_k, call.cu_seqlens_k_host) or cu_q)
            kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        if call.dropout_p > 0:
            from olmo_attn.ops.dropout import keep_mask

            B = 1 if call.varlen else q.shape[0]
            Tq = q.shape[0] if call.varlen else q.shape[1]
            Tk = k.shape[0] if call.varlen else k.shape[1]
            kw.update(
                keep_mask=keep_mask(call.dropout_seed, B, q.shape[-2], Tq, Tk, call.dropout_p),
                dropout_p=call.dropout_p,
            )
        q4, k4, v4 = self.owner.group(q.to(F64), k.to(F64), v.to(F64))
        return twins.attention(q4, k4, v4, **kw)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: KernelCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out, lse = self._run(q, k, v, call)
        lse = lse.to(F64 if q.dtype == F64 else torch.float32) + self.owner.lse_offset
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, call):
        """Flash-style: the share of the full gradient given the final ``out`` / ``lse`` (which may
        merge several key blocks, as in ring attention), via the surrogate
        ``g = Σ exp(s − lse) ∘ (Z · dO·vᵀ − rowsum(dO ∘ out))`` whose gradient w.r.t. ``s`` is ``dS``."""
        varlen = call.varlen
        with torch.enable_grad():  # ring attention calls this inside an autograd.Function's backward
            leaves = [t.detach().to(F64).requires_grad_(True) for t in (q, k, v)]
            ql, kl, vl = (t[None] if varlen else t for t in leaves)
            do, o = (t.detach().to(F64) for t in (dout, out))
            L = lse.detach().to(F64)
            if varlen:
                do, o, L = do[None], o[None], L[None]
            qg, kg, vg = self.owner.group(ql, kl, vl)
            G = qg.shape[2] // kg.shape[2]
            kg, vg = kg.repeat_interleave(G, dim=2), vg.repeat_interleave(G, dim=2)
            Tq, Tk = qg.shape[1], kg.shape[1]
            cu_q = cu_k = None
            if varlen:
                cu_q = self.owner.segments(_host(call.cu_seqlens_q, call.cu_seqlens_q_host))
                cu_k = self.owner.segments(_host(call.cu_seqlens_k, call.cu_seqlens_k_host) or cu_q)
            mask = torch.from_numpy(
                allowed_mask(
                    Tq,
                    Tk,
                    causal=call.causal,
                    window=self.owner.kernel_window(call.window),
                    cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k,
                )
            )[None, None]
            scale = self.owner.kernel_scale(call.scale, q.shape[-1])
            s = scale * torch.einsum("bqhd,bkhd->bhqk", qg, kg)
            valid = mask & torch.isfinite(L)[..., None]
            finite_l = torch.where(torch.isfinite(L), L, torch.zeros_like(L))
            p = torch.exp((s - finite_l[..., None]).masked_fill(~valid, -math.inf))  # no inf*0 in the grad
            z = torch.ones_like(p)
            if call.dropout_p > 0:
                from olmo_attn.ops.dropout import keep_mask

                z = keep_mask(call.dropout_seed, qg.shape[0], qg.shape[2], Tq, Tk, call.dropout_p).to(F64)
                z = z / (1.0 - call.dropout_p)
            dp = torch.einsum("bqhd,bkhd->bhqk", do, vg)
            delta = (do * o).sum(-1).transpose(1, 2)[..., None]  # [B, H, Tq, 1]
            g = (p * (z * dp.detach() - delta)).sum() + (p.detach() * z * dp).sum()
            grads = torch.autograd.grad(g, leaves)
        return tuple(gr.to(t.dtype) for gr, t in zip(grads, (q, k, v)))


class ExactBackend(AttentionBackend):
    """A correct backend: the float64 reference twin, rounded to the input dtype once at the end."""

    name: ClassVar[str] = "torch"  # reads the torch row of the capability table
    lse_offset: ClassVar[float] = 0.0

    # ----- the hooks a wrong subclass overrides ----------------------------------------------------
    def kernel_scale(self, scale: float, head_dim: int) -> float:
        return scale

    def kernel_window(self, window: tuple[int, int]) -> tuple[int, int]:
        return tuple(window)  # type: ignore[return-value]

    def segments(self, cu: list[int] | None) -> list[int] | None:
        return cu

    def group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return q, k, v

    # ----- backend hooks ---------------------------------------------------------------------------
    def kernel(self) -> ExactKernel:
        return ExactKernel(self)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocSegments | None, dropout_p: float
    ) -> torch.Tensor:
        kw: dict[str, Any] = dict(
            scale=self.kernel_scale(self.softmax_scale, q.shape[-1]),
            window=self.kernel_window(self.window_size),
            causal=True,
        )
        if docs is not None:
            kw.update(
                cu_doc_lens_q=self.segments(list(docs.cu_q_host)),
                cu_doc_lens_k=self.segments(list(docs.cu_k_host)),
                local_k_slice=docs.local_k_slice,
            )
        if dropout_p > 0:  # the counter-based keep mask of olmo_attn.ops.dropout, in the solved layout
            from olmo_attn.ops.dropout import keep_mask, new_seed

            B, T, Hq = q.shape[:3]
            n_k = (
                (docs.local_k_slice.stop - docs.local_k_slice.start)
                if docs and docs.local_k_slice
                else k.shape[0] * k.shape[1]
            )
            shape = (1, Hq, B * T, n_k) if docs is not None else (B, Hq, T, k.shape[1])
            kw.update(keep_mask=keep_mask(new_seed(), *shape, dropout_p), dropout_p=dropout_p)
        q4, k4, v4 = self.group(q.to(F64), k.to(F64), v.to(F64))
        out, _ = twins.sdpa(q4, k4, v4, **kw)
        return out.to(q.dtype)


class WrongWindow(ExactBackend):
    """Sliding window off by one: sees one key too many on the left."""

    def kernel_window(self, window: tuple[int, int]) -> tuple[int, int]:
        left, right = window
        return (left + 1 if left >= 0 else left, right)


class WrongScale(ExactBackend):
    """Softmax scale missing (uses 1 instead of 1/sqrt(D))."""

    def kernel_scale(self, scale: float, head_dim: int) -> float:
        return 1.0


class WrongDocuments(ExactBackend):
    """A document boundary leaked: every inner boundary moves one token later."""

    def segments(self, cu: list[int] | None) -> list[int] | None:
        if cu is None or len(cu) < 3:
            return cu
        out = [cu[0]] + [min(c + 1, cu[-1]) for c in cu[1:-1]] + [cu[-1]]
        for i in range(1, len(out)):
            out[i] = max(out[i], out[i - 1])
        return out


class WrongGQA(ExactBackend):
    """GQA heads grouped wrongly: query head h uses kv head h % Hkv instead of h // (Hq / Hkv)."""

    def group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        G = q.shape[-2] // k.shape[-2]
        if G == 1:
            return q, k, v
        tile = (1,) * (k.dim() - 2) + (G, 1)  # kv head of query head h becomes h % Hkv
        return q, k.tile(tile), v.tile(tile)


class WrongLSE(ExactBackend):
    """The kernel's log-sum-exp is off by a constant (outputs and gradients are right)."""

    lse_offset: ClassVar[float] = 0.25


WRONG_BACKENDS: dict[str, type[ExactBackend]] = {
    "wrong_window": WrongWindow,
    "wrong_scale": WrongScale,
    "wrong_documents": WrongDocuments,
    "wrong_gqa": WrongGQA,
    "wrong_lse": WrongLSE,
}


def subject_for(
    name: str, cls: type[ExactBackend], *, features: frozenset[Feature] | None = None, module_hook: Any = None
) -> Subject:
    """A :class:`Subject` for ``cls`` with the torch row's capabilities (minus determinism)."""
    spec = dataclasses.replace(
        TABLE["torch"],
        name=name,
        class_name=cls.__name__,
        verified_on=frozenset(),
        features=features if features is not None else TABLE["torch"].features,
    )

    def factory(**kwargs: Any) -> ExactBackend:
        kwargs.pop("cache", None)
        return cls(**kwargs)

    return Subject(name=name, spec=spec, backend_factory=factory, table_name="torch", module_hook=module_hook)


def swap_rope_halves(module: torch.nn.Module) -> torch.nn.Module:
    """Module hook: RoPE rotates with its two halves swapped (a classic port bug)."""
    rope = getattr(module, "rope", None)
    if rope is None:
        return module
    original = rope.forward

    def forward(
        q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def swap(t: torch.Tensor) -> torch.Tensor:
            h = t.shape[-1] // 2
            return torch.cat([t[..., h:], t[..., :h]], dim=-1)

        qr, kr = original(swap(q), swap(k), *args, **kwargs)
        return swap(qr), swap(kr)

    rope.forward = forward  # type: ignore[method-assign]
    return module


def gate_wrong_axis(module: torch.nn.Module) -> torch.nn.Module:
    """Module hook: the gate is laid out on the wrong axis (a ``view`` where a ``transpose`` belongs):
    headwise gates ``[B, T, H]`` read as ``[B, H, T]``, elementwise ones dim-major instead of head-major."""
    if getattr(module, "gate", None) is None:
        return module

    def _gate(x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        B, T, H, D = att.shape
        g = torch.sigmoid(module.w_g(x).float()).to(att.dtype)
        if g.shape[-1] == H:
            return att * g.reshape(B, H, T).transpose(1, 2)[..., None]
        return att * g.reshape(B, T, D, H).transpose(-1, -2)

    module._gate = _gate  # type: ignore[method-assign]
    return module
