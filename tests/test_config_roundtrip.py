"""Config dicts travel between olmo_attn and OLMo-core (``ai2-olmo-core==3.0.0``) in both directions.

``olmo_core.nn.attention.AttentionConfig.from_dict(ours.as_config_dict())`` rebuilds the config in
OLMo-core, and ``olmo_attn.AttentionConfig.from_dict(theirs.as_config_dict())`` rebuilds it here,
through JSON text, for hand-written presets and OLMo-core's own model presets. The modules built
from the rebuilt configs, loaded with the same weights, give the same outputs: bit for bit between
our original and our rebuilt module, and within float32 round-off of OLMo-core's module.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

olmo_core = pytest.importorskip("olmo_core")

from olmo_core.nn import attention as oc_attention  # noqa: E402
from olmo_core.nn.transformer import TransformerConfig  # noqa: E402

from olmo_attn import (  # noqa: E402
    AttentionConfig,
    GateConfig,
    LayerNormConfig,
    RoPEConfig,
    SlidingWindowAttentionConfig,
    YaRNRoPEScalingConfig,
)
from olmo_attn.config import OLMO_CORE_CLASS_PATHS  # noqa: E402

B, T = 2, 16

OURS: dict[str, tuple[AttentionConfig, int]] = {  # preset -> (config, d_model)
    "plain": (AttentionConfig(n_heads=4), 32),
    "gqa": (AttentionConfig(n_heads=4, n_kv_heads=2, bias=False), 32),
    "mqa-head-dim": (AttentionConfig(n_heads=4, n_kv_heads=1, head_dim=12), 32),
    "rope-qk-norm": (
        AttentionConfig(
            n_heads=4, n_kv_heads=2, rope=RoPEConfig(theta=500_000), qk_norm=LayerNormConfig(name="rms")
        ),
        32,
    ),
    "rope-head-qk-norm": (
        AttentionConfig(
            n_heads=4,
            rope=RoPEConfig(theta=10_000, scaling=YaRNRoPEScalingConfig(factor=4.0, old_context_len=8)),
            qk_norm=LayerNormConfig(name="rms", eps=1e-6),
            use_head_qk_norm=True,
        ),
        32,
    ),
    "gate-headwise": (AttentionConfig(n_heads=4, gate=GateConfig()), 32),
    "gate-elementwise": (
        AttentionConfig(
            n_heads=4, n_kv_heads=2, gate=GateConfig(granularity="elementwise", full_precision=False)
        ),
        32,
    ),
    "sliding-window": (
        AttentionConfig(
            n_heads=4,
            rope=RoPEConfig(),
            sliding_window=SlidingWindowAttentionConfig(
                pattern=[4, 4, -1], force_full_attention_on_first_layer=False
            ),
        ),
        32,
    ),
    "olmo3-like-flash2": (
        AttentionConfig(
            n_heads=4,
            bias=False,
            rope=RoPEConfig(theta=500_000),
            qk_norm=LayerNormConfig(name="rms", eps=1e-6, bias=False),
            backend="flash_2",
            sliding_window=SlidingWindowAttentionConfig(
                pattern=[5, 5, 5, -1], force_full_attention_on_first_layer=False
            ),
        ),
        32,
    ),
}


def _preset_mixers() -> dict[str, tuple[oc_attention.AttentionConfig, int]]:
    """Attention configs of OLMo-core's model presets (with their d_model)."""
    out = {}
    for name in ("olmo2_1M", "olmo3_14M", "qwen3_0_6B", "gemma3_1B", "qwen3_5_0_8B"):
        model = getattr(TransformerConfig, name)(vocab_size=128)
        blocks = model.block if isinstance(model.block, dict) else {"block": model.block}
        for key, block in blocks.items():
            if isinstance(block.sequence_mixer, oc_attention.AttentionConfig):
                out[f"{name}-{key}"] = (block.sequence_mixer, model.d_model)
    return out


THEIRS = _preset_mixers()


def _through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


def _layers(cfg: AttentionConfig) -> list[int]:
    n = 4
    return [0, n - 1] if cfg.sliding_window is not None else [1]


def _randomise_norms(m: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen)).add_(
                    0.05 * torch.randn(p.shape, generator=gen)
                )


