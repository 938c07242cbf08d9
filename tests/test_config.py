"""Configs: sliding-window table, gates, ``AttentionConfig`` (num_params, build, every configuration
error of ``build``) and dict / JSON / YAML round trips (ours and OLMo-core's shape)."""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch

from fixtures import config_cases as fx
from olmo_attn import (
    ABFRoPEScalingConfig,
    Attention,
    AttentionBackendName,
    AttentionConfig,
    AttentionType,
    BackendUnavailableError,
    ConfigurationError,
    FusedAttention,
    GateConfig,
    GateGranularity,
    LayerNormConfig,
    NormalizedAttention,
    OLMoConfigurationError,
    RoPEConfig,
    SequenceMixerConfig,
    SlidingWindowAttentionConfig,
    StepwiseRoPEScalingConfig,
    YaRNRoPEScalingConfig,
)
from olmo_attn.backends.capabilities import is_available
from reference.configs import attention_layer_options, attention_num_params, window_for_layer


# ----- SlidingWindowAttentionConfig -------------------------------------------------------------
@pytest.mark.parametrize("first,last,layer,window", fx.WINDOW_TABLE)
def test_window_table(first, last, layer, window):
    cfg = SlidingWindowAttentionConfig(
        pattern=fx.PATTERN, force_full_attention_on_first_layer=first, force_full_attention_on_last_layer=last
    )
    assert cfg._get_window_size(layer, fx.N_LAYERS) == window
    assert window == window_for_layer(fx.PATTERN, layer, fx.N_LAYERS, first, last)
    assert cfg.should_use_swa(layer, fx.N_LAYERS) == (window != -1)
    if window != -1:
        assert cfg.get_window_size(layer, fx.N_LAYERS) == window


def test_window_table_exhaustive_against_reference():
    for first, last in itertools.product((False, True), repeat=2):
        for pattern in ([7], [4, -1], [3, 5, -1, 9]):
            cfg = SlidingWindowAttentionConfig(pattern, first, last)
            for n_layers in (1, 2, 5, 9):
                for layer in range(n_layers):
                    want = window_for_layer(pattern, layer, n_layers, first, last)
                    assert cfg._get_window_size(layer, n_layers) == want


def test_get_window_size_of_a_full_layer_is_a_value_error():
    cfg = SlidingWindowAttentionConfig(pattern=[1024, 2048, -1])
    assert cfg.get_window_size(1, 12) == 1024
    with pytest.raises(ValueError, match="full attention"):
        cfg.get_window_size(0, 12)


def test_invalid_window_pattern_entries():
    with pytest.raises(ConfigurationError, match="positive, or -1"):
        SlidingWindowAttentionConfig(pattern=[0], force_full_attention_on_first_layer=False)._get_window_size(
            0, 12
        )
    with pytest.raises(ConfigurationError, match="positive, or -1"):
        SlidingWindowAttentionConfig(pattern=[8, -3]).should_use_swa(2, 12)
    # lazy: forced layers never read the pattern
    assert SlidingWindowAttentionConfig(pattern=[0])._get_window_size(0, 12) == -1


def test_empty_pattern_is_a_configuration_error_not_zero_division():
    cfg = SlidingWindowAttentionConfig(pattern=[])
    with pytest.raises(ConfigurationError, match="pattern is empty"):
        cfg.should_use_swa(1, 12)
    assert cfg.should_use_swa(0, 12) is False  # forced first layer does not need the pattern


def test_configuration_error_is_olmo_core_compatible_and_not_value_error():
    assert ConfigurationError is OLMoConfigurationError
    assert not issubclass(ConfigurationError, ValueError)


