"""``GatedDeltaNetConfig`` / ``GatedDeltaNet``: config, parameters, forward/backward against the
float64 reference layer, decoding, document isolation, initialisation, CP/TP refusals, dispatch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gdn_testing import lengths_to_cu, rel_rms

from olmo_attn.exceptions import BackendUnavailableError, ConfigurationError, UnsupportedFeatureError
from olmo_attn.mixer import SequenceMixerConfig
from olmo_attn.recurrent import GatedDeltaNet, GatedDeltaNetConfig, GDNCache
from olmo_attn.recurrent import fla as fla_mod
from reference import twins
from reference.configs import gdn_num_params

# ------------------------------------------------------------------------------------------ config

NUM_PARAM_CONFIGS = [
    {"n_heads": 8},
    {"n_heads": 8, "n_v_heads": 16},
    {"n_heads": 8, "head_dim": 32},
    {"n_heads": 8, "expand_v": 1.0},
    {"n_heads": 8, "conv_size": 8, "conv_bias": True},
    {"n_heads": 8, "allow_neg_eigval": False},
    {"n_heads": 4, "n_v_heads": 8, "head_dim": 48, "expand_v": 1.5, "conv_bias": True},
]


@pytest.mark.parametrize("kw", NUM_PARAM_CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_num_params_matches_built_module_on_meta(kw):
    cfg = GatedDeltaNetConfig(**kw)
    module = cfg.build(512, layer_idx=0, n_layers=1, init_device="meta")
    actual = sum(p.numel() for p in module.parameters())
    assert cfg.num_params(512) == actual == gdn_num_params(512, **kw)
    assert all(p.device.type == "meta" for p in module.parameters())


def test_state_dict_keys_and_shapes_are_olmo_cores():
    m = GatedDeltaNet(d_model=64, n_heads=2, n_v_heads=4, head_dim=16, expand_v=1.5, conv_bias=True)
    K, V, HV, Dv = 32, 96, 4, 24
    expected = {
        "w_q.weight": (K, 64),
        "w_k.weight": (K, 64),
        "w_v.weight": (V, 64),
        "w_a.weight": (HV, 64),
        "w_b.weight": (HV, 64),
        "A_log": (HV,),
        "dt_bias": (HV,),
        "q_conv1d.weight": (K, 1, 4),
        "q_conv1d.bias": (K,),
        "k_conv1d.weight": (K, 1, 4),
        "k_conv1d.bias": (K,),
        "v_conv1d.weight": (V, 1, 4),
        "v_conv1d.bias": (V,),
        "w_g.weight": (V, 64),
        "o_norm.weight": (Dv,),
        "w_out.weight": (64, V),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert (m.head_k_dim, m.head_v_dim, m.key_dim, m.value_dim) == (16, 24, K, V)
    assert m.cp_enabled is False
    assert m.q_conv1d.activation == "silu"
    # an OLMo-core state dict (float32 o_norm, as OLMo-core always stores it) loads into bf16
    mb = GatedDeltaNet(
        d_model=64, n_heads=2, n_v_heads=4, head_dim=16, expand_v=1.5, conv_bias=True, dtype=torch.bfloat16
    )
    assert {p.dtype for p in mb.parameters()} == {torch.bfloat16}  # o_norm follows dtype here
    mb.load_state_dict(m.state_dict())


def test_config_round_trips():
    cfg = GatedDeltaNetConfig(
        n_heads=4, n_v_heads=8, head_dim=32, expand_v=1.5, conv_bias=True, dtype="bfloat16"
    )
    d = cfg.as_dict(json_safe=True)
    assert d["type"] == "gated_delta_net" and d["dtype"] == "bfloat16"
    assert SequenceMixerConfig.from_dict(d) == cfg
    assert GatedDeltaNetConfig.from_dict(d) == cfg
    assert GatedDeltaNetConfig.from_json(cfg.to_json()) == cfg
    # OLMo-core's checkpoint shape: a _CLASS_ key, no None fields
    olmo = {
        "_CLASS_": "olmo_core.nn.attention.recurrent.GatedDeltaNetConfig",
        "n_heads": 4,
        "dtype": "bfloat16",
    }
    c2 = GatedDeltaNetConfig.from_dict(olmo)
    assert c2.n_heads == 4 and c2.dtype == "bfloat16" and c2.n_v_heads is None
    assert json.loads(json.dumps(cfg.as_config_dict()))["_CLASS_"].endswith("GatedDeltaNetConfig")
    m = c2.build(128, layer_idx=3, n_layers=8)
    assert m.w_q.weight.dtype == torch.bfloat16
    assert GatedDeltaNetConfig(dtype=torch.bfloat16).dtype == "bfloat16"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_heads": 4, "n_v_heads": 6}, "multiple of n_heads"),
        ({"n_heads": 4, "n_v_heads": 2}, "multiple of n_heads"),
        ({"n_heads": 4, "head_dim": 10, "expand_v": 0.55}, "not an integer value head dim"),
        ({"n_heads": 0}, "n_heads must be a positive int"),
        ({"n_heads": 4, "conv_size": 0}, "conv_size must be a positive int"),
        ({"n_heads": 128}, "head_dim must be a positive int"),
    ],
)
def test_configuration_errors(kw, match):
    with pytest.raises(ConfigurationError, match=match):
        GatedDeltaNetConfig(**kw).build(64, layer_idx=0, n_layers=1)
    with pytest.raises(ConfigurationError, match=match):
        GatedDeltaNetConfig(**kw).num_params(64)


# ------------------------------------------------------------------------------------ numerics


def _module(seed=0, dtype=torch.float64, **kw) -> GatedDeltaNet:
    torch.manual_seed(seed)
    args = {"d_model": 48, "n_heads": 2} | kw
    m = GatedDeltaNet(**args).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    m.init_weights(
        init_method="normal", d_model=args["d_model"], block_idx=0, num_blocks=2, std=0.2, generator=gen
    )
    return m


def _ref_kwargs(m: GatedDeltaNet) -> dict:
    return {
        "n_heads": m.n_heads,
        "n_v_heads": m.n_v_heads,
        "head_dim": m.head_k_dim,
        "expand_v": m.expand_v,
        "allow_neg_eigval": m.allow_neg_eigval,
        "conv_size": m.conv_size,
        "norm_eps": m.norm_eps,
    }


MODULE_CASES = [
    pytest.param({}, None, 2, 37, id="default"),
    pytest.param({"n_v_heads": 4, "conv_bias": True}, None, 2, 37, id="gva-bias"),
    pytest.param({"expand_v": 1.0, "allow_neg_eigval": False, "conv_size": 2}, None, 1, 50, id="ev1-posbeta"),
    pytest.param({"n_v_heads": 4, "head_dim": 8}, [10, 1, 26], 1, 37, id="docs"),
    pytest.param({"n_v_heads": 4}, [20, 30, 24], 2, 37, id="docs-batch2-cross-rows"),
]


@pytest.mark.parametrize(("kw", "docs", "B", "T"), MODULE_CASES)
def test_module_float64_matches_reference_forward_and_backward(kw, docs, B, T):
    m = _module(**kw)
    cu = lengths_to_cu(docs) if docs is not None else None
    x = torch.randn(B, T, 48, dtype=torch.float64, requires_grad=True)
    y = m(x, cu_doc_lens=cu, max_doc_len=99, pos_sin=None)  # attention-only kwargs are ignored
    weights = {k: v.detach().clone().requires_grad_() for k, v in m.state_dict().items()}
    xr = x.detach().clone().requires_grad_()
    if cu is None:
        r = twins.gdn_layer_forward(weights, xr, **_ref_kwargs(m))
    else:  # documents segment the flattened batch: the reference's one packed row
        r = twins.gdn_layer_forward(
            weights, xr.reshape(1, B * T, 48), **_ref_kwargs(m), cu_doc_lens=cu.numpy()
        ).reshape(B, T, 48)
    assert y.shape == x.shape
    assert rel_rms(y, r) < 1e-12
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (r * dy).sum().backward()
    assert rel_rms(x.grad, xr.grad) < 1e-11
    for name, p in m.named_parameters():
        assert rel_rms(p.grad, weights[name].grad) < 1e-10, name


@pytest.mark.parametrize("docs", [None, [20, 0, 44]])
def test_module_bf16_within_budget(docs):
    """bf16 parameters and activations against the float64 reference with the same (bf16) weights."""
    m64 = _module(n_v_heads=4)
    m = _module(n_v_heads=4).to(torch.bfloat16)
    cu = lengths_to_cu(docs) if docs is not None else None
    x = torch.randn(1, 64, 48, dtype=torch.bfloat16)
    y = m(x, cu_doc_lens=cu)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    r = m64(x.double(), cu_doc_lens=cu)
    weights = {k: v.double() for k, v in m.state_dict().items()}
    r2 = twins.gdn_layer_forward(
        weights, x.double(), **_ref_kwargs(m), cu_doc_lens=None if cu is None else cu.numpy()
    )
    assert rel_rms(r, r2) < 1e-12
    assert y.dtype == torch.bfloat16
    assert rel_rms(y, r2) < 2e-2  # five bf16 roundings (projections, conv, kernel, norm, w_out)


def test_fresh_module_is_usable_before_init_weights():
    m = GatedDeltaNet(d_model=32, n_heads=2)
    assert torch.isfinite(m.A_log).all() and torch.isfinite(m.dt_bias).all()
    y = m(torch.randn(2, 9, 32))
    assert torch.isfinite(y).all()


def test_document_isolation_module():
    lens = [11, 20, 9]
    cu = lengths_to_cu(lens)
    m = _module(dtype=torch.float32, n_v_heads=4)
    x1 = torch.randn(1, 40, 48, requires_grad=True)
    x2 = x1.detach().clone()
    x2[:, 11:31] += torch.randn(1, 20, 48)
    x2.requires_grad_()
    y1, y2 = m(x1, cu_doc_lens=cu), m(x2, cu_doc_lens=cu)
    y1.square().sum().backward()
    y2.square().sum().backward()
    keep = torch.ones(40, dtype=torch.bool)
    keep[11:31] = False
    assert torch.equal(y1[:, keep], y2[:, keep])
    assert torch.equal(x1.grad[:, keep], x2.grad[:, keep])
    assert not torch.equal(y1[:, 11:31], y2[:, 11:31])


# ------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("dtype", "kw", "prefill"),
    [
        (torch.float64, {"n_v_heads": 4, "conv_bias": True}, 17),
        (torch.float64, {"conv_size": 1}, 5),
        (torch.float64, {"conv_size": 3}, 0),
        (torch.float32, {"n_v_heads": 4}, 1),
    ],
)
def test_decode_equals_forward(dtype, kw, prefill):
    m = _module(dtype=dtype, **kw)
    x = torch.randn(3, 30, 48, dtype=dtype)
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        outs = [m(x[:, :prefill], cache=cache)] if prefill else []
        for t in range(prefill, 30):
            outs.append(m(x[:, t : t + 1], cache=cache))
        dec = torch.cat(outs, dim=1)
    assert cache.seqlen == 30
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_rms(dec, full) < tol
    # the cache holds exactly the chunked kernel's final state
    cache2 = m.init_cache(3, dtype=cache.state.dtype)
    with torch.no_grad():
        m(x, cache=cache2)
    assert rel_rms(cache.state, cache2.state) < tol
    cache.reset()
    assert cache.seqlen == 0 and not cache.state.any()


def test_decode_steps_are_in_place_and_errors():
    m = _module(dtype=torch.float32)
    cache = m.init_cache(2)
    assert isinstance(cache, GDNCache) and cache.state.shape == (2, 2, 24, 48)
    assert cache.conv_q.shape == (2, 48, 3) and cache.conv_v.shape == (2, 96, 3)
    ptr = cache.state.data_ptr()
    with torch.no_grad():
        m(torch.randn(2, 1, 48), cache=cache)
    assert cache.state.data_ptr() == ptr and cache.state.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot be combined with a decoding cache"):
        m(torch.randn(2, 4, 48), cu_doc_lens=lengths_to_cu([4, 4]), cache=cache)
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        m(torch.randn(3, 1, 48), cache=cache)


# -------------------------------------------------------------------------------------- inputs


def test_forward_input_errors():
    m = _module(dtype=torch.float32)
    x = torch.randn(2, 8, 48)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 8, 40))
    with pytest.raises(TypeError, match="cu_doc_lens must be an int32"):
        m(x, cu_doc_lens=torch.tensor([0.0, 16.0]))
    with pytest.raises(ValueError, match="must equal the number of flattened tokens"):
        m(x, cu_doc_lens=torch.tensor([0, 8], dtype=torch.int32))
    y64 = m(x, cu_doc_lens=torch.tensor([0, 8, 16], dtype=torch.int64))  # int64 accepted, as in fla
    torch.testing.assert_close(y64, m(x), rtol=1e-6, atol=1e-6)  # one document per row == no documents


# --------------------------------------------------------------------------------------- init


@pytest.mark.parametrize(
    ("method", "out_std"),
    [
        ("normal", lambda std, d, i, n: std),
        ("llama", lambda std, d, i, n: std / math.sqrt(2 * n)),
        ("llama_depth", lambda std, d, i, n: std / math.sqrt(2 * (i + 1))),
        ("normalized", lambda std, d, i, n: d**-0.5 / math.sqrt(2 * n)),
    ],
)
def test_init_weights_statistics(method, out_std):
    d, HV = 256, 64
    m = GatedDeltaNet(d_model=d, n_heads=16, n_v_heads=HV, conv_bias=True)
    with torch.no_grad():
        m.q_conv1d.bias.fill_(1.0)
    gen = torch.Generator().manual_seed(0)
    m.init_weights(init_method=method, d_model=d, block_idx=2, num_blocks=6, std=0.02, generator=gen)
    std = d**-0.5 if method == "normalized" else 0.02
    # truncated at +-3 std: the std of the draw is 0.9866 std
    for w in (m.w_q.weight, m.w_k.weight, m.w_v.weight, m.w_g.weight, m.v_conv1d.weight):
        assert abs(w.std().item() / (0.9866 * std) - 1) < 0.05
        assert w.abs().max() <= 3 * std + 1e-7
    s_out = out_std(0.02, d, 2, 6)
    assert abs(m.w_out.weight.std().item() / (0.9866 * s_out) - 1) < 0.05
    assert m.w_out.weight.abs().max() <= 3 * s_out + 1e-7
    assert not m.q_conv1d.bias.any()
    A = m.A_log.exp()
    assert (A > 0).all() and (A <= 16).all() and A.std() > 2  # U(0, 16) over 64 heads
    dt = torch.nn.functional.softplus(m.dt_bias.double())
    assert (dt >= 1e-3 - 1e-9).all() and (dt <= 0.1 + 1e-9).all()
    assert torch.equal(m.o_norm.weight, torch.ones(32))
    m2 = GatedDeltaNet(d_model=d, n_heads=16, n_v_heads=HV, conv_bias=True)
    m2.init_weights(
        init_method=method, d_model=d, block_idx=2, num_blocks=6, generator=torch.Generator().manual_seed(0)
    )
    for (n1, p1), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_init_weights_refusals():
    m = GatedDeltaNet(d_model=32, n_heads=2)
    with pytest.raises(NotImplementedError, match="fan_in"):
        m.init_weights(init_method="fan_in", d_model=32, block_idx=0, num_blocks=1)
    with pytest.raises(ValueError, match="unknown"):
        m.init_weights(init_method="xavier", d_model=32, block_idx=0, num_blocks=1)


# -------------------------------------------------------------------------------------- flops


def test_num_flops_per_token_counts_forward_and_backward():
    m = GatedDeltaNet(d_model=256, n_heads=2, init_device="meta")
    K, V, HV, Dk, Dv = 256, 512, 2, 128, 256
    lin = 2 * 256 * K + 2 * 256 * V + V * 256 + 2 * 256 * HV
    fwd = 2 * lin + 2 * 4 * (2 * K + V) + 8 * HV * Dk * Dv
    assert m.num_flops_per_token(8192, forward_only=True) == fwd  # OLMo-core's number
    assert m.num_flops_per_token(8192) == 3 * fwd == m.num_flops_per_token(16)
    attention = pytest.importorskip("olmo_attn.attention")
    att = attention.Attention(d_model=256, n_heads=2, init_device="meta")
    assert 0 < m.num_flops_per_token(8192) < att.num_flops_per_token(8192)


# --------------------------------------------------------------------------------- parallelism


class _FakeMesh:
    def __init__(self, size: int, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank

    def get_group(self):
        return None


def test_parallelism_refusals():
    m = GatedDeltaNet(d_model=64, n_heads=4, n_v_heads=8)
    with pytest.raises(NotImplementedError, match="tensor parallelism"):
        m.apply_tp(None)
    with pytest.raises(NotImplementedError, match="ring context parallelism"):
        m.apply_cp(_FakeMesh(2), ring=object())
    with pytest.raises(ValueError, match="uly"):
        m.apply_cp(_FakeMesh(2))
    with pytest.raises(ConfigurationError, match="n_heads=4 is not a multiple of 3"):
        m.apply_cp(_FakeMesh(3), uly=object())
    m.apply_cp(_FakeMesh(1), uly=object())
    assert not m.cp_enabled  # W == 1 is a no-op
    m.apply_cp(_FakeMesh(2, rank=1), uly=object())
    assert (
        m.cp_enabled and m.q_conv1d.cp_channels == slice(32, 64) and m.v_conv1d.cp_channels == slice(128, 256)
    )
    with pytest.raises(ValueError, match="context parallelism"):
        m(torch.randn(1, 2, 64), cache=m.init_cache(1))


# ------------------------------------------------------------------------------------ dispatch


def test_backend_dispatch(monkeypatch):
    m = GatedDeltaNet(d_model=32, n_heads=2)
    x = torch.randn(1, 4, 32)
    if not fla_mod.fla_available():
        assert m._choose(x, needs_grad=True) == (False, False)  # auto: ours
        m.backend = "fla"
        with pytest.raises(BackendUnavailableError, match="fla-core"):
            m(x)
    # fla present but its backward refused on this GPU: ours for training, fla's for inference
    monkeypatch.setattr(fla_mod, "fla_available", lambda: True)
    monkeypatch.setattr(
        fla_mod,
        "fla_kernel_usable",
        lambda device, dtype, *, backward: (False, "refused") if backward else (True, None),
    )
    m.backend = "auto"
    assert m._choose(x, needs_grad=True) == (False, True)
    assert m._choose(x, needs_grad=False) == (True, True)
    m.backend = "fla"
    with pytest.raises(UnsupportedFeatureError, match="refused"):
        m._choose(x, needs_grad=True)
    m.backend = "torch"
    assert m._choose(x, needs_grad=False) == (False, False)


def test_fla_guard_helpers():
    assert fla_mod._version_at_least("3.6.0", (3, 4, 0))
    assert not fla_mod._version_at_least("3.6.0", (3, 7, 1))
    assert fla_mod._version_at_least("3.7.1+git123", (3, 7, 1))
    if not torch.cuda.is_available():
        assert fla_mod.fla_backward_refusal() == "no CUDA device"
        ok, why = fla_mod.fla_kernel_usable(torch.device("cpu"), torch.float32, backward=False)
        assert not ok and why


# ----------------------------------------------------------------------------------- padding


def test_left_padding_mask_is_transparent_and_decoding_continues():
    """A left-padded batch of prompts gives each prompt's own outputs (pads -> 0), and decoding
    after the padded prefill continues each prompt exactly."""
    m = _module(n_v_heads=4, conv_bias=True)  # conv bias: pads would leak without the mask
    lens, T = [10, 6, 3], 12
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randn(1, n, 48, generator=gen, dtype=torch.float64) for n in lens]
    x = torch.randn(3, T, 48, generator=gen, dtype=torch.float64)  # garbage in the pads
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(lens, prompts)):
        x[i, T - n :] = p[0]
        mask[i, T - n :] = True
    nxt = torch.randn(3, 1, 48, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, attention_mask=mask)
        cache = m.init_cache(3, dtype=torch.float64)
        torch.testing.assert_close(m(x, cache=cache, attention_mask=mask), y, rtol=1e-12, atol=1e-12)
        y_next = m(nxt, cache=cache)
        for i, (n, p) in enumerate(zip(lens, prompts)):
            alone = m(torch.cat([p, nxt[i : i + 1]], dim=1))[0]
            assert rel_rms(y[i, T - n :], alone[:n]) < 1e-12
            assert not y[i, : T - n].any()
            assert rel_rms(y_next[i, 0], alone[n]) < 1e-12
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(x, attention_mask=mask[:, :5])


def test_module_under_cpu_autocast_forward_backward_and_decode():
    """bf16 CPU autocast around the layer (projections in bf16, the kernels in float32 inside):
    within the GPU bf16 budget of the float64 reference, finite gradients, and decoding under
    autocast continues the prefill exactly as without autocast."""
    torch.manual_seed(0)
    m = GatedDeltaNet(d_model=64, n_heads=2, n_v_heads=4, backend="torch")
    m.init_weights(init_method="normal", d_model=64, block_idx=0, num_blocks=2, std=0.05)
    x = torch.randn(2, 48, 64, requires_grad=True)
    cu = lengths_to_cu([50, 46])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, cu_doc_lens=cu)
    y.float().square().mean().backward()
    weights = {k: v.detach().double() for k, v in m.state_dict().items()}
    r = twins.gdn_layer_forward(
        weights, x.detach().double().reshape(1, 96, 64), n_heads=2, n_v_heads=4, cu_doc_lens=cu.numpy()
    ).reshape(2, 48, 64)
    assert rel_rms(y, r) < 2e-2
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        outs = []
        for auto in (False, True):
            cache = m.init_cache(2)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
                m(x[:, :20], cache=cache)
            outs.append((m(x[:, 20:21], cache=cache), cache.state.clone()))
        # the prefill's projections differ (bf16 under autocast); the state stays float32
        assert outs[1][1].dtype == torch.float32
        assert rel_rms(outs[1][0], outs[0][0]) < 2e-2
