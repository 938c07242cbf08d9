"""Automatic backend choice from a measured preference file, forcing, and deriving the order from
benchmark results (``olmo_attn.backends.registry`` and ``benchmarks/backend_bench.py``)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from test_flash_doubles import Recorder, fake_cuda, install_flash2, install_flash4, install_te

from olmo_attn import hardware
from olmo_attn.backends import capabilities as caps
from olmo_attn.backends import registry
from olmo_attn.backends.capabilities import Feature
from olmo_attn.exceptions import BackendUnavailableError, UnsupportedFeatureError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A measured preference file of our own, in place of the package's."""

    def write(data: dict) -> Path:
        path = tmp_path / "preference.json"
        path.write_text(json.dumps(data))
        registry.reload_preferences()
        return path

    path = tmp_path / "preference.json"
    monkeypatch.setattr(registry, "PREFERENCE_FILE", path)
    registry.reload_preferences()
    yield write
    registry.reload_preferences()


@pytest.fixture
def hopper_with_fa2_fa4(monkeypatch: pytest.MonkeyPatch):
    fake_cuda(monkeypatch, (9, 0), "Fake H100")
    install_flash4(monkeypatch, Recorder())
    # flash-attn 2 and flash-attn-4 share the ``flash_attn`` package: keep FA4's ``cute`` next to FA2
    cute, iface = sys.modules["flash_attn.cute"], sys.modules["flash_attn.cute.interface"]
    install_flash2(monkeypatch, Recorder())
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", iface)
    hardware.clear_caches()
    yield
    hardware.clear_caches()


def _verified(
    monkeypatch: pytest.MonkeyPatch, *names: str, on: frozenset[str] = frozenset({"sm_90"})
) -> None:
    for n in names:
        monkeypatch.setitem(caps.TABLE, n, dataclasses.replace(caps.TABLE[n], verified_on=on))


MEASURED = {
    "sm_90": {
        "causal": ["flash_4", "flash_2", "torch"],
        "sliding_window": ["flash_2", "flash_4", "torch"],
        "documents": ["flash_4", "torch"],
        "_source": "test",
    }
}


