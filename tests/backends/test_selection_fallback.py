"""Backend selection: a named backend that cannot run here falls back (with a warning) to the
automatic choice unless strict selection is on; head dims only the torch backend computes; one INFO
log line per layer naming the chosen backend and why."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from test_flash_doubles import Recorder, fake_cuda, install_flash4

from olmo_attn import Attention, AttentionConfig, hardware
from olmo_attn.backends import capabilities as caps
from olmo_attn.backends import registry
from olmo_attn.backends.capabilities import Feature
from olmo_attn.backends.registry import (
    STRICT_BACKEND_ENV,
    BackendChoice,
    BackendFallbackWarning,
    choose_backend,
    select_backend,
)
from olmo_attn.exceptions import BackendUnavailableError, UnsupportedFeatureError

# flash_2 cannot run on this CPU machine (no CUDA); the tests below are about that situation
pytestmark = pytest.mark.skipif(caps.is_available("flash_2"), reason="flash_2 runs here")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(STRICT_BACKEND_ENV, raising=False)
    hardware.clear_caches()
    registry.reload_preferences()
    yield
    hardware.clear_caches()
    registry.reload_preferences()


@pytest.fixture
def hopper_with_fa4(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A fake sm_90 GPU with flash-attn-4 installed (and verified there), flash-attn 2 missing."""
    fake_cuda(monkeypatch, (9, 0), "Fake H100")
    install_flash4(monkeypatch, Recorder())
    path = tmp_path / "preference.json"
    path.write_text('{"sm_90": {"causal": ["flash_4", "torch"], "sliding_window": ["flash_4", "torch"]}}')
    monkeypatch.setattr(registry, "PREFERENCE_FILE", path)
    registry.reload_preferences()
    assert caps.is_available("flash_4") and not caps.is_available("flash_2")


