"""Exit codes of ``olmo-attn conformance`` through the CLI in-process (cheap: config tier / no cases)."""

from __future__ import annotations

import json

import pytest
import torch

from olmo_attn.cli import main


def test_filter_matching_nothing_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--tier", "config", "-k", "no_such_case_xyz", "--no-progress"]) == 3
    assert "matched nothing" in capsys.readouterr().out


def test_config_tier_passes_with_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--tier", "config", "--backends", "torch", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verdict: verified (exit code 0)" in out
    assert "olmo-attn " in out and "seed 0" in out  # provenance line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only verdict")
def test_gpu_tier_without_cuda_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--tier", "gpu", "--backends", "torch", "-k", "causal", "--no-progress"]) == 3
    assert "tier 'gpu' was requested but no case of it ran" in capsys.readouterr().out


def test_require_unrun_backend_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["conformance", "--tier", "config", "--backends", "torch", "--require", "flash_4", "--no-progress"]
    )
    assert code == 3
    assert "backend 'flash_4' was requested but ran no case" in capsys.readouterr().out


def test_require_unknown_backend_is_usage_error() -> None:
    assert main(["conformance", "--tier", "config", "--require", "nope", "--no-progress"]) == 2


def test_json_report_has_provenance_and_verdict(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    main(["conformance", "--tier", "config", "--backends", "torch", "--no-progress", "--json", str(path)])
    doc = json.loads(path.read_text())
    prov = doc["provenance"]
    assert prov["olmo_attn_version"] and prov["seed"] == 0 and "conformance" in prov["command"]
    assert doc["exit_code"] == 0 and doc["verdict"] == []
    assert any(b["backend"] == "torch" for b in doc["per_backend"])