# ----- enums and gate -------------------------------------------------------------------------
def test_enums_and_gate_config():
    assert AttentionType("fused") == "fused" and [m.value for m in AttentionType] == [
        "default",
        "fused",
        "normalized",
    ]
    assert [m.value for m in GateGranularity] == ["headwise", "elementwise"]
    assert GateConfig() == GateConfig(granularity="headwise", full_precision=True)
    assert GateConfig(granularity="elementwise").granularity is GateGranularity.elementwise
    with pytest.raises(ValueError):
        GateConfig(granularity="channelwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AttentionType("linear")
    assert [m.value for m in AttentionBackendName] == ["torch", "flash_2", "flash_3", "flash_4", "te"]


# ----- AttentionConfig: num_params ------------------------------------------------------------
def _random_configs(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        name = rng.choice(list(AttentionType))
        n_heads = rng.choice([1, 2, 4, 8])
        cfg: dict = dict(name=name, n_heads=n_heads)
        qk = rng.choice(
            [
                None,
                LayerNormConfig(),
                LayerNormConfig(name="rms", bias=False),
                LayerNormConfig(name="l2_norm"),
            ]
        )
        cfg["qk_norm"] = qk
        cfg["rope"] = rng.choice([None, RoPEConfig(name="fused" if name == "fused" else "default")])
        if name == AttentionType.default:
            cfg["n_kv_heads"] = rng.choice([None, *[d for d in (1, 2, 4) if n_heads % d == 0]])
            cfg["head_dim"] = rng.choice([None, 8, 12])
            cfg["bias"] = rng.choice([None, True, False])
            cfg["gate"] = rng.choice([None, GateConfig(), GateConfig(granularity="elementwise")])
            cfg["use_head_qk_norm"] = rng.choice([None, True, False])
            cfg["clip_qkv"] = rng.choice([None, 8.0])
        elif name == AttentionType.normalized:
            cfg["n_kv_heads"] = rng.choice([None, 1])
        else:
            cfg["qk_norm"] = None
            cfg["bias"] = rng.choice([None, False])
        yield AttentionConfig(**cfg)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_num_params_equals_built_parameter_count(device):
    d_model = 48
    for cfg in _random_configs(60):
        built = cfg.build(d_model, layer_idx=0, n_layers=1, init_device=device)
        real = sum(p.numel() for p in built.parameters())
        assert cfg.num_params(d_model) == real, cfg
        assert all(p.device.type == device for p in built.parameters())


@pytest.mark.parametrize("fields,count", fx.ATTN_COUNTS)
def test_num_params_hand_counts(fields, count):
    fields = dict(fields)
    if "qk_norm" in fields:
        fields["qk_norm"] = LayerNormConfig(**fields["qk_norm"])
    if "gate" in fields:
        g = fields["gate"]
        fields["gate"] = GateConfig(granularity=g if isinstance(g, str) else g["granularity"])
    cfg = AttentionConfig(n_heads=fx.ATTN["n_heads"], n_kv_heads=fx.ATTN["n_kv_heads"], **fields)
    assert cfg.num_params(fx.ATTN["d_model"]) == count
    built = cfg.build(fx.ATTN["d_model"], layer_idx=0, n_layers=1, init_device="meta")
    assert sum(p.numel() for p in built.parameters()) == count


def test_num_params_matches_reference_formula():
    for cfg in _random_configs(40, seed=3):
        ref = attention_num_params(
            40,
            name=cfg.name.value,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            bias=cfg.bias,
            gate=None if cfg.gate is None else cfg.gate.granularity.value,
            qk_norm=None if cfg.qk_norm is None else cfg.qk_norm.as_dict(exclude_none=True),
            use_head_qk_norm=cfg.use_head_qk_norm,
        )
        assert cfg.num_params(40) == ref


# ----- AttentionConfig: build -----------------------------------------------------------------
def test_build_dispatch_and_forwarded_options():
    attn = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=6, bias=False, clip_qkv=3.0, dropout=0.1).build(
        16, layer_idx=0, n_layers=2
    )
    assert type(attn) is Attention
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.clip_qkv) == (4, 2, 6, 3.0)
    assert attn.w_q.bias is None and attn.backend.dropout_p == 0.1
    assert type(AttentionConfig(name="fused", n_heads=4).build(16, layer_idx=0, n_layers=1)) is FusedAttention
    norm = AttentionConfig(name="normalized", n_heads=4).build(16, layer_idx=0, n_layers=1)
    assert type(norm) is NormalizedAttention and norm.w_q.bias is None
    bf16 = AttentionConfig(n_heads=4, dtype="bfloat16").build(16, layer_idx=0, n_layers=1)
    assert bf16.w_q.weight.dtype == torch.bfloat16


