"""Reports (JSON / JUnit / Markdown parsed back), exit codes, the CLI, ``python -m conformance``, and
the default run's time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conformance_fakes import ExactBackend, WrongScale, subject_for

from conformance import report as rep
from conformance.cases import build_cases
from conformance.runner import run_cases
from conformance.subjects import registered
from olmo_attn.backends.capabilities import TABLE, Feature
from olmo_attn.cli import main

ROOT = Path(__file__).resolve().parents[2]
FEATURES = frozenset(Feature) - {
    Feature.kv_cache,
    Feature.kv_cache_leftpad,
    Feature.ring_cp,
    Feature.ulysses_cp,
}


@pytest.fixture(scope="module")
def mixed_report():
    """A run with passes (exact backend, config checks), failures (wrong scale) and skips (flash)."""
    exact = subject_for("exact", ExactBackend, features=FEATURES)
    wrong = subject_for("wrong_scale", WrongScale, features=FEATURES)
    with registered(exact, wrong):
        cases = build_cases(
            tiers=["config", "cpu"],
            backends=["exact", "wrong_scale", "flash_2"],
            pattern="availability or cpu/attn/exact/causal/float32/d64/mha or cpu/attn/wrong_scale/causal/float32/d64/mha",
        )
        return run_cases(cases, progress=False)


def test_report_counts_and_exit_code(mixed_report):
    counts = mixed_report.counts()
    # the wrong backend's case, and the pairwise comparison of the two backends that ran that problem
    assert counts["failed"] == 2 and counts["passed"] >= 3 and counts["skipped"] >= 1
    ids = {r.case.id: r for r in mixed_report.results}
    pair = ids["cpu/pairwise/exact~wrong_scale/attn/causal/float32/d64/mha"]
    assert pair.status == "failed" and "pairwise.out" in pair.message
    assert mixed_report.exit_code == 1


def test_json_round_trip(mixed_report, tmp_path):
    path = rep.write_json(mixed_report, tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert doc["schema"] == rep.SCHEMA and doc["exit_code"] == 1
    assert doc["counts"] == mixed_report.counts()
    assert {b["name"] for b in doc["fingerprint"]["backends"]} == set(TABLE)
    by_id = {r["id"]: r for r in doc["results"]}
    bad = by_id["cpu/attn/wrong_scale/causal/float32/d64/mha"]
    assert bad["status"] == "failed" and "out" in bad["message"]
    out_check = next(c for c in bad["checks"] if c["name"] == "out")
    for key in ("err", "baseline_err", "ratio", "threshold", "margin", "budget_ratio"):
        assert key in out_check
    assert out_check["passed"] is False and out_check["budget_ratio"] > 1
    assert doc["matrix"]["cells"]["wrong_scale"]["causal"]["status"] == "FAIL"
    assert doc["matrix"]["cells"]["exact"]["causal"]["status"] == "pass"
    skipped = by_id["config/config/flash_2/availability"]
    assert skipped["status"] == "skipped" and skipped["message"]


def test_junit_is_valid_xml_ci_tools_read(mixed_report, tmp_path):
    path = rep.write_junit(mixed_report, tmp_path / "r.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["olmo-attn.conformance.config", "olmo-attn.conformance.cpu"]
    total = sum(int(s.get("tests")) for s in suites)
    assert total == len(mixed_report.results) == int(root.get("tests"))
    failures = root.findall(".//testcase/failure")
    assert len(failures) == int(root.get("failures")) == 2
    assert "out" in failures[0].get("type") and "max|out-ref|" in failures[0].text
    skipped = root.findall(".//testcase/skipped")
    assert len(skipped) == int(root.get("skipped")) >= 1
    case = root.find(".//testcase[@name='cpu/attn/wrong_scale/causal/float32/d64/mha']")
    assert case is not None and case.get("classname") == "conformance.cpu.attn.wrong_scale"
    props = {p.get("name"): p.get("value") for p in suites[0].find("properties")}
    assert "torch" in props and "backend.flash_2" in props


def test_markdown_has_the_matrix_and_failures(mixed_report, tmp_path):
    text = rep.write_markdown(mixed_report, tmp_path / "r.md").read_text()
    assert text.startswith("# olmo-attn conformance report")
    assert "## Backend × feature" in text and "| wrong_scale" in text
    assert "## Failures (2)" in text and "cpu/attn/wrong_scale/causal/float32/d64/mha" in text
    assert "not verified on this hardware" in text  # flash_2 / flash_3 / te in the capability table


def test_cli_exit_codes_and_files(tmp_path, capsys):
    out = tmp_path / "lib.json"
    assert (
        main(["conformance", "--tier", "config", "-k", "library", "--no-progress", "--json", str(out)]) == 0
    )
    assert json.loads(out.read_text())["counts"]["failed"] == 0
    with registered(subject_for("wrong_scale", WrongScale, features=FEATURES)):
        code = main(
            [
                "conformance",
                "--tier",
                "cpu",
                "--backends",
                "wrong_scale",
                "-k",
                "attn/wrong_scale/causal/float32/d64/mha",
                "--no-progress",
            ]
        )
    assert code == 1
    assert "FAILED cpu/attn/wrong_scale/causal/float32/d64/mha" in capsys.readouterr().out
    assert main(["conformance", "--tier", "tpu"]) == 2
    assert main(["conformance", "--backends", "flash_9"]) == 2
    assert main(["conformance", "--tier", "cpu,multiproc", "--list", "-k", "torch"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed and all("torch" in line for line in listed)
    assert any(line.startswith("multiproc/cp/torch/") for line in listed)


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for name in (*TABLE, "ring-flash-attn", "flash-linear-attention"):
        assert name in text
    assert "not verified on this hardware" in text
    assert main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in doc["backends"]} == set(TABLE)
    for b in doc["backends"]:
        assert b["version"] or b["reason"]
    # GatedDeltaNet's automatic kernel order for this machine, and for the measured Hopper entry
    assert set(doc["gdn_kernel_order"]["order"]) == {
        "train_rows",
        "train_documents",
        "infer_rows",
        "infer_documents",
    }
    if doc["arch"] == "cpu":
        assert "GatedDeltaNet backend='auto' on cpu: our PyTorch kernel" in text
    from conformance.cli import _gdn_order

    hopper = _gdn_order("sm_90")
    assert hopper["measured"] and hopper["order"]["infer_rows"][0] == "fla"
    assert hopper["order"]["train_rows"][0] == "triton"
    assert not _gdn_order("sm_80")["measured"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_dash_m_conformance(tmp_path):
    junit = tmp_path / "r.xml"
    res = subprocess.run(
        [sys.executable, "-m", "conformance", "--tier", "config", "-k", "library", "--junit", str(junit)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cases:" in res.stdout and "library" in res.stdout
    assert ET.parse(junit).getroot().get("failures") == "0"


@pytest.mark.slow
def test_default_run_exits_zero():
    """The README's first command: no arguments, no GPU -> config, CPU and multi-process tiers, all
    verified (its wall time is measured in the README, not asserted here: a loaded machine is slow)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" and _cuda():
        pytest.skip("measures the no-GPU default run")
    res = subprocess.run(
        [sys.executable, "-m", "conformance", "--no-progress"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "failed" in res.stdout and " 0 failed" in res.stdout


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_json_reads_back_and_merges(mixed_report, tmp_path):
    path = rep.write_json(mixed_report, tmp_path / "a.json")
    back = rep.load_json(path)
    assert [r.case.id for r in back.results] == [r.case.id for r in mixed_report.results]
    assert back.counts() == mixed_report.counts() and back.exit_code == mixed_report.exit_code
    first = next(r for r in back.results if r.status == "failed")
    assert first.failed_checks and first.worst_budget_ratio > 1
    merged = rep.merge([back, back])  # a case id seen twice keeps one result
    assert merged.counts() == mixed_report.counts()
    out = tmp_path / "m.md"
    assert main(["conformance", "--merge", str(path), str(path), "--markdown", str(out)]) == 1
    assert "## Failures (2)" in out.read_text()
    assert main(["conformance", "--merge", str(tmp_path / "missing.json")]) == 2


def test_merge_counts_wall_clock_once_for_side_by_side_shards(mixed_report):
    import dataclasses

    def at(start: float, dur: float):
        return dataclasses.replace(mixed_report, started=start, duration_s=dur)

    # two shards side by side (0-100 s, 10-60 s), then a later chunk (200-230 s)
    merged = rep.merge([at(1000.0, 100.0), at(1010.0, 50.0), at(1200.0, 30.0)])
    assert merged.duration_s == pytest.approx(130.0)
    assert merged.options["busy_s"] == pytest.approx(180.0)
    assert merged.started == 1000.0


def test_merge_keeps_a_result_over_a_later_skip(mixed_report):
    import dataclasses

    from conformance.results import SKIPPED

    ran = next(r for r in mixed_report.results if r.status != SKIPPED)
    skip = dataclasses.replace(ran, status=SKIPPED, message="not started: the run's time budget was used up")
    later = dataclasses.replace(mixed_report, results=[skip])
    merged = rep.merge([mixed_report, later])
    assert next(r for r in merged.results if r.case.id == ran.case.id).status == ran.status
    merged = rep.merge([later, mixed_report])  # and a later result replaces an earlier skip
    assert next(r for r in merged.results if r.case.id == ran.case.id).status == ran.status


def test_merge_takes_each_backend_from_a_run_where_it_was_available(mixed_report):
    import dataclasses

    fp = mixed_report.fingerprint
    row = fp.backends[0]
    missing = dataclasses.replace(row, available=False, version=None, reason="not installed")
    before = dataclasses.replace(
        mixed_report, fingerprint=dataclasses.replace(fp, backends=[missing], gpu_count=1)
    )
    after = dataclasses.replace(
        mixed_report, fingerprint=dataclasses.replace(fp, backends=[row], gpu_count=2)
    )
    merged = rep.merge([before, after])
    assert merged.fingerprint.backends[0].available and merged.fingerprint.gpu_count == 2
