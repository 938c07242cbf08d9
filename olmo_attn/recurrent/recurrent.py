"""The gated delta rule token by token: the O(1)-per-token decoding step and a loop over it.

One step for state ``S [Dk, Dv]`` (per batch row and value head)::

    a = S^T k,  b = S^T q                   (reductions of the old state over Dk)
    u = beta (v - gamma a)                  gamma = exp(g)
    o = scale (gamma b + (q . k) u)         = scale * S_new^T q
    S_new = gamma S + k u^T

which is the recurrence of ``docs/CONVENTIONS.md`` rearranged so that ``S`` is needed only once:
decoding is memory-bound, its floor is one read and one write of the state per token,
``2 * B * HV * Dk * Dv * 4`` bytes for a float32 state.

* ``kernel="eager"`` (CPU default; always when a gradient is recorded): one batched matmul reads
  ``S`` for ``a`` and ``b``, then ``S *= gamma`` and ``S += k u^T`` in place (two read-write
  passes): five passes over ``S``.
* ``kernel="triton"`` (the default on CUDA, :mod:`.triton_step`): one Triton kernel, one read and
  one write of ``S``.
* ``kernel="compile"``: the whole step (conversion, L2 norm, head broadcast, the two reductions, the
  update, written back into ``state`` in place) as one ``torch.compile`` graph in reduction form
  (no matmul, which Inductor would hand to cuBLAS as a separate pass), so that the reductions over
  ``Dk`` and the update can share one kernel: one read and one write of ``S`` when Inductor fuses
  them, three passes when it does not.
"""

from __future__ import annotations

from typing import Any

import torch

from .chunked import autocast_off, compute_dtype_for, l2norm, validate_gdr_inputs

__all__ = ["STEP_KERNELS", "gated_delta_rule_step", "recurrent_gated_delta_rule", "step_kernel_failures"]


