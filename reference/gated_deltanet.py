"""Gated DeltaNet (OLMo-core's ``GatedDeltaNet`` forward and its gated delta rule) in NumPy float64,
token by token.

Gated delta rule per value head, state ``S ∈ R^{Dk × Dv}`` (fla's ``[K, V]`` layout)::

    q̂ = q / sqrt(‖q‖² + 1e-6),  k̂ = k / sqrt(‖k‖² + 1e-6)       (use_qk_l2norm)
    S' = exp(g_t) · S_{t−1}                                       decay (g = log-decay ≤ 0)
    u  = β_t · (v_t − S'ᵀ k̂_t)                                    delta-rule correction
    S_t = S' + k̂_t u_tᵀ = exp(g_t)(I − β_t k̂ k̂ᵀ) S_{t−1} + β_t k̂_t v_tᵀ
    o_t = scale · S_tᵀ q̂_t                                        scale = Dk^(−1/2) by default

The state starts at 0 (or ``initial_state``) at the start of every sequence / document.

Layer, with ``σ`` the logistic sigmoid and ``silu(z) = z σ(z)``::

    q̃, k̃, ṽ = w_q(x), w_k(x), w_v(x)
    β = σ(w_b(x)) (· 2 if allow_neg_eigval),   g = −exp(A_log) · softplus(w_a(x) + dt_bias)
    q, k, v = silu(causal_conv1d(q̃, k̃, ṽ))          depthwise, kernel Kc, reset per document
    heads: q, k [B, T, H, Dk] repeated to HV heads (value head j uses q/k head j // (HV/H))
    o = gated_delta_rule(q, k, v, g, β)             [B, T, HV, Dv]
    y = o / sqrt(mean(o²) + eps) · o_norm.weight · silu(w_g(x))      per (token, head)
    out = w_out(y.reshape(B, T, HV·Dv))
"""

from __future__ import annotations

import numpy as np

from reference.gating import sigmoid


def silu(x) -> np.ndarray:
    """``x · σ(x)``."""
    x = np.asarray(x, np.float64)
    return x * sigmoid(x)


def softplus(x) -> np.ndarray:
    """``ln(1 + eˣ)``, computed without overflow."""
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def _sequences(cu_seqlens, B: int, T: int) -> list[tuple[slice, int, int]]:
    """Independent sequences as ``(rows, start, stop)``: all rows at once without ``cu_seqlens``,
    else one entry per document of the single packed row. Entry ``n`` owns states ``rows`` (no
    ``cu_seqlens``) or state ``n``."""
    if cu_seqlens is None:
        return [(slice(0, B), 0, T)]
    cu = np.asarray(cu_seqlens, np.int64)
    if B != 1:
        raise ValueError(f"cu_seqlens needs B == 1 (one packed row), got B={B}")
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {cu.tolist()}")
    return [(slice(0, 1), int(cu[n]), int(cu[n + 1])) for n in range(cu.size - 1)]