def test_build_per_layer_windows():
    sw = SlidingWindowAttentionConfig(pattern=[4, 8, -1])
    cfg = AttentionConfig(n_heads=2, sliding_window=sw)
    windows = [cfg.build(8, layer_idx=i, n_layers=6).window_size for i in range(6)]
    assert windows == [None, 4, 8, None, 4, None]
    layer1 = cfg.build(8, layer_idx=1, n_layers=6)
    assert layer1.backend.window_size == (3, 0)


@pytest.mark.parametrize("no_global_rope", [None, False, True])
@pytest.mark.parametrize("sliding", [None, (False,), (True,)])
def test_no_global_rope(no_global_rope, sliding):
    rope = RoPEConfig() if no_global_rope is None else RoPEConfig(no_global_rope=no_global_rope)
    sw = None
    if sliding is not None:
        sw = SlidingWindowAttentionConfig(
            pattern=[1024, 2048, -1], force_full_attention_on_first_layer=sliding[0],
            force_full_attention_on_last_layer=False,
        )  # fmt: skip
    cfg = AttentionConfig(n_heads=2, rope=rope, sliding_window=sw)
    for layer in (0, 1, 2, 11):
        attn = cfg.build(8, layer_idx=layer, n_layers=12)
        want = attention_layer_options(
            layer,
            12,
            rope=True,
            no_global_rope=bool(no_global_rope),
            sliding_window=None if sw is None else sw.as_dict(),
        )
        assert (attn.rope is not None) == want["rope"], (layer, sw)
        assert attn.window_size == want["window_size"]


# ----- every configuration error -----------------------------------------------------------------
FUSED_INVALID = dict(
    n_kv_heads=2,
    head_dim=4,
    gate=GateConfig(),
    qk_norm=LayerNormConfig(),
    use_head_qk_norm=True,
)
NORMALIZED_INVALID = dict(
    head_dim=4, bias=True, gate=GateConfig(), clip_qkv=1.0, dropout=0.1, use_head_qk_norm=True
)


@pytest.mark.parametrize("field", list(FUSED_INVALID))
def test_fused_rejects_options(field):
    with pytest.raises(ConfigurationError, match="invalid options for 'fused'"):
        AttentionConfig(name="fused", n_heads=4, **{field: FUSED_INVALID[field]}).build(
            16, layer_idx=0, n_layers=1
        )


@pytest.mark.parametrize("field", list(NORMALIZED_INVALID))
def test_normalized_rejects_options(field):
    cfg = AttentionConfig(name="normalized", n_heads=4, **{field: NORMALIZED_INVALID[field]})
    with pytest.raises(ConfigurationError, match="invalid options for 'normalized'"):
        cfg.build(16, layer_idx=0, n_layers=1)


@pytest.mark.parametrize("name", ["fused", "normalized"])
def test_fused_and_normalized_reject_sliding_window_layers(name):
    sw = SlidingWindowAttentionConfig(pattern=[4], force_full_attention_on_first_layer=False)
    cfg = AttentionConfig(name=name, n_heads=4, sliding_window=sw)
    with pytest.raises(ConfigurationError, match="sliding-window layer"):
        cfg.build(16, layer_idx=0, n_layers=2)
    assert cfg.build(16, layer_idx=1, n_layers=2).rope is None  # the forced global layer builds


def test_rope_variant_must_match_the_module():
    with pytest.raises(ConfigurationError, match="fused RoPE is not compatible"):
        AttentionConfig(n_heads=4, rope=RoPEConfig(name="fused")).build(16, layer_idx=0, n_layers=1)
    with pytest.raises(ConfigurationError, match="fused RoPE is not compatible"):
        AttentionConfig(name="normalized", n_heads=4, rope=RoPEConfig(name="fused")).build(
            16, layer_idx=0, n_layers=1
        )
    with pytest.raises(ConfigurationError, match="name='fused'"):
        AttentionConfig(name="fused", n_heads=4, rope=RoPEConfig()).build(16, layer_idx=0, n_layers=1)
    with pytest.raises(ConfigurationError, match="scaling is not supported"):
        AttentionConfig(n_heads=4, rope=RoPEConfig(name="complex", scaling=ABFRoPEScalingConfig())).build(
            16, layer_idx=0, n_layers=1
        )


