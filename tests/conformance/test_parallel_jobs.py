"""``olmo-attn conformance --jobs N``: worker processes, merged report, same verdict as one process."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conformance import parallel
from conformance.cases import build_cases
from conformance.cli import conformance_parser, main
from conformance.hardware import fingerprint
from conformance.results import FAILED, PASSED, CaseResult
from conformance.runner import RunReport, verdict

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--tier", "config,cpu", "-k", "config or (causal and float32 and d64)"]
ALL_TIERS = ["config", "cpu", "multiproc", "gpu", "multigpu"]


def _statuses(path: Path) -> dict[str, str]:
    return {r["id"]: r["status"] for r in json.loads(path.read_text())["results"]}


# ------------------------------------------------------------------------------------------ usage


def test_jobs_0_is_a_usage_error_naming_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--tier", "config", "--jobs", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "'0'" in err and ">= 1" in err


@pytest.mark.parametrize("value", ["-3", "two", "1.5"])
def test_jobs_rejects_non_counts(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--tier", "config", f"--jobs={value}"])
    assert e.value.code == 2 and "--jobs" in capsys.readouterr().err


def test_jobs_with_shard_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tier", "config", "--jobs", "2", "--shard", "1/2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--jobs 2" in err and "--shard 1/2" in err
    assert main(["--tier", "config", "--jobs", "auto", "--shard", "1/2", "--no-progress"]) == 2


def test_jobs_1_with_shard_runs_that_shard_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["--tier", "config", "--backends", "torch", "--jobs", "1", "--shard", "1/1", "--no-progress"])
        == 0
    )
    assert "[jobs]" not in capsys.readouterr().out


def test_parse_jobs() -> None:
    p = conformance_parser()
    assert p.parse_args([]).jobs is None
    assert p.parse_args(["--jobs", "auto"]).jobs == "auto"
    assert p.parse_args(["--jobs", "AUTO"]).jobs == "auto"
    assert p.parse_args(["--jobs", "3"]).jobs == 3


def test_auto_jobs() -> None:
    assert parallel.auto_jobs(False, 64) == 1
    assert parallel.auto_jobs(True, 2) == 1
    assert parallel.auto_jobs(True, 16) == 4
    assert parallel.auto_jobs(True, 17) == 4
    assert parallel.auto_jobs(True, 128) == 8
    assert parallel.resolve_jobs(None, cuda_available=False, cores=64) == 1
    assert parallel.resolve_jobs("auto", cuda_available=True, cores=32) == 8
    assert parallel.resolve_jobs(5, cuda_available=False, cores=1) == 5


# ------------------------------------------------------------------------------------------ planning


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("quick", [True, False])
def test_shards_cover_exactly_the_selection(n: int, quick: bool) -> None:
    whole = [c.id for c in build_cases(tiers=ALL_TIERS, quick=quick)]
    parts = [[c.id for c in build_cases(tiers=ALL_TIERS, quick=quick, shard=(i, n))] for i in range(1, n + 1)]
    flat = [cid for part in parts for cid in part]
    assert len(flat) == len(set(flat)) == len(whole)  # disjoint, nothing lost
    assert set(flat) == set(whole)
    assert sum(bool(p) for p in parts) >= 2  # the split does split


def _args(argv: list[str]) -> argparse.Namespace:
    return conformance_parser().parse_args(argv)


def test_plan_workers_covers_the_selection_but_the_multigpu_tier(tmp_path: Path) -> None:
    argv = ["--tier", "all", "-k", "not float64", "--backends", "torch", "--time-budget", "120"]
    args = _args([*argv, "--json", "out.json", "--junit", "j.xml", "--markdown", "m.md"])
    selected = build_cases(tiers=ALL_TIERS, backends=["torch"], pattern="not float64")
    workers = parallel.plan_workers(
        args,
        jobs=3,
        tiers=ALL_TIERS,
        backends=["torch"],
        require=None,
        tmpdir=tmp_path,
        environ={"PATH": "/bin", "OMP_NUM_THREADS": "7"},
        gpus=["3", "5"],
        cores=12,
    )
    assert len(workers) == 3
    ids = [c.id for w in workers for c in w.cases]
    assert len(ids) == len(set(ids))
    assert set(ids) == {c.id for c in selected if c.tier != "multigpu"}
    assert any(c.tier == "multigpu" for c in selected)
    for slot, w in enumerate(workers):
        a = w.argv
        assert a[:3] == [sys.executable, "-m", "conformance"]
        assert a[a.index("--shard") + 1] == f"{w.shard[0]}/3"
        assert a[a.index("--jobs") + 1] == "1" and "--no-progress" in a
        assert a[a.index("--json") + 1] == str(w.json_path) and w.json_path.parent == tmp_path
        assert "--junit" not in a and "--markdown" not in a and "--merge" not in a and "--list" not in a
        assert a[a.index("--tier") + 1] == "config,cpu,multiproc,gpu"
        assert a[a.index("--time-budget") + 1] == "120.0" and "-knot float64" in a
        assert a[a.index("--backends") + 1] == "torch"
        # the worker's own parser reads it back to the same selection
        wargs = _args(a[3:])
        assert wargs.shard == f"{w.shard[0]}/3" and wargs.pattern == "not float64" and wargs.jobs == 1
        assert w.env["CUDA_VISIBLE_DEVICES"] == ["3", "5"][slot % 2]
        assert w.env["OMP_NUM_THREADS"] == "7"  # the user's setting wins
        assert w.env["TORCHINDUCTOR_COMPILE_THREADS"] == "4"  # 12 cores / 3 workers
        assert str(REPO) in w.env["PYTHONPATH"].split(os.pathsep)


def test_plan_workers_skips_empty_shards_and_a_multigpu_only_run(tmp_path: Path) -> None:
    args = _args(["--tier", "config", "-k", "config_roundtrip"])
    workers = parallel.plan_workers(
        args,
        jobs=4,
        tiers=["config"],
        backends=None,
        require=None,
        tmpdir=tmp_path,
        environ={},
        gpus=[],
        cores=8,
    )
    assert len(workers) == 1 and [c.id for c in workers[0].cases] == [
        "config/config/library/config_roundtrip"
    ]
    assert "CUDA_VISIBLE_DEVICES" not in workers[0].env
    assert workers[0].env["OMP_NUM_THREADS"] == "8"  # one worker left: all the cores
    mg = parallel.plan_workers(
        _args(["--tier", "multigpu"]),
        jobs=4,
        tiers=["multigpu"],
        backends=None,
        require=None,
        tmpdir=tmp_path,
        environ={},
        gpus=["0", "1"],
        cores=8,
    )
    assert mg == []


def test_visible_gpus() -> None:
    assert parallel.visible_gpus({}, 0) == []
    assert parallel.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 0) == []
    assert parallel.visible_gpus({}, 3) == ["0", "1", "2"]
    assert parallel.visible_gpus({"CUDA_VISIBLE_DEVICES": "4, 6"}, 2) == ["4", "6"]
    assert parallel.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ab,GPU-cd,7"}, 2) == ["GPU-ab", "GPU-cd"]


def test_exit_text_and_tail() -> None:
    assert parallel.exit_text(-signal.SIGSEGV) == "was killed by signal SIGSEGV (exit status -11)"
    assert parallel.exit_text(2) == "exited with status 2"
    assert parallel.exit_text(None) == "did not finish"
    text = "\n".join(f"line {i}" for i in range(50)) + "\n\n"
    assert parallel.text_tail(text, lines=3) == "line 47 | line 48 | line 49"
    assert len(parallel.text_tail("x" * 5000, chars=100)) == 100


# ------------------------------------------------------------------------------------------ accounting


def _cases(n: int = 6):
    cases = build_cases(tiers=["config"], backends=["torch"])[:n]
    assert len(cases) == n
    return cases


def test_a_dead_workers_unreported_cases_fail_with_its_status_and_stderr() -> None:
    cases = _cases()
    partial = RunReport([CaseResult(c, PASSED, [], "ok", 0.1) for c in cases[:2]], fingerprint())
    lost = parallel.unreported_results(
        cases,
        partial,
        worker="2/4",
        returncode=-signal.SIGSEGV,
        stderr_tail="Fatal Python error: Segmentation fault",
    )
    assert [r.case.id for r in lost] == [c.id for c in cases[2:]]
    assert all(r.status == FAILED for r in lost)
    msg = lost[0].message
    assert (
        "worker 2/4" in msg and "SIGSEGV" in msg and "Segmentation fault" in msg and "before reporting" in msg
    )
    # merged with the survivors, the verdict is a failure (exit 1), even for a run that named nothing
    assert verdict(partial.results + lost, {})[0] == 1
    assert verdict(partial.results, {})[0] == 0


def test_a_worker_without_a_report_fails_all_its_cases() -> None:
    cases = _cases(4)
    lost = parallel.unreported_results(cases, None, worker="1/2", returncode=2, stderr_tail="")
    assert len(lost) == 4 and all(r.status == FAILED for r in lost)
    assert (
        "exited with status 2 without writing a report" in lost[0].message and "(nothing)" in lost[0].message
    )


def test_a_complete_report_loses_nothing() -> None:
    cases = _cases(3)
    full = RunReport([CaseResult(c, PASSED, [], "ok", 0.1) for c in cases], fingerprint())
    assert parallel.unreported_results(cases, full, worker="1/1", returncode=-9, stderr_tail="x") == []


def test_worker_reports_keep_compile_accounting(tmp_path: Path) -> None:
    from conformance.report import load_json, write_json

    case = _cases(1)[0]
    stats = {"compile_s": 1.5, "frames": 2}
    write_json(
        RunReport([CaseResult(case, PASSED, [], "ok", 2.0, compile=stats)], fingerprint()),
        tmp_path / "w.json",
    )
    assert load_json(tmp_path / "w.json").results[0].compile == stats


# ------------------------------------------------------------------------------------------ real runs


def test_jobs_2_gives_the_same_results_as_jobs_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*SMALL, "--jobs", "1", "--no-progress", "--json", str(one)]) == 0
    monkeypatch.setattr(parallel, "PROGRESS_EVERY_S", 0.5)
    md, xml = tmp_path / "two.md", tmp_path / "two.xml"
    assert main([*SMALL, "--jobs", "2", "--json", str(two), "--markdown", str(md), "--junit", str(xml)]) == 0
    out = capsys.readouterr().out
    assert "[jobs] 25 cases in 2 worker(s)" in out and "cases done" in out
    assert "verdict: verified (exit code 0)" in out
    a, b = _statuses(one), _statuses(two)
    assert a == b and len(a) == 25 and PASSED in a.values()
    doc = json.loads(two.read_text())
    assert doc["options"]["jobs"] == 2 and doc["options"]["explicit_tiers"] == ["config", "cpu"]
    assert doc["exit_code"] == 0 and doc["counts"] == json.loads(one.read_text())["counts"]
    assert len(doc["provenance"]["worker_commands"]) == 2 and "--jobs 2" in doc["provenance"]["command"]
    assert md.exists() and xml.exists()


def test_jobs_2_keeps_exit_3_for_a_requested_backend_that_ran_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        ["--tier", "config", "--backends", "torch", "--require", "flash_4", "--jobs", "2", "--no-progress"]
    )
    assert code == 3
    out = capsys.readouterr().out
    assert "backend 'flash_4' was requested but ran no case" in out


def test_jobs_2_with_nothing_selected_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tier", "config", "-k", "no_such_case_xyz", "--jobs", "2", "--no-progress"]) == 3
    assert "matched nothing" in capsys.readouterr().out


def test_a_crashed_worker_fails_its_cases_and_the_others_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a sitecustomize (imported at every worker's start) that crashes worker 2/2 only
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            if "--shard" in sys.argv and sys.argv[sys.argv.index("--shard") + 1] == "2/2":
                print("simulated crash of worker two", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGSEGV)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    report = tmp_path / "r.json"
    args = ["--tier", "config", "--backends", "torch"]
    code = main([*args, "--jobs", "2", "--no-progress", "--json", str(report)])
    assert code == 1
    second = {c.id for c in build_cases(tiers=["config"], backends=["torch"], shard=(2, 2))}
    first = {c.id for c in build_cases(tiers=["config"], backends=["torch"], shard=(1, 2))}
    assert second and first
    doc = json.loads(report.read_text())
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == first | second
    for cid in second:
        assert by_id[cid]["status"] == FAILED
        assert "SIGSEGV" in by_id[cid]["message"] and "simulated crash of worker two" in by_id[cid]["message"]
    assert all(by_id[cid]["status"] == PASSED for cid in first)
    assert doc["exit_code"] == 1
    err = capsys.readouterr().err
    assert "worker 2/2" in err and "worker logs kept in" in err


def _cpu_run(report: Path, *args: str, stdout: int) -> subprocess.Popen[str]:
    """``python -m conformance --tier cpu ARGS --no-progress --json REPORT`` started in the repo
    (stderr piped)."""
    cmd = [
        sys.executable,
        "-m",
        "conformance",
        "--tier",
        "cpu",
        *args,
        "--no-progress",
        "--json",
        str(report),
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True)


def _interrupted_report(report: Path) -> dict:
    """The report a SIGTERM'd cpu-tier run wrote: every selected case, marked interrupted, none failed."""
    doc = json.loads(report.read_text())
    assert doc["options"]["interrupted"] == "SIGTERM"
    assert doc["counts"]["total"] == len(build_cases(tiers=["cpu"], quick=True))
    assert doc["counts"]["failed"] == 0
    return doc


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and b"--shard" in (d / "cmdline").read_bytes():
                out.append(int(d.name))
    return out