def _expand_heads(x: torch.Tensor, hv: int) -> torch.Tensor:
    """``[B, H, D]`` -> ``[B, HV, D]``: value head ``j`` reads q/k head ``j // (HV // H)``."""
    h = x.shape[1]
    return x if h == hv else x.repeat_interleave(hv // h, dim=1)


def _step_math(
    qn: torch.Tensor,
    kn: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place step: ``qn, kn [B, HV, Dk]``, ``v [B, HV, Dv]``, ``g, beta [B, HV]``,
    ``state [B, HV, Dk, Dv]`` (all in the compute dtype) -> ``(o [B, HV, Dv], new state)``."""
    gamma = g.exp()[..., None]  # [B, HV, 1]
    ab = torch.matmul(torch.stack([kn, qn], dim=-2), state)  # [B, HV, 2, Dv]
    u = beta[..., None] * (v - gamma * ab[..., 0, :])
    o = scale * (gamma * ab[..., 1, :] + (qn * kn).sum(-1, keepdim=True) * u)
    new_state = gamma[..., None] * state + kn[..., :, None] * u[..., None, :]
    return o, new_state


def _step_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    """The whole step in reduction form, for ``torch.compile``; updates ``state`` in place.

    ``q, k [B, H, Dk]`` and ``v [B, HV, Dv]`` in any float dtype, ``g, beta [B, HV]``,
    ``state [B, HV, Dk, Dv]`` float32/float64 -> ``o [B, HV, Dv]`` in the dtype of ``v``.
    ``a`` and ``b`` are written as multiply + sum over ``Dk`` (not a matmul, which the compiler
    would hand to cuBLAS as a separate pass over ``S``) so that they and the update share one
    kernel.
    """
    cdt = state.dtype
    B, H, Dk = q.shape
    HV = v.shape[1]
    qn, kn = q.to(cdt), k.to(cdt)
    if use_qk_l2norm:
        qn, kn = l2norm(qn), l2norm(kn)
    if HV != H:  # value head j reads q/k head j // (HV // H)
        qn = qn[:, :, None].expand(B, H, HV // H, Dk).reshape(B, HV, Dk)
        kn = kn[:, :, None].expand(B, H, HV // H, Dk).reshape(B, HV, Dk)
    gamma = g.to(cdt).exp()[..., None]  # [B, HV, 1]
    a = (state * kn[..., :, None]).sum(-2)  # S^T k  [B, HV, Dv]
    b = (state * qn[..., :, None]).sum(-2)  # S^T q
    u = beta.to(cdt)[..., None] * (v.to(cdt) - gamma * a)
    o = scale * (gamma * b + (qn * kn).sum(-1, keepdim=True) * u)
    state.copy_(gamma[..., None] * state + kn[..., :, None] * u[..., None, :])
    return o.to(v.dtype)


_COMPILED: dict[str, Any] = {}
_FAILED: dict[str, str] = {}  # kernel -> why it could not run here (then eager is used)
STEP_KERNELS = ("auto", "eager", "triton", "compile")


def _compiled_step() -> Any | None:
    """The ``torch.compile``-d :func:`_step_fused` (built once), or ``None`` where compiling failed."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_step_fused, dynamic=False, fullgraph=True)
    return _COMPILED["fn"]


def step_kernel_failures() -> dict[str, str]:
    """Step kernels that failed to build or run here (``{"triton" | "compile": error}``); these
    calls ran the eager step instead."""
    return dict(_FAILED)


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    inplace: bool | None = None,
    compile: bool = False,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule (decoding).

    Args:
        q, k: ``[B, H, Dk]``; v: ``[B, HV, Dv]``; g (log-decay), beta: ``[B, HV]``.
        state: ``[B, HV, Dk, Dv]`` float32 (float64 allowed), the state before this token.
        scale: default ``Dk ** -0.5``.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) first.
        inplace: update ``state`` in place (default: when no gradient is being recorded).
        compile: same as ``kernel="compile"``.
        kernel: ``"eager"`` (PyTorch ops: five passes over the state in place, differentiable),
            ``"triton"`` (:mod:`.triton_step`: one read and one write of a float32 state),
            ``"compile"`` (the ``torch.compile``-d :func:`_step_fused`) or ``"auto"`` (``"triton"``
            on CUDA when no gradient is recorded, the state is float32 and Triton imports; else
            ``"eager"``). ``triton`` / ``compile`` never record gradients (eager is used when one
            is needed), work in place as ``inplace`` says (out of place they first copy the
            state), and fall back to eager where they fail to build (remembered).

    Autocast is disabled inside: the step runs in the state's dtype with or without an enclosing
    ``torch.autocast``.

    Returns:
        ``o [B, HV, Dv]`` in the dtype of ``v`` and the new state (``state`` itself when in place).
    """
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, H, Dk] of equal shape, got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, Dk = q.shape
    if v.dim() != 3 or v.shape[0] != B or v.shape[1] % H:
        raise ValueError(f"v must be [B={B}, HV, Dv] with HV a multiple of H={H}, got {tuple(v.shape)}")
    HV, Dv = v.shape[1], v.shape[2]
    if tuple(g.shape) != (B, HV) or tuple(beta.shape) != (B, HV):
        raise ValueError(f"g and beta must be [B, HV] = {(B, HV)}, got {tuple(g.shape)}, {tuple(beta.shape)}")
    if tuple(state.shape) != (B, HV, Dk, Dv):
        raise ValueError(f"state must be [B, HV, Dk, Dv] = {(B, HV, Dk, Dv)}, got {tuple(state.shape)}")
    cdt = state.dtype if state.dtype in (torch.float32, torch.float64) else compute_dtype_for(q, v)
    scale = float(Dk**-0.5 if scale is None else scale)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, g, beta, state) if isinstance(t, torch.Tensor)
    )
    if inplace is None:
        inplace = not grad and state.dtype == cdt
    if kernel not in STEP_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, STEP_KERNELS))}, got {kernel!r}")
    if compile:
        kernel = "compile"
    if kernel == "auto":
        kernel = "triton" if q.device.type == "cuda" and cdt == torch.float32 else "eager"
    with autocast_off(q.device):
        if kernel == "triton" and not grad and _FAILED.get("triton") is None:
            from .triton_step import triton_gated_delta_rule_step, triton_step_usable

            target = state if inplace and state.dtype == cdt else state.to(cdt, copy=True)
            ok, _ = triton_step_usable(target, q, k, v, g, beta)
            if ok:
                try:
                    o = triton_gated_delta_rule_step(
                        q, k, v, g, beta, target, scale=scale, use_qk_l2norm=use_qk_l2norm
                    )
                    return o, target
                except Exception as e:  # Triton cannot build/launch it here: remember, run eager
                    _FAILED["triton"] = f"{type(e).__name__}: {e}"
        if kernel == "compile" and not grad and _COMPILED.get("fn", True) is not None:
            target = state if inplace and state.dtype == cdt else state.to(cdt, copy=True)
            try:
                fn = _compiled_step()
                o = fn(q, k, v, g, beta, target, scale, bool(use_qk_l2norm))
                return o, target
            except Exception as e:  # no working compiler here: remember, use the eager step
                _COMPILED["fn"] = None
                _FAILED["compile"] = f"{type(e).__name__}: {e}"
        qn, kn = q.to(cdt), k.to(cdt)
        if use_qk_l2norm:
            qn, kn = l2norm(qn), l2norm(kn)
        qn, kn = _expand_heads(qn, HV), _expand_heads(kn, HV)
        vf, gf, bf = v.to(cdt), g.to(cdt), beta.to(cdt)
        if not inplace:
            o, new_state = _step_math(qn, kn, vf, gf, bf, state.to(cdt), scale)
            return o.to(v.dtype), new_state
        # In place: S is read once by the matmul, then scaled and rank-1 updated.
        gamma = gf.exp()[..., None]  # [B, HV, 1]
        ab = torch.matmul(torch.stack([kn, qn], dim=-2), state)  # [B, HV, 2, Dv]
        u = bf[..., None] * (vf - gamma * ab[..., 0, :])  # [B, HV, Dv]
        o = scale * (gamma * ab[..., 1, :] + (qn * kn).sum(-1, keepdim=True) * u)
        flat = state.view(B * HV, Dk, Dv)
        flat.mul_(gamma.reshape(B * HV, 1, 1))
        flat.baddbmm_(kn.reshape(B * HV, Dk, 1), u.reshape(B * HV, 1, Dv))
        return o.to(v.dtype), state


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule; same arguments and results as
    :func:`olmo_attn.recurrent.chunked.chunk_gated_delta_rule` (``q, k [B, T, H, Dk]``,
    ``v [B, T, HV, Dv]``, ``g, beta [B, T, HV]``, state ``[n_seq, HV, Dk, Dv]``). ``O(T)`` Python
    steps: for short inputs and decoding several tokens at once."""
    n_seq, cu_host = validate_gdr_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, _H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    cdt = compute_dtype_for(q, k, v, g, beta, initial_state)
    if cu_host is not None:
        # documents segment the flattened batch: run each as its own sequence of one row
        q1, k1, v1, g1, b1 = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))
        outs, finals = [], []
        for i in range(n_seq):
            a, b = cu_host[i], cu_host[i + 1]
            h0 = None if initial_state is None else initial_state[i : i + 1]
            o_i, f_i = recurrent_gated_delta_rule(
                q1[:, a:b],
                k1[:, a:b],
                v1[:, a:b],
                g1[:, a:b],
                b1[:, a:b],
                scale=scale,
                initial_state=h0,
                output_final_state=True,
                use_qk_l2norm=use_qk_l2norm,
            )
            outs.append(o_i)
            finals.append(f_i)
        o = torch.cat(outs, dim=1).reshape(B, T, HV, Dv)
        return o, (torch.cat(finals) if output_final_state else None)
    state = (
        torch.zeros(B, HV, Dk, Dv, dtype=cdt, device=q.device)
        if initial_state is None
        else initial_state.to(cdt)
    )
    outs = []
    for t in range(T):
        o_t, state = gated_delta_rule_step(
            q[:, t],
            k[:, t],
            v[:, t],
            g[:, t],
            beta[:, t],
            state,
            scale=scale,
            use_qk_l2norm=use_qk_l2norm,
            inplace=False,
        )
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, HV, Dv)
    return o, (state if output_final_state else None)