def _outputs_match(
    cfg: AttentionConfig, rebuilt: AttentionConfig, theirs: oc_attention.AttentionConfig, d_model: int
):
    """Modules from ``cfg``, ``rebuilt`` (ours) and ``theirs`` (OLMo-core) with the same weights agree."""
    # a backend this machine may lack is replaced by the automatic choice on every side
    cfg, rebuilt = cfg.replace(backend=None), rebuilt.replace(backend=None)
    theirs = dataclasses.replace(theirs, backend=None)
    for layer in _layers(cfg):
        torch.manual_seed(layer)
        original = cfg.build(d_model, layer_idx=layer, n_layers=4)
        again = rebuilt.build(d_model, layer_idx=layer, n_layers=4)
        oc_module = theirs.build(d_model, layer_idx=layer, n_layers=4)
        assert original.window_size == again.window_size == oc_module.window_size
        _randomise_norms(original, seed=layer + 7)
        again.load_state_dict(original.state_dict(), strict=True)
        oc_module.load_state_dict(original.state_dict(), strict=True)
        x = torch.randn(B, T, d_model, generator=torch.Generator().manual_seed(layer))
        with torch.no_grad():
            y, y_again, y_oc = original(x), again(x), oc_module(x)
        torch.testing.assert_close(y_again, y, rtol=0, atol=0)
        atol = 1e-5 * max(1.0, y_oc.abs().max().item())
        torch.testing.assert_close(y, y_oc, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("preset", list(OURS))
def test_olmo_core_reads_our_config_dict(preset: str) -> None:
    cfg, d_model = OURS[preset]
    data = _through_json(cfg.as_config_dict())
    theirs = oc_attention.AttentionConfig.from_dict(data)
    assert isinstance(theirs, oc_attention.AttentionConfig)
    for f in dataclasses.fields(cfg):  # every field arrives with its value
        ours_value = getattr(cfg, f.name)
        if f.name != "type" and ours_value is not None:
            assert _through_json(_plain(getattr(theirs, f.name))) == _through_json(_plain(ours_value)), f.name
    # and back: OLMo-core's dict of it rebuilds our config exactly
    rebuilt = AttentionConfig.from_dict(_through_json(theirs.as_config_dict()))
    assert rebuilt == cfg
    assert AttentionConfig.from_dict(data) == cfg
    assert cfg.num_params(d_model) == theirs.num_params(d_model)
    _outputs_match(cfg, rebuilt, theirs, d_model)


@pytest.mark.parametrize("preset", list(THEIRS))
def test_we_read_olmo_core_preset_config_dicts(preset: str) -> None:
    theirs, d_model = THEIRS[preset]
    ours = AttentionConfig.from_dict(_through_json(theirs.as_config_dict()))
    assert ours.n_heads == theirs.n_heads and ours.backend == theirs.backend
    assert (ours.sliding_window is None) == (theirs.sliding_window is None)
    # our dict rebuilds OLMo-core's config unchanged
    again = oc_attention.AttentionConfig.from_dict(_through_json(ours.as_config_dict()))
    assert again == theirs
    assert ours.num_params(d_model) == theirs.num_params(d_model)
    _outputs_match(ours, ours, theirs, d_model)


def test_config_dict_names_olmo_core_classes_and_as_dict_keeps_ours() -> None:
    cfg, _ = OURS["rope-head-qk-norm"]
    data = cfg.as_config_dict()
    assert data["_CLASS_"] == "olmo_core.nn.attention.AttentionConfig"
    assert data["rope"]["_CLASS_"] == "olmo_core.nn.rope.RoPEConfig"
    assert data["rope"]["scaling"]["_CLASS_"] == "olmo_core.nn.rope.YaRNRoPEScalingConfig"
    assert data["qk_norm"]["_CLASS_"] == "olmo_core.nn.layer_norm.LayerNormConfig"
    assert cfg.as_dict(include_class_name=True)["_CLASS_"] == "olmo_attn.attention.config.AttentionConfig"
    # every mapped class exists on both sides with the same fields
    import importlib

    for ours_path, theirs_path in OLMO_CORE_CLASS_PATHS.items():
        classes = []
        for path in (ours_path, theirs_path):
            module, _, name = path.rpartition(".")
            classes.append(getattr(importlib.import_module(module), name))
        ours_fields = {f.name for f in dataclasses.fields(classes[0])} - {"type"}
        assert ours_fields <= {f.name for f in dataclasses.fields(classes[1])}, ours_path


def _plain(value):
    """Config / enum values as JSON data (for comparing a field across the two libraries)."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None and not f.name.startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return str(value) if isinstance(value, str) else value


def test_dicts_naming_the_package_level_class_path_still_load():
    """Dicts written before the configs moved into ``olmo_attn.attention.config`` name
    ``olmo_attn.attention.AttentionConfig``; the package re-exports it, so they still load."""
    d = AttentionConfig(n_heads=4, n_kv_heads=2).as_dict(include_class_name=True)
    d["_CLASS_"] = "olmo_attn.attention.AttentionConfig"
    assert AttentionConfig.from_dict(d) == AttentionConfig(n_heads=4, n_kv_heads=2)