def _group_alive(pgid: int) -> bool:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_of_the_parent_stops_every_worker(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = _cpu_run(report, "--jobs", "2", stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        kids: list[int] = []
        while time.monotonic() < deadline and len(kids) < 2:
            time.sleep(0.2)
            kids = _children(proc.pid)
        assert len(kids) == 2, "the workers did not start"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM
        assert "stopped 2 running worker(s)" in err
        assert not any(_group_alive(k) for k in kids)
        # the report still comes: every selected case, unfinished ones skipped as interrupted, none failed
        doc = _interrupted_report(report)
        why = [r["message"] for r in doc["results"] if r["status"] == "skipped"]
        assert why and all(m.startswith("interrupted: the run was stopped by SIGTERM") for m in why)
        assert any("stopped by SIGTERM" in r for r in doc["verdict"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_of_a_one_process_run_still_writes_its_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = _cpu_run(report, "--jobs", "1", "--checkpoint-every", "0", stdout=subprocess.PIPE)
    try:
        deadline = (
            time.monotonic() + 60
        )  # until the first case has run (its checkpoint; imports take seconds)
        while time.monotonic() < deadline and not report.exists():
            time.sleep(0.2)
            if proc.poll() is not None:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    doc = _interrupted_report(report)
    assert any(r["message"].startswith("interrupted:") for r in doc["results"] if r["status"] == "skipped")
    assert "stopped by SIGTERM" in out


def test_workers_start_no_case_after_the_parents_deadline(tmp_path: Path) -> None:
    args = conformance_parser().parse_args(["--tier", "cpu", "--time-budget", "100"])
    argv = parallel.worker_argv(
        args,
        tiers=["cpu"],
        backends=None,
        require=None,
        shard=(1, 2),
        json_path=tmp_path / "w.json",
        deadline=123.5,
    )
    assert argv[argv.index("--deadline") + 1] == "123.5"
    # a worker whose deadline has passed (it started late) runs nothing, whatever its own budget says
    out = tmp_path / "late.json"
    code = main(["--tier", "config", "--time-budget", "100", "--deadline", repr(time.time() - 1), "--jobs", "1",
                 "--no-progress", "--json", str(out)])  # fmt: skip
    assert code == 3
    doc = json.loads(out.read_text())
    assert doc["counts"]["skipped"] == doc["counts"]["total"] > 0
    assert all("time budget" in r["message"] for r in doc["results"])


def test_the_parent_checkpoints_the_merged_report_while_workers_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = parallel._run_workers

    def spy(workers, **kw):  # type: ignore[no-untyped-def]
        tick = kw["on_tick"]

        def counting_tick() -> None:
            tick()
            if (tmp_path / "r.json").exists():
                seen.append(len(json.loads((tmp_path / "r.json").read_text())["results"]))

        return real(workers, **{**kw, "on_tick": counting_tick, "tick_every_s": 0.5})

    monkeypatch.setattr(parallel, "_run_workers", spy)
    assert main([*SMALL, "--jobs", "2", "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    assert seen, "no checkpoint was written while the workers ran"
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 25
