"""Faults of multi-process cases: the report names the rank at fault and its own exception (the
other ranks' errors are kept, labelled follow-on); killing the process that launched the ranks, by
SIGTERM or SIGKILL, leaves no rank process and no temporary folder behind."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conformance_fakes import ExactBackend, subject_for

from conformance import report as rep
from conformance.cases import build_cases
from conformance.distributed import (
    DistributedRunError,
    DistributedTimeoutError,
    RankReport,
    find_root,
    looks_like_follow_on,
    rank,
    run_distributed,
)
from conformance.runner import print_summary, run_cases
from conformance.subjects import registered
from olmo_attn.backends.capabilities import Feature

ROOT = Path(__file__).resolve().parents[2]
FEATURES = frozenset(Feature) - {Feature.kv_cache, Feature.kv_cache_leftpad, Feature.deterministic}

# ---------------------------------------------------------------------------------------------- rank fns


def _planted_then_collective(bad_rank: int) -> None:
    if rank() == bad_rank:
        raise RuntimeError("planted-xyz")
    dist.all_reduce(torch.ones(4))  # the healthy rank waits here for a peer that is gone


def _dies_then_collective(bad_rank: int) -> None:
    if rank() == bad_rank:
        os._exit(3)
    dist.all_reduce(torch.ones(4))


class FailsOnRank1(ExactBackend):
    """Correct everywhere except on rank 1 of a context-parallel group, where it raises."""

    def forward(self, *args, **kwargs):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("planted-xyz")
        return super().forward(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- root cause


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0]


def test_root_cause_is_the_rank_that_raised_and_the_peer_is_follow_on():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_planted_then_collective, 2, args=(1,), timeout_s=60)
    err = info.value
    assert not isinstance(err, DistributedTimeoutError)
    assert err.root_rank == 1
    assert err.root is not None and err.root.error == "RuntimeError: planted-xyz"
    assert "_planted_then_collective" in (err.root.traceback or "")
    head = _first_line(err)
    assert "root cause: rank 1 raised RuntimeError: planted-xyz" in head, head
    assert "ranks [0]: follow-on after rank 1 failed" in head, head
    text = str(err)
    # the root rank's report comes first; rank 0's (gloo noticed the peer left, or it was killed
    # while still waiting) is kept, labelled as a consequence
    assert text.index("root cause: rank 1 raised") < text.index("rank 0: ")
    rank0 = next(r for r in err.reports if r.rank == 0)
    assert rank0.role == "follow-on" and rank0.root_rank == 1
    assert rank0.status in ("error", "killed")
    if rank0.status == "error":
        assert "rank 0: follow-on error after rank 1 failed" in text
        assert rank0.error is not None and "planted-xyz" not in rank0.error
    else:
        assert "rank 0: killed after rank 1 failed" in text


def test_root_cause_is_a_rank_that_died_without_a_report():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_dies_then_collective, 2, args=(1,), timeout_s=60)
    err = info.value
    assert err.root_rank == 1
    assert "root cause: rank 1 died without a report (exit code 3)" in _first_line(err)
    assert next(r for r in err.reports if r.rank == 0).role == "follow-on"


def _rep(r: int, status: str, error: str | None, at: float | None) -> RankReport:
    return RankReport(rank=r, pid=100 + r, exitcode=1, status=status, error=error, failed_at=at)


def test_find_root_prefers_a_rank_own_error_over_an_earlier_peer_failure():
    closed = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:23249"
    assert looks_like_follow_on(closed) and not looks_like_follow_on("ValueError: bad shape")
    # rank 0's follow-on error was recorded first; rank 1's own error is still the root
    reports = [_rep(0, "error", closed, 10.0), _rep(1, "error", "ValueError: bad shape", 11.0)]
    assert find_root(reports).rank == 1
    # two own errors: the earlier one
    reports = [_rep(0, "error", "KeyError: 'a'", 12.0), _rep(1, "error", "ValueError: b", 11.0)]
    assert find_root(reports).rank == 1
    reports = [_rep(0, "error", "KeyError: 'a'", 10.0), _rep(1, "error", "ValueError: b", 11.0)]
    assert find_root(reports).rank == 0
    # only communication errors: the earliest; nothing failed: no root
    reports = [_rep(0, "error", closed, 11.0), _rep(1, "error", closed, 10.5), _rep(2, "killed", None, None)]
    assert find_root(reports).rank == 1
    assert find_root([_rep(0, "ok", None, None), _rep(1, "timeout", None, None)]) is None
    err = DistributedRunError("distributed case failed on ranks [0, 1]", reports, 1, 2.0)
    assert "root cause: rank 1 raised" in _first_line(err)
    assert "rank 0: follow-on error after rank 1 failed" in str(err)
    assert "rank 2: killed after rank 1 failed" in str(err)


@pytest.mark.slow
def test_cp_case_report_names_the_failing_rank_in_every_format(tmp_path):
    """Through the context-parallel family (batched launch, then the failing case on its own): the
    terminal summary, the JSON and the JUnit XML carry rank 1's own exception as the cause."""
    subject = dataclasses.replace(
        subject_for("fails_on_rank1", FailsOnRank1, features=FEATURES), backend_factory=FailsOnRank1
    )
    with registered(subject):
        cases = build_cases(
            tiers=["multiproc"], backends=["fails_on_rank1"], pattern="ring_zig_zag_causal/float32/w2"
        )
        assert len(cases) == 1
        report = run_cases(cases, progress=False, stream=io.StringIO())
        summary = io.StringIO()
        print_summary(report, summary, use_rich=False)
    (r,) = report.results
    assert r.status == "failed"
    for text in (r.message, summary.getvalue()):
        assert "root cause: rank 1 raised RuntimeError: planted-xyz" in text, text
        assert "follow-on after rank 1 failed" in text
    doc = json.loads(rep.write_json(report, tmp_path / "r.json").read_text())
    (res,) = [x for x in doc["results"] if x["id"] == r.case.id]
    assert "root cause: rank 1 raised RuntimeError: planted-xyz" in res["message"]
    assert any(
        "planted-xyz" in c["message"] and "test_distributed_faults.py" in c["message"] for c in res["checks"]
    )  # the traceback
    root = ET.parse(rep.write_junit(report, tmp_path / "r.xml")).getroot()
    failure = next(tc for tc in root.iter("testcase") if tc.get("name") == r.case.id).find("failure")
    assert failure is not None
    assert "root cause: rank 1 raised RuntimeError: planted-xyz" in failure.get("message", "")
    assert "rank 0: " in (failure.text or "") and "after rank 1 failed" in (failure.text or "")