def test_head_count_errors():
    with pytest.raises(ConfigurationError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        AttentionConfig(n_heads=6, n_kv_heads=4).build(24, layer_idx=0, n_layers=1)
    with pytest.raises(ConfigurationError, match="d_model=20 is not divisible by n_heads=6; set head_dim"):
        AttentionConfig(n_heads=6).build(20, layer_idx=0, n_layers=1)
    assert AttentionConfig(n_heads=6, head_dim=4).build(20, layer_idx=0, n_layers=1).head_dim == 4
    with pytest.raises(ConfigurationError, match="divisible by n_heads"):
        AttentionConfig(name="fused", n_heads=6).build(20, layer_idx=0, n_layers=1)
    for bad in (dict(n_heads=0), dict(n_heads=4, n_kv_heads=0), dict(n_heads=4, head_dim=-2)):
        with pytest.raises(ConfigurationError, match="must be a positive int"):
            AttentionConfig(**bad).build(16, layer_idx=0, n_layers=1)


def test_window_and_scalar_option_errors():
    with pytest.raises(ConfigurationError, match="window_size=0 is invalid"):
        Attention(d_model=16, n_heads=4, window_size=0)
    with pytest.raises(ConfigurationError, match="window_size=-4 is invalid"):
        Attention(d_model=16, n_heads=4, window_size=-4)
    with pytest.raises(ConfigurationError, match="dropout"):
        AttentionConfig(n_heads=4, dropout=1.0).build(16, layer_idx=0, n_layers=1)
    with pytest.raises(ConfigurationError, match="clip_qkv"):
        AttentionConfig(n_heads=4, clip_qkv=0.0).build(16, layer_idx=0, n_layers=1)
    with pytest.raises(ConfigurationError, match="softmax_scale"):
        Attention(d_model=16, n_heads=4, softmax_scale=-1.0)


def test_backend_option_errors():
    with pytest.raises(ConfigurationError, match="backend='cudnn' is not an attention backend"):
        AttentionConfig(n_heads=4, backend="cudnn")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="use_flash=True conflicts with backend='torch'"):
        AttentionConfig(n_heads=4, use_flash=True, backend="torch").build(16, layer_idx=0, n_layers=1)
    assert (
        AttentionConfig(n_heads=4, use_flash=False).build(16, layer_idx=0, n_layers=1).backend.name == "torch"
    )


@pytest.mark.skipif(is_available("flash_2"), reason="flash_2 is usable here")
def test_explicit_gpu_backend_is_never_silently_replaced(monkeypatch):
    # replaced with a BackendFallbackWarning by default (tests/backends/test_selection_fallback.py);
    # strict selection keeps the error
    monkeypatch.setenv("OLMO_ATTN_STRICT_BACKEND", "1")
    with pytest.raises(BackendUnavailableError, match="flash_2"):
        AttentionConfig(n_heads=4, backend="flash_2").build(16, layer_idx=0, n_layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BackendUnavailableError, match="install"):
            Attention(d_model=16, n_heads=4, use_flash=True)
    assert any(issubclass(w.category, DeprecationWarning) and "use_flash" in str(w.message) for w in caught)


def test_build_wraps_type_errors():
    with pytest.raises(ConfigurationError) as info:
        AttentionConfig(name="normalized", n_heads=4, gate=GateConfig()).build(16, layer_idx=0, n_layers=1)
    assert isinstance(info.value.__cause__, TypeError)


# ----- round trips ----------------------------------------------------------------------------
def _rich_config() -> AttentionConfig:
    return AttentionConfig(
        name="default",
        n_heads=8,
        n_kv_heads=2,
        head_dim=16,
        bias=False,
        gate=GateConfig(granularity="elementwise", full_precision=False),
        rope=RoPEConfig(
            theta=10_000, scaling=StepwiseRoPEScalingConfig(factor=4.0), partial_rotary_factor=0.5
        ),
        clip_qkv=5.0,
        qk_norm=LayerNormConfig(name="qwen_rms", eps=1e-6, bias=False, dtype="bfloat16"),
        dropout=0.05,
        backend="torch",
        dtype="bfloat16",
        sliding_window=SlidingWindowAttentionConfig(
            pattern=[128, -1], force_full_attention_on_last_layer=False
        ),
        use_head_qk_norm=True,
    )


