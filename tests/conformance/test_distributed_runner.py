"""The multi-process runner: a passing case, a rank that raises, a rank that hangs; no orphans."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from conformance.distributed import (
    DistributedRunError,
    DistributedTimeoutError,
    cp_mesh,
    device,
    rank,
    run_distributed,
    world_size,
)

# ---------------------------------------------------------------------------------------------- rank fns


def _sum_of_ranks(offset: int, *, scale: int = 1) -> dict:
    x = torch.tensor([float(rank() * scale + offset)])
    dist.all_reduce(x)
    mesh = cp_mesh()
    return {
        "rank": rank(),
        "world": world_size(),
        "sum": float(x),
        "device": str(device()),
        "mesh": mesh.size(),
        "threads": torch.get_num_threads(),
    }


def _one_rank_raises(bad_rank: int) -> None:
    if rank() == bad_rank:
        raise ValueError(f"boom from rank {bad_rank}")
    dist.barrier()  # the healthy ranks block here until the group is killed


def _one_rank_hangs(bad_rank: int, pid_file: str) -> None:
    if rank() == bad_rank:
        child = subprocess.Popen(["sleep", "1000"])  # a grandchild that must not survive
        with open(pid_file, "w") as f:
            f.write(str(child.pid))
        _stuck_in_here()
    dist.barrier()


def _stuck_in_here() -> None:
    time.sleep(1000)


def _rank_dies() -> None:
    if rank() == 1:
        os._exit(7)
    dist.barrier()


def _unpicklable_result():
    return lambda: None


# ---------------------------------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(name))
    return out


def _assert_no_orphans(err: DistributedRunError, extra_pids: tuple[int, ...] = ()) -> None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        left = [p for p in (*err.pids, *extra_pids) if _alive(p)] + _group_members(err.pgid)
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes left behind: {left}")


# ---------------------------------------------------------------------------------------------- tests


def test_passing_case_returns_results_in_rank_order():
    res = run_distributed(_sum_of_ranks, 2, args=(10,), kwargs={"scale": 3}, timeout_s=60)
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world"] == 2 and r["mesh"] == 2 and r["device"] == "cpu" for r in res)
    assert all(r["sum"] == 0 * 3 + 10 + 1 * 3 + 10 for r in res)
    assert all(r["threads"] >= 1 for r in res)


def test_rank_that_raises_fails_the_case_quickly_with_every_report():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_one_rank_raises, 2, args=(1,), timeout_s=60)
    elapsed = time.monotonic() - t0
    err = info.value
    assert not isinstance(err, DistributedTimeoutError)
    assert elapsed < 30, f"a failing rank must stop the case at once, took {elapsed:.1f}s"
    assert err.failed_ranks == [0, 1]
    by_rank = {r.rank: r for r in err.reports}
    assert by_rank[1].status == "error"
    assert "ValueError: boom from rank 1" in by_rank[1].error
    assert "_one_rank_raises" in by_rank[1].traceback
    # rank 0 was blocked in the barrier: gloo either notices the dead peer (error) or it is killed
    assert by_rank[0].status in ("killed", "error")
    assert "boom from rank 1" in str(err) and "rank 0" in str(err)
    _assert_no_orphans(err)


def test_rank_that_hangs_is_reported_within_the_timeout(tmp_path):
    pid_file = str(tmp_path / "grandchild.pid")
    timeout = 8.0
    t0 = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(_one_rank_hangs, 2, args=(1, pid_file), timeout_s=timeout)
    elapsed = time.monotonic() - t0
    err = info.value
    # the deadline counts from the moment both ranks had joined the group (start-up on a loaded
    # machine is not charged to the case); then 2 s for the stacks, and the kill
    assert err.startup_s is not None and err.startup_s <= elapsed
    ran = elapsed - err.startup_s
    assert timeout <= ran < timeout + 8, f"reported {ran:.1f}s after start-up for a {timeout}s timeout"
    assert "timed out after 8s (counted from" in str(err)
    statuses = {r.rank: r.status for r in err.reports}
    assert statuses == {0: "timeout", 1: "timeout"}
    hung = err.reports[1]
    assert "_stuck_in_here" in hung.output_tail, hung.output_tail  # faulthandler stack of the hung rank
    with open(pid_file) as f:
        grandchild = int(f.read())
    _assert_no_orphans(err, (grandchild,))


def test_rank_that_dies_without_a_report():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_rank_dies, 2, timeout_s=60)
    rep = {r.rank: r for r in info.value.reports}
    assert rep[1].status == "died" and rep[1].exitcode == 7
    _assert_no_orphans(info.value)


def test_unpicklable_result_is_an_error_not_a_hang():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_unpicklable_result, 2, timeout_s=60)
    assert all(r.status == "error" for r in info.value.reports)
    assert "pickle" in (info.value.reports[0].error or "").lower()


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_sum_of_ranks, 0)
    with pytest.raises(ValueError, match="backend"):
        run_distributed(_sum_of_ranks, 2, backend="mpi")
    with pytest.raises(TypeError, match="picklable"):
        run_distributed(lambda: None, 2)
