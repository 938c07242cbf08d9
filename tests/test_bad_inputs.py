"""Bad configuration inputs: each raises a typed error whose message names the field."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from olmo_attn.attention import AttentionConfig, GateConfig
from olmo_attn.config import DType
from olmo_attn.cp.styles import RingContextParallelStyle
from olmo_attn.exceptions import ConfigurationError, ConfigValueError, InvalidEnumValueError
from olmo_attn.norm import LayerNormConfig
from olmo_attn.recurrent.gated_deltanet import GatedDeltaNetConfig
from olmo_attn.rope import (
    ABFRoPEScalingConfig,
    PIRoPEScalingConfig,
    RoPEConfig,
    StepwiseRoPEScalingConfig,
    YaRNRoPEScalingConfig,
)

# (id, builder, exception type, substrings the message must contain)
ENUM_CASES: list[tuple[str, Callable[[], Any], str, list[str]]] = [
    ("gate-granularity", lambda: GateConfig(granularity="headwize"), "granularity", ["headwise"]),
    ("attn-name", lambda: AttentionConfig(name="flashy"), "name", ["default", "fused"]),
    ("attn-dtype", lambda: AttentionConfig(dtype="float8"), "dtype", ["bfloat16"]),
    ("rope-name", lambda: RoPEConfig(name="rotary"), "name", ["default", "complex"]),
    ("norm-name", lambda: LayerNormConfig(name="rmsnorm"), "name", ["rms", "l2_norm"]),
    ("norm-dtype", lambda: LayerNormConfig(dtype="half"), "dtype", ["float16"]),
    ("gdn-backend", lambda: GatedDeltaNetConfig(backend="flax"), "backend", ["triton", "torch"]),
    ("gdn-dtype", lambda: GatedDeltaNetConfig(dtype="fp8"), "dtype", ["float32"]),
    (
        "nested-gate",
        lambda: AttentionConfig(gate={"granularity": "rowwise"}),
        "gate",
        ["granularity", "headwise"],
    ),
    (
        "from-dict-gate",
        lambda: AttentionConfig.from_dict({"gate": {"granularity": "rowwise"}}),
        "gate",
        ["granularity"],
    ),
    ("from-dict-name", lambda: AttentionConfig.from_dict({"name": "flashy"}), "name", ["normalized"]),
    ("nested-rope", lambda: AttentionConfig(rope={"name": "rotary"}), "rope", ["RoPEConfig.name"]),
    (
        "nested-qk-norm",
        lambda: AttentionConfig(qk_norm={"name": "rmsnorm"}),
        "qk_norm",
        ["LayerNormConfig.name"],
    ),
    ("rope-from-dict", lambda: RoPEConfig.from_dict({"name": "rope"}), "name", ["fused"]),
    ("norm-from-dict", lambda: LayerNormConfig.from_dict({"name": "layernorm"}), "name", ["qwen_rms"]),
    ("gdn-from-dict", lambda: GatedDeltaNetConfig.from_dict({"backend": "jax"}), "backend", ["fla"]),
    ("dtype-direct", lambda: DType("float8"), "float8", ["float32", "bfloat16"]),
]


@pytest.mark.parametrize(
    ("builder", "field", "valid"), [c[1:] for c in ENUM_CASES], ids=[c[0] for c in ENUM_CASES]
)
def test_enum_typo_is_typed_and_lists_valid_values(
    builder: Callable[[], Any], field: str, valid: list[str]
) -> None:
    with pytest.raises(InvalidEnumValueError) as info:
        builder()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigurationError)
    message = str(info.value)
    assert field in message
    for v in valid:
        assert v in message


OTHER_ENUM_CASES: list[tuple[str, Callable[[], Any], list[str]]] = [
    ("attn-backend", lambda: AttentionConfig(backend="flashy"), ["backend", "flash_2", "torch"]),
    ("ring-balancer", lambda: RingContextParallelStyle(load_balancer="zz"), ["load_balancer", "zig_zag"]),
    ("ring-head-stride", lambda: RingContextParallelStyle(head_stride=0), ["head_stride"]),
]


@pytest.mark.parametrize(
    ("builder", "needles"), [c[1:] for c in OTHER_ENUM_CASES], ids=[c[0] for c in OTHER_ENUM_CASES]
)
def test_other_config_errors_name_the_field(builder: Callable[[], Any], needles: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        builder()
    for n in needles:
        assert n in str(info.value)


NUMERIC_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("yarn-factor-0", lambda: YaRNRoPEScalingConfig(factor=0), "factor"),
    ("yarn-factor-neg", lambda: YaRNRoPEScalingConfig(factor=-2.0), "factor"),
    ("yarn-factor-inf", lambda: YaRNRoPEScalingConfig(factor=math.inf), "factor"),
    ("yarn-beta-fast-0", lambda: YaRNRoPEScalingConfig(beta_fast=0), "beta_fast"),
    ("yarn-beta-slow-0", lambda: YaRNRoPEScalingConfig(beta_slow=0), "beta_slow"),
    ("yarn-old-len-0", lambda: YaRNRoPEScalingConfig(old_context_len=0), "old_context_len"),
    ("pi-factor-0", lambda: PIRoPEScalingConfig(factor=0), "factor"),
    ("pi-factor-nan", lambda: PIRoPEScalingConfig(factor=math.nan), "factor"),
    ("pi-rescale-0", lambda: PIRoPEScalingConfig(attention_rescale_factor=0.0), "attention_rescale_factor"),
    ("stepwise-factor-0", lambda: StepwiseRoPEScalingConfig(factor=0), "factor"),
    ("stepwise-old-len", lambda: StepwiseRoPEScalingConfig(old_context_len=-1), "old_context_len"),
    ("stepwise-low-prop", lambda: StepwiseRoPEScalingConfig(low_freq_proportion=1.0), "low_freq_proportion"),
    (
        "stepwise-high-prop",
        lambda: StepwiseRoPEScalingConfig(high_freq_proportion=0.0),
        "high_freq_proportion",
    ),
    ("abf-theta-0", lambda: ABFRoPEScalingConfig(new_theta=0), "new_theta"),
    (
        "abf-rescale-neg",
        lambda: ABFRoPEScalingConfig(attention_rescale_factor=-1.0),
        "attention_rescale_factor",
    ),
    (
        "yarn-from-dict",
        lambda: RoPEConfig.from_dict({"scaling": {"_CLASS_": "YaRNRoPEScalingConfig", "factor": 0}}),
        "factor",
    ),
]


@pytest.mark.parametrize(
    ("builder", "field"), [c[1:] for c in NUMERIC_CASES], ids=[c[0] for c in NUMERIC_CASES]
)
def test_bad_scaling_numbers_name_field(builder: Callable[[], Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        builder()
    assert field in str(info.value)


def test_numeric_errors_are_value_errors() -> None:
    with pytest.raises(ConfigValueError):
        PIRoPEScalingConfig(factor=0)
    with pytest.raises(ValueError):
        YaRNRoPEScalingConfig(beta_fast=0)


def test_valid_configs_still_build() -> None:
    assert AttentionConfig(gate={"granularity": "elementwise"}).gate == GateConfig(granularity="elementwise")
    assert RoPEConfig(name="fused").name == "fused"
    YaRNRoPEScalingConfig()
    PIRoPEScalingConfig()
    StepwiseRoPEScalingConfig()
    ABFRoPEScalingConfig()