@pytest.mark.parametrize(
    "cfg",
    [
        AttentionConfig(),
        _rich_config(),
        AttentionConfig(name="normalized", rope=RoPEConfig(scaling=YaRNRoPEScalingConfig())),
    ],
)
def test_attention_config_round_trips(cfg):
    assert cfg.type == "attention"
    for data in (
        cfg.as_dict(),
        cfg.as_dict(exclude_none=True),
        cfg.as_dict(json_safe=True),
        cfg.as_config_dict(),
    ):
        assert AttentionConfig.from_dict(data) == cfg
        assert SequenceMixerConfig.from_dict(data) == cfg  # dispatch on "type"
    assert AttentionConfig.from_json(cfg.to_json()) == cfg
    assert AttentionConfig.from_yaml(cfg.to_yaml()) == cfg
    shallow = cfg.as_dict(recurse=False)
    assert shallow["rope"] is cfg.rope  # nested configs kept as objects


def test_config_dict_shape():
    data = _rich_config().as_config_dict()
    # the checkpoint dict names OLMo-core's class (OLMo-core's from_dict reads it); as_dict keeps ours
    assert data["_CLASS_"] == "olmo_core.nn.attention.AttentionConfig" and data["type"] == "attention"
    assert (
        _rich_config().as_dict(include_class_name=True)["_CLASS_"]
        == "olmo_attn.attention.config.AttentionConfig"
    )
    assert data["rope"]["scaling"]["_CLASS_"].endswith("StepwiseRoPEScalingConfig")
    assert data["dtype"] == "bfloat16" and data["backend"] == "torch"
    assert "n_kv_heads" in data and "use_flash" not in data  # None fields are dropped


def test_from_dict_accepts_olmo_core_shape_and_rejects_unknowns():
    data = {
        "_CLASS_": "olmo_core.nn.attention.AttentionConfig",
        "type": "attention",
        "name": "default",
        "n_heads": 8,
        "rope": {"_CLASS_": "olmo_core.nn.rope.RoPEConfig", "theta": 10000,
                 "scaling": {"_CLASS_": "olmo_core.nn.rope.YaRNRoPEScalingConfig", "factor": 2.0}},
        "qk_norm": {"_CLASS_": "olmo_core.nn.layer_norm.LayerNormConfig", "name": "rms"},
        "dtype": "float32",
        # OLMo-core 3.x fields at their disabled values are accepted and dropped
        "scalable_softmax": False, "attention_sinks": False, "qk_norm_per_head_gains": None,
        "mxfp8_projections": None, "use_recompute_qkv_prep": True,
    }  # fmt: skip
    cfg = SequenceMixerConfig.from_dict(data)
    assert cfg == AttentionConfig(
        n_heads=8,
        rope=RoPEConfig(theta=10_000, scaling=YaRNRoPEScalingConfig(factor=2.0)),
        qk_norm=LayerNormConfig(name="rms"),
    )
    with pytest.raises(ConfigurationError, match="attention_sinks=True"):
        AttentionConfig.from_dict({**data, "attention_sinks": True})
    with pytest.raises(ConfigurationError, match="fused_v2"):
        AttentionConfig.from_dict({**data, "name": "fused_v2"})
    with pytest.raises(ConfigurationError, match="unknown field"):
        AttentionConfig.from_dict({**data, "n_query_groups": 2})
    with pytest.raises(ConfigurationError, match="type="):
        AttentionConfig.from_dict({**data, "type": "gated_delta_net"})
    with pytest.raises(ConfigurationError, match="registered types"):
        SequenceMixerConfig.from_dict({"type": "mamba"})
    with pytest.raises(ConfigurationError, match="must be 'attention'"):
        AttentionConfig(type="gdn")


def test_registry_and_torch_dtype_accepted():
    assert SequenceMixerConfig.resolve("attention") is AttentionConfig
    assert AttentionConfig(dtype=torch.bfloat16).dtype == "bfloat16"  # type: ignore[arg-type]
    assert LayerNormConfig(dtype=torch.float16).dtype == "float16"  # type: ignore[arg-type]