def test_measured_order_picks_the_fastest_supporting_backend(
    prefs, hopper_with_fa2_fa4, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefs(MEASURED)
    _verified(monkeypatch, "flash_2", "flash_4")
    assert registry.choose_backend([Feature.causal]) == "flash_4"
    assert registry.choose_backend([Feature.causal, Feature.sliding_window]) == "flash_2"
    assert registry.choose_backend([Feature.documents, Feature.sliding_window]) == "flash_4"
    # a feature the fastest lacks: the next measured one that has it
    assert registry.choose_backend([Feature.causal, Feature.dropout]) == "flash_2"
    # not measured for documents: flash_2 is never guessed in, torch closes the list
    assert registry.choose_backend([Feature.documents, Feature.dropout]) == "torch"
    # fp32 is outside the flash dtypes
    import torch

    assert registry.choose_backend([Feature.causal], dtype=torch.float32) == "torch"


def test_a_windowed_layer_never_gets_a_backend_without_documents_in_the_window(
    prefs, hopper_with_fa2_fa4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents arrive per call: an automatic choice for a window also needs documents_window,
    which te lacks (its backward was wrong there on the H200), even where te is measured fastest."""
    install_te(monkeypatch, Recorder())
    prefs({"sm_90": {"sliding_window": ["te", "flash_4", "torch"], "causal": ["te", "torch"]}})
    _verified(monkeypatch, "te", "flash_4")
    assert registry.choose_backend([Feature.causal]) == "te"
    assert registry.choose_backend([Feature.sliding_window]) == "flash_4"
    name, why = registry._choose(
        [Feature.sliding_window], device=None, dtype=None, head_dim=None, allow_unverified=None
    )
    assert name == "flash_4" and "passed over te: lacks documents_window" in why


def test_unverified_backends_are_not_chosen_automatically(prefs, hopper_with_fa2_fa4, monkeypatch) -> None:
    prefs(MEASURED)
    _verified(monkeypatch, "flash_2", "flash_4", on=frozenset())
    assert registry.choose_backend([Feature.causal]) == "torch"
    assert registry.choose_backend([Feature.causal], allow_unverified=True) == "flash_4"
    monkeypatch.setenv(registry.ALLOW_UNVERIFIED_ENV, "1")
    assert registry.choose_backend([Feature.causal]) == "flash_4"


def test_per_architecture_head_dims(prefs, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (10, 0), "Fake B200")
    install_flash4(monkeypatch, Recorder())
    _verified(monkeypatch, "flash_4", on=frozenset({"sm_100"}))
    prefs({"sm_100": {"causal": ["flash_4", "torch"]}})
    assert registry.choose_backend([Feature.causal], head_dim=128) == "flash_4"
    assert registry.choose_backend([Feature.causal], head_dim=192) == "torch"  # FA4 sm_100: <=128 or 256
    with pytest.raises(UnsupportedFeatureError, match=r"head_dim=192 is not supported on sm_100"):
        registry.resolve_backend("flash_4", [Feature.causal], head_dim=192)
    hardware.clear_caches()


def test_unmeasured_architecture_and_cpu_fall_back_to_torch(prefs, monkeypatch: pytest.MonkeyPatch) -> None:
    prefs(MEASURED)
    hardware.clear_caches()
    assert registry.choose_backend([Feature.causal, Feature.documents]) == "torch"  # this CPU
    fake_cuda(monkeypatch, (8, 0), "Fake A100")
    assert registry.preference_order(None, [Feature.causal]) == ["torch"]
    hardware.clear_caches()


def test_forcing_a_backend_that_lacks_a_feature_names_alternatives(hopper_with_fa2_fa4) -> None:
    with pytest.raises(
        UnsupportedFeatureError,
        match=r"'flash_4' does not support dropout; backends that do: torch, flash_2, te",
    ):
        registry.resolve_backend("flash_4", [Feature.causal, Feature.dropout])
    with pytest.raises(
        UnsupportedFeatureError, match=r"'te' does not support kv cache; backends that do: .*flash_4"
    ):
        registry.resolve_backend("te", [Feature.kv_cache])
    assert registry.resolve_backend("flash_4", [Feature.kv_cache_leftpad, Feature.ring_cp]) == "flash_4"
    with pytest.raises(ValueError, match="unknown attention backend 'flash_5'"):
        registry.resolve_backend("flash_5")


def test_forcing_a_missing_backend_says_how_to_install_it() -> None:
    hardware.clear_caches()
    with pytest.raises(BackendUnavailableError, match=r"'flash_3' is unavailable.*hopper/"):
        registry.resolve_backend("flash_3", [Feature.causal])


# ----- deriving and writing the order ----------------------------------------------------------------------
def _rec(backend: str, mask: str, T: int, ms: float | None) -> dict:
    return {"backend": backend, "mask": mask, "seq_len": T, "fwd_bwd_ms": ms}


def test_derive_preferences_orders_by_measured_time() -> None:
    results = [
        _rec("torch", "causal", 2048, 1.0),
        _rec("torch", "causal", 8192, 10.0),
        _rec("flash_4", "causal", 2048, 1.2),  # slower when short ...
        _rec("flash_4", "causal", 8192, 6.0),  # ... much faster when long: geometric mean wins
        _rec("te", "causal", 2048, 0.5),
        _rec("te", "causal", 8192, None),  # failed a shape: cannot be chosen for this kind
        _rec("torch", "documents", 8192, 4.0),
        _rec("flash_4", "documents", 8192, 5.0),
    ]
    prefs = registry.derive_preferences(results)
    # documents: flash_4 slower than torch there, so torch first (H200: flash_2 on causal / window)
    assert prefs == {"causal": ["flash_4", "torch"], "documents": ["torch", "flash_4"]}
    assert registry.derive_preferences([_rec("flash_2", "causal", 8192, 1.0)]) == {
        "causal": ["flash_2", "torch"]
    }


def test_write_preferences_keeps_other_architectures(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"sm_100": {"causal": ["flash_4", "torch"]}}))
    registry.write_preferences("sm_90", {"causal": ["flash_4", "torch"]}, source="unit test", path=path)
    data = json.loads(path.read_text())
    assert data["sm_100"] == {"causal": ["flash_4", "torch"]}
    assert data["sm_90"] == {"causal": ["flash_4", "torch"], "_source": "unit test"}
    with pytest.raises(ValueError, match="unknown backends"):
        registry.write_preferences("sm_90", {"causal": ["flash_9"]}, source="x", path=path)


def test_committed_preference_file_is_well_formed() -> None:
    data = json.loads(registry.PREFERENCE_FILE.read_text())
    for arch, kinds in data.items():
        assert arch.startswith("sm_"), arch
        assert kinds["_source"]
        for kind in registry.MASK_KINDS:
            order = kinds[kind]
            assert "torch" in order and len(set(order)) == len(order)  # (after torch: never chosen)
            assert all(name in caps.TABLE for name in order)


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import backend_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return backend_bench


def test_backend_bench_smoke_writes_results_and_preference(tmp_path: Path, prefs) -> None:
    bench = _bench()
    pref_path = registry.PREFERENCE_FILE  # the fixture's temporary file
    out = tmp_path / "bench.json"
    report = bench.main(
        ["--smoke", "--masks", "causal", "--out", str(out), "--write-preference", str(pref_path)]
    )
    saved = json.loads(out.read_text())
    assert saved["env"]["arch"] == "cpu" and saved["schema"] == report["schema"]
    ok = [r for r in saved["results"] if r["error"] is None]
    assert {(r["backend"], r["mask"], r["seq_len"]) for r in ok} == {
        ("torch", "causal", 64),
        ("torch", "causal", 128),
    }
    for r in ok:
        assert len(r["fwd_bwd_times_ms"]) == 3 and r["fwd_bwd_ms"] > 0
        assert r["pairs"] == r["batch"] * r["seq_len"] * (r["seq_len"] + 1) // 2
    registry.reload_preferences()
    assert registry.load_preferences()["cpu"]["causal"] == ["torch"]
    assert "backend_bench.py" in registry.load_preferences()["cpu"]["_source"]


def test_bench_documents_are_long_tailed_and_stay_in_their_row() -> None:
    bench = _bench()
    cu, longest, n_docs = bench.cu_doc_lens(4, 8192, seed=1, mean_len=512)
    bounds = set(cu.tolist())
    assert {8192 * b for b in range(5)} <= bounds  # every row boundary is a document boundary
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert n_docs == len(lengths) and longest == max(lengths) and sum(lengths) == 4 * 8192
    assert sorted(lengths)[len(lengths) // 2] < 512 < longest  # median below the mean: a long tail


def test_allowed_pairs_counts() -> None:
    bench = _bench()
    assert bench.allowed_pairs("causal", 2, 4, 0) == 2 * 10
    assert bench.allowed_pairs("sliding_window", 1, 5, 2) == 1 + 2 + 2 + 2 + 2
    assert bench.allowed_pairs("sliding_window", 1, 3, 8) == 6  # window wider than T
    assert bench.allowed_pairs("documents", 1, 5, 0, [2, 3]) == 3 + 6


def test_verification_is_per_architecture(
    prefs, hopper_with_fa2_fa4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flash_4 verified on sm_90 only: chosen on a Hopper, not on a Blackwell it never passed conformance on."""
    prefs({**MEASURED, "sm_100": MEASURED["sm_90"]})
    monkeypatch.setitem(
        caps.TABLE, "flash_2", dataclasses.replace(caps.TABLE["flash_2"], verified_on=frozenset())
    )
    monkeypatch.setitem(
        caps.TABLE, "flash_4", dataclasses.replace(caps.TABLE["flash_4"], verified_on=frozenset({"sm_90"}))
    )
    assert registry.choose_backend([Feature.causal]) == "flash_4"
    fake_cuda(monkeypatch, (10, 0), "Fake B200")
    hardware.clear_caches()
    assert registry.choose_backend([Feature.causal]) == "torch"
    assert caps.TABLE["flash_4"].verified_for("sm_90") and not caps.TABLE["flash_4"].verified_for("sm_100")
    assert caps.TABLE["torch"].verified_for("sm_100") and caps.TABLE["torch"].verified_for("cpu")