# ---------------------------------------------------------------------------------------------- orphans

_PARENT = """
import json, os, subprocess, sys, time

from conformance.distributed import rank, run_dir, run_distributed


def sleeper(info_dir):
    child = subprocess.Popen(["sleep", "1000"])  # a grandchild: must go too
    path = os.path.join(info_dir, f"rank{rank()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "child": child.pid, "dir": run_dir()}, f)
    os.replace(path + ".tmp", path)
    time.sleep(1000)


if __name__ == "__main__":
    run_distributed(sleeper, 2, args=(sys.argv[1],), timeout_s=600)
"""


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (the watchdog names the run's folder)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read() and _alive(int(name)):
                        out.append(int(name))
            except OSError:
                continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_parent_leaves_no_rank_and_no_temp_folder(tmp_path, sig):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(_PARENT))
    info = tmp_path / "info"
    info.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen(
        [sys.executable, str(script), str(info)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180  # start-up of two ranks on a loaded machine
        while len(list(info.glob("rank*.json"))) < 2:
            if parent.poll() is not None:
                raise AssertionError(f"parent exited early: {parent.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        ranks = [json.loads(p.read_text()) for p in sorted(info.glob("rank*.json"))]
        pids = [r["pid"] for r in ranks] + [r["child"] for r in ranks]
        workdir = ranks[0]["dir"]
        assert workdir and os.path.isdir(workdir) and all(_alive(p) for p in pids)
        parent.send_signal(sig)
        parent.wait(timeout=15)
        deadline = time.monotonic() + 15
        while True:
            left = [p for p in pids if _alive(p)]
            lingering = _mentioning(workdir)
            if not left and not lingering and not os.path.exists(workdir):
                break
            assert time.monotonic() < deadline, (
                f"after {sig.name} of the parent: processes {left} alive, {lingering} still naming the "
                f"run folder, folder exists: {os.path.exists(workdir)}"
            )
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# ---------------------------------------------------------------------------------------------- deadlines


def _quick() -> int:
    return rank()


def _slow_start_env(tmp_path: Path, delay_s: float) -> dict[str, str]:
    """Ranks that take ``delay_s`` longer to start (a ``sitecustomize`` that sleeps), like ranks on
    a loaded machine."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import time\ntime.sleep({delay_s})\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_slow_start_up_is_not_charged_to_the_case_deadline(tmp_path):
    env = _slow_start_env(tmp_path, 3.0)
    t0 = time.monotonic()
    assert run_distributed(_quick, 2, timeout_s=2.0, env=env) == [0, 1]
    assert time.monotonic() - t0 > 3.0  # start-up alone outlasted the case's deadline


def test_start_up_has_a_deadline_of_its_own(tmp_path):
    env = _slow_start_env(tmp_path, 30.0)
    t0 = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(_quick, 2, timeout_s=60.0, startup_timeout_s=2.0, env=env)
    assert time.monotonic() - t0 < 15
    err = info.value
    assert err.startup_s is None and err.root is None
    assert "timed out in start-up after 2s (ranks [0, 1] had not joined the process group" in str(err)