def l2norm(x, eps: float = 1e-6) -> np.ndarray:
    """``x / sqrt(‖x‖² + eps)`` over the last dim."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + eps)


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    cu_seqlens=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The recurrence of the module docstring.

    Args:
        q, k: ``[B, T, HV, Dk]`` (``[B, T, H, Dk]`` with ``HV % H == 0`` is repeated to ``HV`` heads);
        v: ``[B, T, HV, Dv]``; g (log-decay), beta: ``[B, T, HV]``.
        initial_state: ``[N, HV, Dk, Dv]``, ``N`` = number of sequences (``B``, or documents).
        cu_seqlens: ``[N + 1]`` document boundaries of one packed row (``B == 1``).

    Returns:
        ``o [B, T, HV, Dv]`` and the final state ``[N, HV, Dk, Dv]`` (``None`` unless
        ``output_final_state``).
    """
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    B, T, HV, Dv = v.shape
    if q.shape[2] != HV:
        if HV % q.shape[2]:
            raise ValueError(f"{HV} value heads are not a multiple of {q.shape[2]} q/k heads")
        q, k = (np.repeat(a, HV // q.shape[2], axis=2) for a in (q, k))
    Dk = q.shape[-1]
    scale = Dk**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    seqs = _sequences(cu_seqlens, B, T)
    N = B if cu_seqlens is None else len(seqs)
    if initial_state is not None:
        initial_state = np.asarray(initial_state, np.float64)
        if initial_state.shape != (N, HV, Dk, Dv):
            raise ValueError(f"initial_state must be {(N, HV, Dk, Dv)}, got {initial_state.shape}")
    o = np.zeros((B, T, HV, Dv))
    finals = []
    for n, (rows, start, stop) in enumerate(seqs):
        states = rows if cu_seqlens is None else slice(n, n + 1)
        n_rows = rows.stop - rows.start
        S = np.zeros((n_rows, HV, Dk, Dv)) if initial_state is None else initial_state[states].copy()
        for t in range(start, stop):
            S = np.exp(g[rows, t])[..., None, None] * S
            u = beta[rows, t][..., None] * (v[rows, t] - np.einsum("bhkv,bhk->bhv", S, k[rows, t]))
            S = S + k[rows, t][..., None] * u[..., None, :]
            o[rows, t] = scale * np.einsum("bhkv,bhk->bhv", S, q[rows, t])
        finals.append(S)
    final = np.concatenate(finals, axis=0)
    return o, final if output_final_state else None


def causal_conv1d(x, weight, bias=None, cu_seqlens=None, activation: str | None = "silu") -> np.ndarray:
    """Depthwise causal convolution, reset at sequence / document starts::

        y[t, c] = act(Σ_{i=0}^{Kc−1} w[c, i] · x[t − (Kc−1) + i, c] + bias[c])

    with ``x[τ] = 0`` before the start of the sequence containing ``t``. Tap ``Kc − 1`` multiplies
    the current token.

    Args:
        x: ``[B, T, C]``; weight: ``[C, Kc]`` (or ``[C, 1, Kc]``); bias: ``[C]`` or ``None``.
        cu_seqlens: document boundaries of one packed row (``B == 1``).
        activation: ``"silu"`` / ``"swish"`` or ``None``.

    Returns:
        ``[B, T, C]``.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64).reshape(x.shape[-1], -1)
    B, T, _ = x.shape
    Kc = w.shape[1]
    start = np.zeros(T, np.int64)  # start of the sequence containing t
    for _rows, s0, s1 in _sequences(cu_seqlens, B, T):
        start[s0:s1] = s0
    t = np.arange(T)
    y = np.zeros_like(x)
    for i in range(Kc):
        shift = Kc - 1 - i
        src = t - shift
        valid = src >= start
        y += np.where(valid[None, :, None], x[:, np.maximum(src, 0)], 0.0) * w[:, i]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if activation in ("silu", "swish"):
        return silu(y)
    if activation is None:
        return y
    raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")


def gated_rms_norm(o, z, weight, eps: float = 1e-5) -> np.ndarray:
    """``o / sqrt(mean(o²) + eps) · weight · silu(z)`` over the last dim; o, z ``[..., Dv]``, weight ``[Dv]``."""
    o = np.asarray(o, np.float64)
    return o / np.sqrt((o * o).mean(-1, keepdims=True) + eps) * np.asarray(weight, np.float64) * silu(z)


def gdn_layer_forward(
    weights: dict,
    x,
    *,
    n_heads: int,
    n_v_heads: int | None = None,
    head_dim: int | None = None,
    expand_v: float = 2.0,
    allow_neg_eigval: bool = True,
    conv_size: int = 4,
    norm_eps: float = 1e-5,
    cu_doc_lens=None,
) -> np.ndarray:
    """``GatedDeltaNet.forward``: ``x [B, T, d_model]`` → ``[B, T, d_model]``.

    ``weights`` keys: ``w_q/w_k/w_v/w_a/w_b/w_g/w_out.weight``, ``A_log``, ``dt_bias``,
    ``{q,k,v}_conv1d.weight`` ``[C, 1, Kc]`` (+ optional ``.bias``), ``o_norm.weight``.
    ``cu_doc_lens`` describes documents of one packed row (``B == 1``).
    """
    x = np.asarray(x, np.float64)
    B, T, d_model = x.shape
    H, HV = n_heads, n_v_heads or n_heads
    Dk = head_dim or d_model // n_heads
    Dv = int(Dk * expand_v)
    if HV < H or HV % H:
        raise ValueError(f"n_v_heads={HV} must be a multiple of n_heads={H}")

    def lin(name: str, a: np.ndarray) -> np.ndarray:
        return a @ np.asarray(weights[f"{name}.weight"], np.float64).T

    def conv(name: str, a: np.ndarray) -> np.ndarray:
        w = np.asarray(weights[f"{name}.weight"], np.float64)
        if w.shape[-1] != conv_size:
            raise ValueError(f"{name}.weight has kernel width {w.shape[-1]}, conv_size is {conv_size}")
        return causal_conv1d(a, w, weights.get(f"{name}.bias"), cu_seqlens=cu_doc_lens)

    beta = sigmoid(lin("w_b", x))
    if allow_neg_eigval:
        beta = 2 * beta
    g = -np.exp(np.asarray(weights["A_log"], np.float64)) * softplus(lin("w_a", x) + weights["dt_bias"])
    q = conv("q_conv1d", lin("w_q", x)).reshape(B, T, H, Dk)
    k = conv("k_conv1d", lin("w_k", x)).reshape(B, T, H, Dk)
    v = conv("v_conv1d", lin("w_v", x)).reshape(B, T, HV, Dv)
    q, k = np.repeat(q, HV // H, axis=2), np.repeat(k, HV // H, axis=2)
    o, _ = gated_delta_rule(q, k, v, g, beta, output_final_state=False, cu_seqlens=cu_doc_lens)
    y = gated_rms_norm(o, lin("w_g", x).reshape(B, T, HV, Dv), weights["o_norm.weight"], norm_eps)
    return lin("w_out", y.reshape(B, T, HV * Dv))
