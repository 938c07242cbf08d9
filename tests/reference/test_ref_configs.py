"""reference.configs: the sliding-window table, errors, parameter counts, no_global_rope."""

import pytest

from fixtures import config_cases as fx
from reference.configs import (
    ConfigurationError,
    attention_layer_options,
    attention_num_params,
    gdn_num_params,
    layernorm_num_params,
    window_for_layer,
    window_tuple,
)


@pytest.mark.parametrize("first,last,layer,window", fx.WINDOW_TABLE)
def test_window_table(first, last, layer, window):
    assert window_for_layer(fx.PATTERN, layer, fx.N_LAYERS, first, last) == window


def test_window_errors():
    with pytest.raises(ConfigurationError, match="positive or -1"):
        window_for_layer([0], 0, 12, force_first=False)
    assert not issubclass(ConfigurationError, ValueError)
    assert window_for_layer([0], 0, 12) == -1  # forced layers never look at the pattern
    with pytest.raises(ZeroDivisionError):
        window_for_layer([], 1, 12)
    assert window_tuple(None) == window_tuple(-1) == (-1, -1)
    assert window_tuple(16) == (15, 0)
    with pytest.raises(ConfigurationError):
        window_tuple(0)


@pytest.mark.parametrize("fields,count", fx.ATTN_COUNTS)
def test_attention_num_params(fields, count):
    assert (
        attention_num_params(
            fx.ATTN["d_model"], n_heads=fx.ATTN["n_heads"], n_kv_heads=fx.ATTN["n_kv_heads"], **fields
        )
        == count
    )


@pytest.mark.parametrize("fields,count", fx.GDN_COUNTS)
def test_gdn_num_params(fields, count):
    fields = dict(fields)
    assert gdn_num_params(fields.pop("d_model"), **fields) == count


def test_layernorm_num_params():
    assert layernorm_num_params(8) == 16
    assert layernorm_num_params(8, name="rms") == 16  # RMSNorm has a bias by default
    assert layernorm_num_params(8, name="rms", bias=False) == 8
    assert layernorm_num_params(8, name="l2_norm") == 0
    assert layernorm_num_params(8, elementwise_affine=False) == 0


def test_no_global_rope_layers():
    """no_global_rope: RoPE only on sliding-window layers; without a sliding-window config, on none."""
    assert attention_layer_options(0, 12, rope=True, no_global_rope=True) == {
        "window_size": None,
        "rope": False,
    }
    assert attention_layer_options(0, 12, rope=True, no_global_rope=False)["rope"]
    swa = {"pattern": [1024, 2048, -1], "force_full_attention_on_last_layer": False}
    first_free = dict(swa, force_full_attention_on_first_layer=False)
    assert attention_layer_options(0, 12, rope=True, no_global_rope=True, sliding_window=first_free) == {
        "window_size": 1024,
        "rope": True,
    }
    assert attention_layer_options(0, 12, rope=True, no_global_rope=True, sliding_window=swa) == {
        "window_size": None,
        "rope": False,
    }
    assert not attention_layer_options(3, 12, rope=False, sliding_window=swa)["rope"]
