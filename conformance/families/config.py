"""``config`` family (the configuration tier): everything that needs no numerics.

Per backend: ``availability`` (builds here, or raises ``BackendUnavailableError`` whose message is the
exact reason, which becomes the skip reason) and ``table`` (the backend class and every
``assert_supports_*`` agree with its capability-table entry; the entry is self-consistent; automatic
choice only picks backends that have the requested features). Library rows: sliding-window layer
mapping, parameter counts (config arithmetic = reference = built module), config round trips
(dict, JSON, OLMo-core's ``_CLASS_`` dicts), typed input errors that name the argument, the load
balancers' layouts against ``reference.cp_layouts`` (and their exact inverses), and state-dict keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import reference.configs as ref_cfg
import reference.cp_layouts as ref_cp
from olmo_attn.backends import capabilities as caps
from olmo_attn.backends.capabilities import Feature

from ..checks import CheckResult, fail, ok
from ..results import RunContext, SkipCase
from ..subjects import Subject, get_subject

if TYPE_CHECKING:
    from ..cases import Case


def _expect_raise(
    name: str, fn: Callable[[], Any], exc: type[BaseException] | tuple, *needles: str
) -> CheckResult:
    """``fn()`` must raise ``exc`` with every ``needle`` in its message (the argument and the fix)."""
    try:
        fn()
    except exc as e:  # type: ignore[misc]
        missing = [n for n in needles if n.lower() not in str(e).lower()]
        if missing:
            return fail(name, f"{name}: {type(e).__name__} does not mention {missing}: {e}")
        return ok(name, f"{name}: {type(e).__name__}: {e}")
    except Exception as e:
        return fail(name, f"{name}: expected {exc}, got {type(e).__name__}: {e}")
    return fail(name, f"{name}: expected {exc}, nothing was raised")


# ------------------------------------------------------------------------------------------ backends


def _availability(subject: Subject) -> list[CheckResult]:
    from olmo_attn.exceptions import BackendUnavailableError

    kw = dict(head_dim=64, n_heads=4, n_kv_heads=2)
    if not subject.shipped:
        subject.build_backend(**kw)
        return [ok("availability", f"registered backend '{subject.name}' builds")]
    device = "cuda" if torch.cuda.is_available() and "cuda" in subject.spec.devices else "cpu"
    reason = caps.unavailable_reason(subject.name, device)
    if reason is None:
        be = subject.build_backend(**kw)
        if be.spec() != subject.spec:
            return [fail("availability", f"availability: built backend reports spec {be.spec().name}")]
        return [ok("availability", f"available on {device}")]
    check = _expect_raise(
        "availability", lambda: subject.build_backend(**kw), BackendUnavailableError, subject.name
    )
    if not check.passed:
        return [check]
    raise SkipCase(reason)


_ASSERTS: dict[str, Feature] = {
    "assert_supports_swa": Feature.sliding_window,
    "assert_supports_ring_cp": Feature.ring_cp,
    "assert_supports_ulysses_cp": Feature.ulysses_cp,
    "assert_supports_packed_qkv": Feature.packed_qkv,
    "assert_supports_kv_cache": Feature.kv_cache,
}


def _table(subject: Subject) -> list[CheckResult]:
    from olmo_attn.backends.base import AttentionBackendName
    from olmo_attn.exceptions import UnsupportedFeatureError

    spec = subject.spec
    results: list[CheckResult] = []
    problems = []
    if not spec.devices:
        problems.append("no devices")
    if not spec.dtypes:
        problems.append("no dtypes")
    if spec.sm_min and spec.sm_max and spec.sm_min > spec.sm_max:
        problems.append(f"sm_min {spec.sm_min} > sm_max {spec.sm_max}")
    if (Feature.ring_cp in spec.features) != bool(spec.ring_strategies):
        problems.append(
            f"ring_cp={Feature.ring_cp in spec.features} but ring_strategies={spec.ring_strategies}"
        )
    if Feature.kv_cache_leftpad in spec.features and Feature.kv_cache not in spec.features:
        problems.append("kv_cache_leftpad without kv_cache")
    if Feature.documents_qk in spec.features and Feature.documents not in spec.features:
        problems.append("documents_qk without documents")
    if any(64 % spec.head_dim_multiple for _ in [0]) or spec.head_dim_max < 64:
        problems.append(f"head dims (multiple {spec.head_dim_multiple}, max {spec.head_dim_max}) exclude 64")
    results.append(
        fail("table_entry", "table_entry: " + "; ".join(problems)) if problems else ok("table_entry")
    )
    if not subject.shipped:
        return results
    cls = AttentionBackendName(subject.name).get_class()  # the adapter module imports without its package
    if cls.__name__ != spec.class_name or cls.name != subject.name:
        results.append(
            fail("class", f"class: {cls.__name__}.name={cls.name!r}, table says {spec.class_name}")
        )
    else:
        results.append(ok("class", f"class: {cls.__name__}"))
    for meth, feature in _ASSERTS.items():
        label = f"{meth}"
        if feature in spec.features:
            try:
                getattr(cls, meth)()
                results.append(ok(label))
            except Exception as e:
                results.append(
                    fail(
                        label,
                        f"{label}: the table lists {feature.value} but it raised {type(e).__name__}: {e}",
                    )
                )
        else:
            others = [n for n, s in caps.TABLE.items() if feature in s.features and n != subject.name]
            results.append(_expect_raise(label, getattr(cls, meth), UnsupportedFeatureError, *others[:1]))
    for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        label = f"assert_dtype[{str(d).replace('torch.', '')}]"
        if d in spec.dtypes:
            try:
                caps.assert_dtype(subject.name, d)
                results.append(ok(label))
            except Exception as e:
                results.append(fail(label, f"{label}: listed dtype rejected: {e}"))
        else:
            results.append(
                _expect_raise(
                    label, lambda d=d: caps.assert_dtype(subject.name, d), UnsupportedFeatureError, "dtype"
                )
            )
    return results


def _choice() -> list[CheckResult]:
    """Automatic choice picks an available backend that has every requested feature."""
    from olmo_attn.backends.registry import choose_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bad = []
    for f in Feature:
        if f in (Feature.deterministic,):
            continue
        try:
            name = choose_backend([f], device=device)
        except Exception as e:
            if caps.supporting(f) and any(caps.is_available(n, device) for n in caps.supporting(f)):
                bad.append(f"{f.value}: {type(e).__name__}: {e}")
            continue
        if f not in caps.TABLE[name].features or not caps.is_available(name, device):
            bad.append(f"{f.value}: chose '{name}', which lacks it or is unavailable")
    return [fail("choose_backend", "choose_backend: " + "; ".join(bad)) if bad else ok("choose_backend")]


# ------------------------------------------------------------------------------------------ library


def _window_for_layer() -> list[CheckResult]:
    from olmo_attn.attention import AttentionConfig, SlidingWindowAttentionConfig
    from olmo_attn.exceptions import ConfigurationError
    from olmo_attn.rope import RoPEConfig

    bad = []
    patterns = [[4096, 4096, 4096, -1], [1024, 2048, -1], [8], [-1], [16, -1, 32]]
    n = 0
    for pattern, n_layers, ff, fl in itertools.product(patterns, (1, 2, 4, 12), (True, False), (True, False)):
        cfg = SlidingWindowAttentionConfig(
            pattern=pattern, force_full_attention_on_first_layer=ff, force_full_attention_on_last_layer=fl
        )
        for layer in range(n_layers):
            n += 1
            want = ref_cfg.window_for_layer(pattern, layer, n_layers, ff, fl)
            got = cfg._get_window_size(layer, n_layers)
            if got != want or cfg.should_use_swa(layer, n_layers) != (want != -1):
                bad.append(
                    f"pattern {pattern} layer {layer}/{n_layers} ff={ff} fl={fl}: {got} vs reference {want}"
                )
            opts = ref_cfg.attention_layer_options(
                layer,
                n_layers,
                rope=True,
                no_global_rope=True,
                sliding_window={
                    "pattern": pattern,
                    "force_full_attention_on_first_layer": ff,
                    "force_full_attention_on_last_layer": fl,
                },
            )
            att = AttentionConfig(
                n_heads=2, rope=RoPEConfig(no_global_rope=True), sliding_window=cfg, backend="torch"
            ).build(16, layer_idx=layer, n_layers=n_layers)
            if att.window_size != opts["window_size"] or (att.rope is not None) != opts["rope"]:
                bad.append(
                    f"build layer {layer}/{n_layers} {pattern}: window {att.window_size}, rope "
                    f"{att.rope is not None}; reference {opts}"
                )
    results = [fail("window_for_layer", "; ".join(bad[:5])) if bad else ok("window_for_layer", f"{n} layers")]
    results.append(
        _expect_raise(
            "invalid_pattern",
            lambda: SlidingWindowAttentionConfig(
                pattern=[0], force_full_attention_on_first_layer=False
            )._get_window_size(0, 12),
            ConfigurationError,
            "0",
        )
    )
    return results


def _attention_num_params() -> list[CheckResult]:
    from olmo_attn.attention import AttentionConfig, GateConfig
    from olmo_attn.norm import LayerNormConfig

    grid: list[dict[str, Any]] = [
        {"n_heads": 4},
        {"n_heads": 4, "n_kv_heads": 1, "bias": False},
        {"n_heads": 8, "n_kv_heads": 2, "qk_norm": {"name": "default"}},
        {"n_heads": 4, "n_kv_heads": 1, "qk_norm": {"name": "rms"}, "bias": False},
        {"n_heads": 8, "n_kv_heads": 2, "qk_norm": {"name": "rms"}, "use_head_qk_norm": True},
        {"n_heads": 4, "gate": {"granularity": "headwise"}, "qk_norm": {"name": "default"}},
        {"n_heads": 4, "gate": {"granularity": "elementwise"}},
        {"n_heads": 4, "head_dim": 24},
        {"n_heads": 4, "qk_norm": {"name": "l2_norm"}},
        {"name": "fused", "n_heads": 4},
        {"name": "normalized", "n_heads": 4, "qk_norm": {"name": "l2_norm"}},
    ]
    bad = []
    d_model = 64
    for g in grid:
        kw = dict(g)
        if "gate" in kw:
            kw["gate"] = GateConfig(**kw["gate"])
        if "qk_norm" in kw:
            kw["qk_norm"] = LayerNormConfig(**kw["qk_norm"])
        cfg = AttentionConfig(backend="torch", **kw)
        built = cfg.build(d_model, layer_idx=0, n_layers=1)
        actual = sum(p.numel() for p in built.parameters())
        want = ref_cfg.attention_num_params(d_model, **g)
        if not cfg.num_params(d_model) == want == actual:
            bad.append(f"{g}: config {cfg.num_params(d_model)}, reference {want}, built {actual}")
    return [
        fail("attention_num_params", "; ".join(bad))
        if bad
        else ok("attention_num_params", f"{len(grid)} configs")
    ]


def _gdn_num_params() -> list[CheckResult]:
    from olmo_attn.recurrent import GatedDeltaNetConfig

    grid = [
        {},
        {"n_v_heads": 16},
        {"head_dim": 32},
        {"expand_v": 1.0},
        {"conv_size": 8, "conv_bias": True},
        {"allow_neg_eigval": False},
    ]
    bad = []
    for g in grid:
        cfg = GatedDeltaNetConfig(n_heads=8, **g)
        built = cfg.build(128, layer_idx=0, n_layers=1, init_device="meta")
        actual = sum(p.numel() for p in built.parameters())
        want = ref_cfg.gdn_num_params(128, n_heads=8, **g)
        if not cfg.num_params(128) == want == actual:
            bad.append(f"{g}: config {cfg.num_params(128)}, reference {want}, built {actual}")
    return [fail("gdn_num_params", "; ".join(bad)) if bad else ok("gdn_num_params", f"{len(grid)} configs")]


def _roundtrip() -> list[CheckResult]:
    from olmo_attn.attention import AttentionConfig, GateConfig, SlidingWindowAttentionConfig
    from olmo_attn.norm import LayerNormConfig
    from olmo_attn.recurrent import GatedDeltaNetConfig
    from olmo_attn.rope import RoPEConfig, YaRNRoPEScalingConfig

    configs = [
        AttentionConfig(
            n_heads=8,
            n_kv_heads=2,
            gate=GateConfig(granularity="elementwise", full_precision=False),
            rope=RoPEConfig(theta=10_000, scaling=YaRNRoPEScalingConfig(factor=4.0)),
            qk_norm=LayerNormConfig(name="rms", eps=1e-6),
            clip_qkv=8.0,
            sliding_window=SlidingWindowAttentionConfig(pattern=[4096, -1]),
        ),
        AttentionConfig(name="normalized", n_heads=4, qk_norm=LayerNormConfig(name="l2_norm")),
        GatedDeltaNetConfig(n_heads=4, n_v_heads=8, expand_v=1.0),
    ]
    bad = []
    for cfg in configs:
        cls = type(cfg)
        for label, back in (
            ("as_dict", lambda c=cfg, k=cls: k.from_dict(c.as_dict())),
            ("json", lambda c=cfg, k=cls: k.from_json(c.to_json())),
            ("olmo_core_dict", lambda c=cfg, k=cls: k.from_dict(c.as_config_dict())),
        ):
            try:
                again = back()
            except Exception as e:
                bad.append(f"{cls.__name__} {label}: {type(e).__name__}: {e}")
                continue
            if again != cfg:
                bad.append(f"{cls.__name__} {label}: {again} != {cfg}")
    return [
        fail("config_roundtrip", "; ".join(bad))
        if bad
        else ok("config_roundtrip", f"{len(configs)} configs x 3")
    ]


def _input_errors() -> list[CheckResult]:
    from olmo_attn.attention import Attention
    from olmo_attn.backends.base import AttentionBackendName
    from olmo_attn.exceptions import ConfigurationError

    be = AttentionBackendName("torch").build(head_dim=8, n_heads=2)
    q = torch.randn(1, 6, 2, 8)

    def call(**kw: Any) -> Any:
        return be((q, q, q), **kw)

    return [
        _expect_raise(
            "cu_doc_lens_dtype",
            lambda: call(cu_doc_lens=torch.tensor([0.0, 6.0])),
            TypeError,
            "cu_doc_lens",
            "int32",
        ),
        _expect_raise(
            "cu_doc_lens_order",
            lambda: call(cu_doc_lens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)),
            ValueError,
            "cu_doc_lens",
        ),
        _expect_raise(
            "cu_doc_lens_total",
            lambda: call(cu_doc_lens=torch.tensor([0, 5], dtype=torch.int32)),
            ValueError,
            "cu_doc_lens",
            "6",
        ),
        _expect_raise(
            "cu_doc_lens_start",
            lambda: call(cu_doc_lens=torch.tensor([1, 6], dtype=torch.int32)),
            ValueError,
            "cu_doc_lens",
        ),
        _expect_raise("max_doc_len_alone", lambda: call(max_doc_len=3), ValueError, "cu_doc_lens"),
        _expect_raise("dtype_mix", lambda: be((q, q.double(), q)), TypeError, "dtype"),
        _expect_raise("head_mismatch", lambda: be((torch.randn(1, 6, 3, 8), q, q)), ValueError, "heads"),
        _expect_raise(
            "window_zero",
            lambda: Attention(d_model=16, n_heads=2, window_size=0, backend="torch"),
            ConfigurationError,
            "window_size",
        ),
        _expect_raise(
            "heads_divide",
            lambda: Attention(d_model=24, n_heads=6, n_kv_heads=4, backend="torch"),
            ConfigurationError,
            "n_kv_heads",
        ),
        # OLMo-core raises ValueError (from the enum); CONVENTIONS.md makes it a ConfigurationError
        _expect_raise(
            "unknown_backend",
            lambda: Attention(d_model=16, n_heads=2, backend="flash_9"),
            (ValueError, ConfigurationError),
            "flash_9",
        ),
    ]


def _balancers() -> list[CheckResult]:
    from olmo_attn.cp.load_balancers import RingAttentionLoadBalancerType

    rng = np.random.default_rng(0)
    bad = []
    n = 0
    for world, _trial in itertools.product((2, 3, 4), range(4)):
        T = int(rng.integers(2 * world, 9 * world)) + int(rng.integers(0, 2 * world))
        x = np.arange(T)[None, :]
        cuts = sorted({int(c) for c in rng.integers(1, T, size=int(rng.integers(0, 4)))})
        cu = np.array([0, *cuts, T])
        for kind in ("zig_zag", "llama3", "ulysses"):
            shards = []
            for r in range(world):
                lb = RingAttentionLoadBalancerType(kind).build_for(cp_rank=r, cp_world_size=world)
                xt = torch.from_numpy(x.copy())
                n += 1
                if kind != "llama3":
                    got = lb.batch_shard(inputs=[xt], seq_dims=[1], pad_values=[-1])[0].numpy()
                    fn = ref_cp.zigzag_shard if kind == "zig_zag" else ref_cp.ulysses_shard
                    want = fn(x, 1, r, world, pad_value=-1)
                    if not np.array_equal(got, want):
                        bad.append(f"{kind} W={world} r={r} T={T}: {got.tolist()} vs {want.tolist()}")
                    shards.append(torch.from_numpy(got))
                doc_fn = {
                    "zig_zag": ref_cp.zigzag_shard_by_document,
                    "llama3": ref_cp.llama3_shard_by_document,
                    "ulysses": ref_cp.ulysses_shard_by_document,
                }[kind]
                (got_d,), meta = lb.batch_shard_by_document(
                    inputs=[xt], seq_dims=[1], cu_doc_lens=torch.from_numpy(cu), pad_values=[-1]
                )
                want_d, want_meta = doc_fn(x, 1, cu, r, world, pad_value=-1)
                if not np.array_equal(got_d.numpy(), want_d):
                    bad.append(
                        f"{kind} by document W={world} r={r} cu={cu.tolist()}: {got_d.tolist()} vs {want_d.tolist()}"
                    )
                for key, val in want_meta.items():
                    g = meta.get(key)
                    g = g.tolist() if isinstance(g, torch.Tensor) else g
                    w = val.tolist() if isinstance(val, np.ndarray) else val
                    if g != w:
                        bad.append(f"{kind} W={world} r={r} cu={cu.tolist()} {key}: {g} vs {w}")
            if shards:
                lb0 = RingAttentionLoadBalancerType(kind).build_for(cp_rank=0, cp_world_size=world)
                back = lb0.unshard(shards, seq_dim=1, length=T)
                if not torch.equal(back, torch.from_numpy(x)):
                    bad.append(f"{kind} W={world} T={T}: unshard(shard(x)) != x")
    return [
        fail("balancers", "; ".join(bad[:4]) + (f" (+{len(bad) - 4})" if len(bad) > 4 else ""))
        if bad
        else ok("balancers", f"{n} shards against reference.cp_layouts")
    ]


def _state_dict_keys() -> list[CheckResult]:
    from olmo_attn.attention import Attention, FusedAttention, GateConfig, NormalizedAttention
    from olmo_attn.norm import LayerNormConfig
    from olmo_attn.recurrent import GatedDeltaNet

    lin = lambda *names, bias=True: (
        {f"{n}.weight" for n in names} | ({f"{n}.bias" for n in names} if bias else set())
    )
    cases = [
        ("Attention", Attention(d_model=16, n_heads=2, backend="torch"), lin("w_q", "w_k", "w_v", "w_out")),
        (
            "Attention(bias=False, gate)",
            Attention(d_model=16, n_heads=2, bias=False, gate=GateConfig(), backend="torch"),
            lin("w_q", "w_k", "w_v", "w_out", "w_g", bias=False),
        ),
        (
            "Attention(qk_norm)",
            Attention(d_model=16, n_heads=2, qk_norm=LayerNormConfig(), backend="torch"),
            lin("w_q", "w_k", "w_v", "w_out", "q_norm", "k_norm"),
        ),
        ("FusedAttention", FusedAttention(d_model=16, n_heads=2, backend="torch"), lin("w_qkv", "w_out")),
        (
            "NormalizedAttention",
            NormalizedAttention(d_model=16, n_heads=2, backend="torch"),
            lin("w_q", "w_k", "w_v", "w_out", bias=False) | {"sq", "sk"},
        ),
        (
            "GatedDeltaNet",
            GatedDeltaNet(d_model=16, n_heads=2),
            lin(
                "w_q",
                "w_k",
                "w_v",
                "w_a",
                "w_b",
                "w_g",
                "w_out",
                "q_conv1d",
                "k_conv1d",
                "v_conv1d",
                "o_norm",
                bias=False,
            )
            | {"A_log", "dt_bias"},
        ),
    ]
    bad = []
    for label, module, want in cases:
        got = set(module.state_dict())
        if got != want:
            bad.append(f"{label}: extra {sorted(got - want)}, missing {sorted(want - got)}")
    return [
        fail("state_dict_keys", "; ".join(bad)) if bad else ok("state_dict_keys", f"{len(cases)} modules")
    ]


def _normalized_attention() -> list[CheckResult]:
    """nGPT: ``sq``/``sk`` give an effective scale of 1 at init, the softmax scale is ``sqrt(D)``, and
    ``normalize_matrices`` equals the reference's (unit rows of w_q/w_k/w_v, unit columns of w_out)."""
    import math

    import reference.modules as ref_mod
    from olmo_attn.attention import NormalizedAttention

    m = NormalizedAttention(d_model=32, n_heads=4, n_kv_heads=2, backend="torch", dtype=torch.float64)
    results = []
    eff = m.sq * (m.sq_init_value / m.sq_init_scaling)
    results.append(
        ok("normalized_init", "sq, sk: effective scale 1 at init")
        if torch.allclose(eff, torch.ones_like(eff))
        and torch.allclose(m.sk * math.sqrt(32), torch.ones_like(m.sk))
        else fail("normalized_init", f"normalized_init: effective scale {eff[:4].tolist()} (want 1)")
    )
    scale = m.backend.softmax_scale
    results.append(
        ok("normalized_scale")
        if math.isclose(scale, math.sqrt(8))
        else fail("normalized_scale", f"softmax scale {scale}, want sqrt(D) = {math.sqrt(8)}")
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    before = {n: t.detach().clone() for n, t in m.state_dict().items()}
    m.normalize_matrices()
    want = ref_mod.normalize_matrices({n: t.numpy() for n, t in before.items()})
    bad = [
        n for n, t in m.state_dict().items() if not np.allclose(t.numpy(), want[n], rtol=1e-12, atol=1e-14)
    ]
    results.append(
        fail("normalize_matrices", f"normalize_matrices: {bad} differ from the reference")
        if bad
        else ok("normalize_matrices")
    )
    return results


LIBRARY_CHECKS: dict[str, Callable[[], list[CheckResult]]] = {
    "window_for_layer": _window_for_layer,
    "attention_num_params": _attention_num_params,
    "gdn_num_params": _gdn_num_params,
    "config_roundtrip": _roundtrip,
    "input_errors": _input_errors,
    "balancers": _balancers,
    "state_dict_keys": _state_dict_keys,
    "normalized_attention": _normalized_attention,
}


def run_config(
    case: Case, subject: Subject | None, ctx: RunContext
) -> tuple[list[CheckResult], dict[str, Any]]:
    if case.variant in LIBRARY_CHECKS:
        return LIBRARY_CHECKS[case.variant](), {}
    subject = subject or get_subject(case.backend)
    if case.variant == "availability":
        return _availability(subject), {}
    if case.variant == "table":
        checks = _table(subject)
        if subject.shipped:
            checks += _choice()
        return checks, {}
    raise ValueError(f"unknown config variant {case.variant!r}")