def _reference(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of ``m`` (no RoPE / norms) computed densely in float64."""
    B, T, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    x64 = x.double()

    def proj(lin: torch.nn.Linear, heads: int) -> torch.Tensor:
        y = x64 @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0)
        return y.view(B, T, heads, D).transpose(1, 2)  # [B, heads, T, D]

    q, k, v = proj(m.w_q, H), proj(m.w_k, Hkv), proj(m.w_v, Hkv)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
    return o @ m.w_out.weight.double().T + (m.w_out.bias.double() if m.w_out.bias is not None else 0)


# ----- registry level -------------------------------------------------------------------------------
def test_named_backend_missing_here_warns_and_falls_back_to_the_automatic_choice() -> None:
    with pytest.warns(BackendFallbackWarning) as record:
        choice = select_backend("flash_2", [Feature.causal], device="cpu", head_dim=64)
    assert choice == BackendChoice(name="torch", auto=True, requested="flash_2", reason=choice.reason)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "'flash_2' was requested but cannot run here" in msg
    assert caps.unavailable_reason("flash_2", "cpu") in msg  # the reason
    assert "Using backend 'torch' instead" in msg and STRICT_BACKEND_ENV in msg
    assert record[0].filename == __file__  # points at the caller, not at olmo_attn's internals
    assert "in place of unavailable 'flash_2'" in choice.reason


def test_strict_selection_keeps_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        BackendUnavailableError, match=rf"'flash_2' is unavailable: .*unset {STRICT_BACKEND_ENV}"
    ):
        select_backend("flash_2", [Feature.causal], device="cpu", strict=True)
    monkeypatch.setenv(STRICT_BACKEND_ENV, "1")
    with pytest.raises(BackendUnavailableError, match="'flash_2' is unavailable"):
        select_backend("flash_2", [Feature.causal], device="cpu")
    # strict=False overrides the environment; "0" means off
    with pytest.warns(BackendFallbackWarning):
        assert select_backend("flash_2", device="cpu", strict=False).name == "torch"
    monkeypatch.setenv(STRICT_BACKEND_ENV, "0")
    with pytest.warns(BackendFallbackWarning):
        assert select_backend("flash_2", device="cpu").name == "torch"


def test_available_named_backend_is_used_and_checked() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend("torch", [Feature.sliding_window], device="cpu", head_dim=288) == BackendChoice(
            name="torch", auto=False, requested="torch", reason="requested"
        )
    with pytest.raises(ValueError, match="unknown attention backend 'flash_5'"):
        select_backend("flash_5")


def test_package_missing_on_a_gpu_falls_back_to_the_fastest_that_runs(hopper_with_fa4) -> None:
    with pytest.warns(
        BackendFallbackWarning, match=r"'flash_2'.*flash_attn\.flash_attn_interface not installed"
    ):
        choice = select_backend("flash_2", [Feature.causal], dtype=torch.bfloat16, head_dim=128)
    assert (choice.name, choice.auto) == ("flash_4", True)
    # the fallback honours what the layer needs: a head dim flash_4 refuses goes to torch
    with pytest.warns(BackendFallbackWarning, match="Using backend 'torch'"):
        assert select_backend("flash_2", [Feature.causal], dtype=torch.bfloat16, head_dim=288).name == "torch"


def test_named_backend_that_runs_but_lacks_a_feature_is_an_error_not_a_fallback(hopper_with_fa4) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnsupportedFeatureError, match="'flash_4' does not support dropout"):
            select_backend("flash_4", [Feature.causal, Feature.dropout])
        with pytest.raises(UnsupportedFeatureError, match="head_dim=288"):
            select_backend("flash_4", [Feature.causal], head_dim=288)


# ----- head dims only the torch backend computes ---------------------------------------------------
def test_torch_takes_any_head_dim_in_the_table() -> None:
    spec = caps.get_spec("torch")
    assert all(spec.supports_head_dim(d) for d in (1, 7, 288, 320, 512, 1000))
    assert spec.head_dim_text() == "any"
    assert caps.get_spec("flash_4").head_dim_text() == "≤ 256, multiple of 8"
    assert not caps.get_spec("flash_4").supports_head_dim(288)
    for name in ("flash_2", "flash_3", "flash_4", "te"):
        assert caps.get_spec(name).head_dim_max == 256  # the flash kernels' limit is unchanged


def test_automatic_choice_passes_over_flash_for_head_dim_288(hopper_with_fa4, caplog) -> None:
    assert choose_backend([Feature.causal], dtype=torch.bfloat16, head_dim=128) == "flash_4"
    with caplog.at_level(logging.INFO, logger="olmo_attn"):
        assert choose_backend([Feature.causal], dtype=torch.bfloat16, head_dim=288) == "torch"
    (rec,) = [r for r in caplog.records if r.name == "olmo_attn"]
    assert "'torch' chosen automatically" in rec.getMessage()
    assert "passed over flash_4: head_dim=288 not supported (needs ≤ 256, multiple of 8)" in rec.getMessage()


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_gemma3_like_head_dim_288_builds_with_backend_none_and_computes_the_right_result(n_kv_heads) -> None:
    torch.manual_seed(0)
    auto = Attention(d_model=64, n_heads=2, n_kv_heads=n_kv_heads, head_dim=288, backend=None)
    forced = Attention(d_model=64, n_heads=2, n_kv_heads=n_kv_heads, head_dim=288, backend="torch")
    assert auto.backend.name == "torch"
    forced.load_state_dict(auto.state_dict())
    x = torch.randn(2, 9, 64)
    y = auto(x)
    torch.testing.assert_close(y, forced(x), rtol=0, atol=0)
    torch.testing.assert_close(y.double(), _reference(auto, x), rtol=1e-5, atol=1e-6)


# ----- one INFO line per layer ---------------------------------------------------------------------
def test_one_info_line_per_layer_at_build_and_none_per_forward(caplog) -> None:
    cfg = AttentionConfig(n_heads=4)
    with caplog.at_level(logging.INFO, logger="olmo_attn"):
        layers = [cfg.build(32, layer_idx=i, n_layers=3) for i in range(3)]
        built = [r for r in caplog.records if r.name == "olmo_attn"]
        caplog.clear()
        x = torch.randn(1, 5, 32)
        for m in layers:
            m(x)
            m(x)
        assert [r for r in caplog.records if r.name == "olmo_attn"] == []
    assert len(built) == 3
    for r in built:
        assert r.levelno == logging.INFO
        msg = r.getMessage()
        assert msg.startswith("attention backend 'torch' chosen automatically (features=[], cpu (cpu)")
        assert "head_dim=8" in msg and "no other backend has measured timings on cpu" in msg


# ----- module level: the modules build through select_backend ----------------------------------


def test_module_with_unavailable_named_backend_warns_and_runs_the_automatic_choice() -> None:
    torch.manual_seed(0)
    with pytest.warns(BackendFallbackWarning, match="'flash_2' was requested") as record:
        layer = AttentionConfig(n_heads=4, n_kv_heads=2, backend="flash_2").build(32, layer_idx=0, n_layers=1)
    assert record[0].filename == __file__
    assert layer.backend.name == "torch" and layer._backend_auto
    forced = AttentionConfig(n_heads=4, n_kv_heads=2, backend="torch").build(32, layer_idx=0, n_layers=1)
    forced.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), forced(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_module_strict_selection_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STRICT_BACKEND_ENV, "1")
    with pytest.raises(BackendUnavailableError, match="'flash_2' is unavailable"):
        AttentionConfig(n_heads=4, backend="flash_2").build(32, layer_idx=0, n_layers=1)
    with (
        pytest.raises(BackendUnavailableError, match="'flash_2' is unavailable"),
        pytest.warns(DeprecationWarning, match="use_flash"),
    ):
        Attention(d_model=32, n_heads=4, use_flash=True)
