"""Parity with OLMo-core itself (``ai2-olmo-core==3.0.0``, CPU, float32).

For a seeded grid of configurations that OLMo-core's torch backend supports, both libraries build
the module from the same config (ours converted with ``to_olmo_core_config_dict``), load identical
weights both ways, and must agree on the output, the input gradient and every parameter gradient
(rtol 1e-5), on ``num_params``, on ``init_weights`` draws and on config dicts in both directions.
``FusedAttention`` needs flash-attn in OLMo-core (3.0 builds ``FusedAttentionV2`` for it), so its
math is compared through OLMo-core's ``Attention`` with the concatenated ``w_qkv`` weights.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

olmo_core = pytest.importorskip("olmo_core")

from olmo_core.nn import attention as oc_attention  # noqa: E402
from olmo_core.nn.transformer.init import InitMethod  # noqa: E402

from olmo_attn import (  # noqa: E402
    ABFRoPEScalingConfig,
    AttentionConfig,
    FusedAttention,
    GateConfig,
    LayerNormConfig,
    PIRoPEScalingConfig,
    RoPEConfig,
    SequenceMixerConfig,
    SlidingWindowAttentionConfig,
    StepwiseRoPEScalingConfig,
    YaRNRoPEScalingConfig,
    to_olmo_core_config_dict,
)

pytestmark = pytest.mark.peer

D_MODEL, B, T = 64, 2, 16
N_LAYERS = 4
RTOL, ATOL = 1e-5, 1e-6

ROPES = [
    None,
    RoPEConfig(),
    RoPEConfig(theta=10_000, name="complex"),
    RoPEConfig(theta=10_000, partial_rotary_factor=0.5),
    RoPEConfig(name="complex", partial_rotary_factor=0.5),
    RoPEConfig(theta=10_000, scaling=ABFRoPEScalingConfig(attention_rescale_factor=1.2, new_theta=50_000)),
    RoPEConfig(theta=10_000, scaling=PIRoPEScalingConfig(factor=4.0)),
    RoPEConfig(scaling=StepwiseRoPEScalingConfig(factor=8.0, old_context_len=8)),
    RoPEConfig(theta=10_000, scaling=YaRNRoPEScalingConfig(factor=4.0, old_context_len=8)),
    RoPEConfig(theta=10_000, full_precision=False),
]
NORMS = [
    None,
    LayerNormConfig(),
    LayerNormConfig(name="rms"),
    LayerNormConfig(name="rms", bias=False, eps=1e-6),
    LayerNormConfig(name="qwen_rms"),
    LayerNormConfig(name="l2_norm"),
    LayerNormConfig(elementwise_affine=False),
]


def _grid() -> list[tuple[str, AttentionConfig]]:
    """Hand-picked cases (each option at least once) plus a seeded random sample of combinations."""
    cases: list[AttentionConfig] = [
        AttentionConfig(n_heads=4),
        AttentionConfig(n_heads=4, n_kv_heads=2),
        AttentionConfig(n_heads=4, n_kv_heads=1, bias=False),
        AttentionConfig(n_heads=4, head_dim=24),
        AttentionConfig(n_heads=4, gate=GateConfig()),
        AttentionConfig(n_heads=4, gate=GateConfig(granularity="elementwise", full_precision=False)),
        AttentionConfig(n_heads=4, clip_qkv=0.5),
        AttentionConfig(n_heads=4, qk_norm=LayerNormConfig(), use_head_qk_norm=True),
        AttentionConfig(n_heads=4, qk_norm=LayerNormConfig(name="rms"), use_head_qk_norm=True, n_kv_heads=2),
        AttentionConfig(n_heads=4, sliding_window=SlidingWindowAttentionConfig(pattern=[5, -1])),
        AttentionConfig(
            n_heads=4,
            rope=RoPEConfig(no_global_rope=True),
            sliding_window=SlidingWindowAttentionConfig(pattern=[3]),
        ),
        AttentionConfig(name="normalized", n_heads=4),
        AttentionConfig(name="normalized", n_heads=4, n_kv_heads=2, qk_norm=LayerNormConfig(name="l2_norm")),
        AttentionConfig(name="normalized", n_heads=4, qk_norm=LayerNormConfig(name="rms"), rope=RoPEConfig()),
    ]
    cases += [AttentionConfig(n_heads=4, rope=r) for r in ROPES[1:]]
    cases += [AttentionConfig(n_heads=4, qk_norm=n) for n in NORMS[1:]]
    rng = random.Random(2024)
    for _ in range(40):
        n_kv = rng.choice([None, 2, 1])
        per_head = rng.choice([None, True, False])
        norm = rng.choice(NORMS)
        if per_head and norm is not None and norm.name == "l2_norm":
            per_head = False
        cases.append(
            AttentionConfig(
                n_heads=4,
                n_kv_heads=n_kv,
                head_dim=rng.choice([None, 24]),
                bias=rng.choice([None, False]),
                gate=rng.choice([None, GateConfig(), GateConfig(granularity="elementwise")]),
                rope=rng.choice(ROPES),
                clip_qkv=rng.choice([None, 0.6]),
                qk_norm=norm,
                use_head_qk_norm=per_head,
                sliding_window=rng.choice([None, SlidingWindowAttentionConfig(pattern=[4, 9, -1])]),
            )
        )
    out = []
    for i, cfg in enumerate(cases):
        for layer in sorted({0, 1} if cfg.sliding_window is not None else {1}):
            out.append((f"{i}-layer{layer}", cfg, layer))
    return out


GRID = _grid()


def _olmo_core_config(cfg: AttentionConfig) -> oc_attention.AttentionConfig:
    oc_cfg = oc_attention.AttentionConfig.from_dict(to_olmo_core_config_dict(cfg))
    assert isinstance(oc_cfg, oc_attention.AttentionConfig)
    return oc_cfg


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """rtol 1e-5 per element; the absolute floor is 1e-5 of the tensor's largest entry (entries
    that are sums with cancellation, e.g. weight gradients, carry round-off of that scale)."""
    atol = max(ATOL, RTOL * want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda s: f"{what}: {s}")


def _compare(ours: torch.nn.Module, theirs: torch.nn.Module, *, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_MODEL, generator=gen)
    dy = torch.randn(B, T, D_MODEL, generator=gen)
    results = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y1, dx1, g1), (y2, dx2, g2) = results
    _close(y1, y2, "output")
    _close(dx1, dx2, "dx")
    assert g1.keys() == g2.keys()
    for name in g1:
        _close(g1[name], g2[name], f"d{name}")


@pytest.mark.parametrize("case_id,cfg,layer", GRID, ids=[g[0] for g in GRID])
def test_module_parity(case_id, cfg, layer):
    seed = int(case_id.split("-")[0])
    torch.manual_seed(seed)
    ours = cfg.build(D_MODEL, layer_idx=layer, n_layers=N_LAYERS)
    theirs = _olmo_core_config(cfg).build(D_MODEL, layer_idx=layer, n_layers=N_LAYERS)
    assert type(ours).__name__ == type(theirs).__name__
    assert cfg.num_params(D_MODEL) == _olmo_core_config(cfg).num_params(D_MODEL)
    assert (ours.rope is None) == (theirs.rope is None) and ours.window_size == theirs.window_size
    # identical weights, both ways: theirs -> ours, then ours (randomised norms) -> theirs
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or name in ("sq", "sk"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen)).add_(
                    0.05 * torch.randn(p.shape, generator=gen)
                )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _compare(ours, theirs, seed=seed)


@pytest.mark.parametrize(
    "rope", [None, RoPEConfig(name="fused", theta=10_000)], ids=["no-rope", "fused-rope"]
)
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_attention_math_parity(rope, clip, bias):
    """Our FusedAttention (packed w_qkv, fused RoPE) against OLMo-core's Attention (default RoPE, the
    same math) with w_q, w_k, w_v = the three blocks of w_qkv."""
    torch.manual_seed(0)
    ours = FusedAttention(d_model=D_MODEL, n_heads=4, rope=rope, clip_qkv=clip, bias=bias)
    their_rope = None if rope is None else oc_rope_config(theta=rope.theta)
    theirs = oc_attention.Attention(
        d_model=D_MODEL, n_heads=4, rope=their_rope, clip_qkv=clip, bias=bias, backend="torch"
    )
    state = {"w_out." + k: v for k, v in ours.w_out.state_dict().items()}
    for i, n in enumerate("qkv"):
        state[f"w_{n}.weight"] = ours.w_qkv.weight[i * D_MODEL : (i + 1) * D_MODEL]
        if bias:
            state[f"w_{n}.bias"] = ours.w_qkv.bias[i * D_MODEL : (i + 1) * D_MODEL]
    theirs.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D_MODEL, generator=gen)
    dy = torch.randn(B, T, D_MODEL, generator=gen)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    y1.backward(dy)
    y2.backward(dy)
    _close(y1, y2, "output")
    _close(x1.grad, x2.grad, "dx")
    dqkv = torch.cat([getattr(theirs, f"w_{n}").weight.grad for n in "qkv"])
    _close(ours.w_qkv.weight.grad, dqkv, "dw_qkv")
    _close(ours.w_out.weight.grad, theirs.w_out.weight.grad, "dw_out")
    assert AttentionConfig(name="fused", n_heads=4, bias=bias).num_params(
        D_MODEL
    ) == oc_attention.AttentionConfig(name="fused", n_heads=4, bias=bias).num_params(D_MODEL)


def oc_rope_config(**kw):
    from olmo_core.nn.rope import RoPEConfig as OCRoPEConfig

    return OCRoPEConfig(**kw)


@pytest.mark.parametrize("method", list(InitMethod), ids=str)
@pytest.mark.parametrize("gate", [None, GateConfig()], ids=["no-gate", "gate"])
def test_init_weights_draw_identically(method, gate):
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, gate=gate, qk_norm=LayerNormConfig())
    ours = cfg.build(D_MODEL, layer_idx=0, n_layers=1)
    theirs = _olmo_core_config(cfg).build(D_MODEL, layer_idx=0, n_layers=1)
    kw = dict(init_method=method, d_model=D_MODEL, block_idx=1, num_blocks=3, std=0.03)
    ours.init_weights(**kw, generator=torch.Generator().manual_seed(7))
    theirs.init_weights(**kw, generator=torch.Generator().manual_seed(7))
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_config_dicts_interchange_both_ways():
    fused = AttentionConfig(name="fused", n_heads=8, rope=RoPEConfig(name="fused"))
    for cfg in [*(g[1] for g in GRID[::3]), fused]:
        oc_cfg = _olmo_core_config(cfg)
        # OLMo-core's serialised config (with its 3.x-only fields at their defaults) -> ours
        assert AttentionConfig.from_dict(oc_cfg.as_config_dict()) == cfg
        assert SequenceMixerConfig.from_dict(oc_cfg.as_config_dict()) == cfg
        assert AttentionConfig.from_dict(oc_cfg.as_dict()) == cfg
        # ours -> OLMo-core: equal to the config OLMo-core builds from the same fields
        assert to_olmo_core_config_dict(cfg)["_CLASS_"] == "olmo_core.nn.attention.AttentionConfig"
        assert oc_attention.AttentionConfig.from_dict(to_olmo_core_config_dict(cfg)).as_config_dict() == (
            oc_cfg.as_config_dict()
        )


def test_sliding_window_table_parity():
    for pattern in ([1024, 2048, -1], [7], [3, -1, 5, 9]):
        for first in (False, True):
            for last in (False, True):
                ours = SlidingWindowAttentionConfig(pattern, first, last)
                theirs = oc_attention.SlidingWindowAttentionConfig(pattern, first, last)
                for n_layers in (1, 3, 12):
                    for layer in range(n_layers):
                        assert ours._get_window_size(layer, n_layers) == theirs._get_window_size(
                            layer, n_layers
                        )


def test_olmo_core_behaviours_we_fix():
    """Document, against the peer, two of the fixes listed in docs/differences.md."""
    torch.manual_seed(0)
    cfg = AttentionConfig(n_heads=4, dropout=0.5)
    ours = cfg.build(D_MODEL, layer_idx=0, n_layers=1).eval()
    theirs = _olmo_core_config(cfg).build(D_MODEL, layer_idx=0, n_layers=1).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, T, D_MODEL)
    with torch.no_grad():
        assert torch.equal(ours(x), ours(x))  # eval: deterministic
        torch.manual_seed(1)
        a = theirs(x)
        torch.manual_seed(2)
        assert not torch.equal(a, theirs(x))  # OLMo-core still drops attention weights in eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = oc_attention.Attention(d_model=24, n_heads=6, n_kv_heads=4, backend="torch")  # accepted there
    assert bad.n_kv_heads == 4
    with pytest.raises(Exception, match="not divisible by n_kv_heads"):
        AttentionConfig(n_heads=6, n_kv_heads=4).build(24, layer_idx=0, n_layers=1)
