"""Multi-process runner for context-parallel cases (gloo on CPU, NCCL on GPUs).

:func:`run_distributed` launches ``world_size`` fresh Python processes, all in **one new process
group** (``os.killpg`` reaches every rank and anything a rank started), rendezvoused through a
``torch.distributed.FileStore`` on a fresh temporary file (never a port). Each rank initialises the
default process group, runs ``fn(*args, **kwargs)`` and sends back its (picklable) result. The case
has one deadline: when a rank raises, dies or the deadline passes, the runner asks the ranks still
running for their Python stacks (``faulthandler`` on ``SIGUSR1``), kills the whole group at once
with ``SIGKILL``, reaps it, and raises :class:`DistributedRunError` (or its subclass
:class:`DistributedTimeoutError`) carrying every rank's exception, traceback and output tail.
Workers also ask the kernel to kill them if the parent dies (``PR_SET_PDEATHSIG``), so an
interrupted test run leaves no orphans.

Inside ``fn``: :func:`rank`, :func:`world_size`, :func:`device` and :func:`cp_mesh` describe the
group. ``fn`` must be a module-level function: it is pickled by reference (a function of a script run
as ``__main__`` works too: the ranks load the script file as their ``__main__``, as multiprocessing
does).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DistributedRunError",
    "DistributedTimeoutError",
    "RankReport",
    "cp_mesh",
    "device",
    "rank",
    "run_distributed",
    "world_size",
]

_TAIL_LINES = 40
_GRACE_S = 1.0  # after the first failure, how long the other ranks get to report their own error
_STACK_DUMP_S = 2.0  # how long hung ranks get to write their stacks before SIGKILL


@dataclass
class RankReport:
    """What one rank did: its exit code, its exception (if any) and the tail of its output."""

    rank: int
    pid: int
    exitcode: int | None  # None: still running when the case was stopped
    status: str  # "ok", "error" (raised), "died" (no report), "timeout" (still running), "killed"
    error: str | None = None  # "ExceptionType: message"
    traceback: str | None = None
    output_tail: str = ""

    def describe(self) -> str:
        head = f"rank {self.rank} (pid {self.pid}): {self.status}"
        if self.exitcode is not None:
            head += f", exit code {self.exitcode}"
            if self.exitcode < 0:
                with contextlib.suppress(ValueError):
                    head += f" ({signal.Signals(-self.exitcode).name})"
        lines = [head]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.traceback:
            lines.append("  traceback:\n" + _indent(self.traceback.rstrip(), "    "))
        if self.output_tail.strip():
            lines.append("  output tail:\n" + _indent(self.output_tail.rstrip(), "    "))
        return "\n".join(lines)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


class DistributedRunError(RuntimeError):
    """A distributed case failed; ``reports`` has one :class:`RankReport` per rank."""

    def __init__(self, summary: str, reports: list[RankReport], pgid: int, elapsed_s: float):
        self.summary = summary
        self.reports = reports
        self.pgid = pgid
        self.pids = [r.pid for r in reports]
        self.elapsed_s = elapsed_s
        body = "\n".join(r.describe() for r in reports)
        super().__init__(f"{summary} after {elapsed_s:.1f}s\n{body}")

    @property
    def failed_ranks(self) -> list[int]:
        return [r.rank for r in self.reports if r.status != "ok"]


class DistributedTimeoutError(DistributedRunError, TimeoutError):
    """The case ran past its deadline; the ranks still running were killed (their stacks are in
    ``output_tail``)."""


# ---------------------------------------------------------------------------------------------- parent


def _tail(path: str, n: int = _TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-n:])


def _read_result(path: str) -> tuple[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


_BOOT = (
    "import json, sys; d = sys.argv[1]; sys.path[:] = json.load(open(d + '/sys_path.json')); "
    "from conformance.distributed import _worker_main; _worker_main(*sys.argv[1:])"
)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results in rank order.

    Args:
        fn: a module-level function (pickled by reference); it runs after
            ``torch.distributed.init_process_group`` with the default group spanning all ranks.
        world_size: number of processes.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (rank ``r`` uses ``cuda:r % device_count``).
        timeout_s: deadline for the whole case, start-up included (the process group's own timeout is
            a little longer, so the supervisor reports a hang — with stacks — before NCCL/gloo do).
        threads_per_rank: ``torch.set_num_threads`` in each rank (default: ``OMP_NUM_THREADS`` or the
            CPU cores, divided by the world size, at least 1), so ranks do not oversubscribe the machine.
        env: extra environment variables for the ranks.

    Raises:
        DistributedRunError: a rank raised or died (every rank's report is attached).
        DistributedTimeoutError: the deadline passed (the hung ranks' stacks are attached).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    cores = int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or os.cpu_count() or 1  # a bounded parent's share
    threads = threads_per_rank or max(1, cores // world_size)
    workdir = tempfile.mkdtemp(prefix="olmo_attn_dist_")
    procs: list[subprocess.Popen] = []
    logs: list[Any] = []
    pgid = 0
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, "sys_path.json"), "w") as f:
            json.dump([os.getcwd() if p == "" else p for p in sys.path], f)
        try:
            payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
        except Exception as e:
            raise TypeError(
                f"run_distributed needs a picklable fn/args/kwargs (a module-level function): {e}"
            ) from e
        with open(os.path.join(workdir, "payload.pkl"), "wb") as f:
            f.write(payload)
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if getattr(fn, "__module__", None) == "__main__" and main_file:
            # fn lives in a script: the ranks load that file as their __main__ (like multiprocessing)
            with open(os.path.join(workdir, "main_file.txt"), "w") as f:
                f.write(os.path.abspath(main_file))
        child_env = dict(os.environ)
        child_env.update(
            {
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "PYTHONFAULTHANDLER": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        child_env.update(env or {})
        for r in range(world_size):
            log = open(os.path.join(workdir, f"rank{r}.log"), "wb")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            cmd = [
                sys.executable,
                "-c",
                _BOOT,
                workdir,
                str(r),
                str(world_size),
                backend,
                str(timeout_s),
                str(threads),
                str(os.getpid()),
            ]
            popen_kw: dict[str, Any] = dict(
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env
            )
            if sys.version_info >= (3, 11):
                popen_kw["process_group"] = pgid  # 0: a new group led by rank 0
            else:  # pragma: no cover - Python 3.10
                target = pgid
                popen_kw["preexec_fn"] = lambda target=target: os.setpgid(0, target)
            procs.append(subprocess.Popen(cmd, **popen_kw))
            if r == 0:
                pgid = procs[0].pid
        return _supervise(procs, workdir, pgid, start, timeout_s)
    finally:
        if pgid:
            _killpg(pgid, signal.SIGKILL)  # anything left (ranks or what they started)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
                p.wait(timeout=10)
        for log in logs:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _supervise(
    procs: list[subprocess.Popen], workdir: str, pgid: int, start: float, timeout_s: float
) -> list[Any]:
    W = len(procs)
    deadline = start + timeout_s
    failed_at: float | None = None
    timed_out = False
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            break
        now = time.monotonic()
        if failed_at is None and any(c is not None and c != 0 for c in codes):
            failed_at = now
        if failed_at is not None and (all(c is not None for c in codes) or now - failed_at > _GRACE_S):
            break
        if now > deadline:
            timed_out = True
            break
        time.sleep(0.01)

    if failed_at is None and not timed_out:
        results = []
        reports = []
        for r in range(W):
            res = _read_result(os.path.join(workdir, f"result{r}.pkl"))
            if res is None or res[0] != "ok":
                reports.append(_report(r, procs[r], workdir, "died"))
            else:
                results.append(res[1])
        if len(results) == W:
            return results
        raise DistributedRunError(
            "a rank exited cleanly without a result", reports, pgid, time.monotonic() - start
        )

    # stop the group: stacks first (ranks still running), then SIGKILL to everyone at once
    running = [p for p in procs if p.poll() is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGUSR1)
    if running:
        time.sleep(_STACK_DUMP_S)
    _killpg(pgid, signal.SIGKILL)
    for p in procs:
        p.wait()
    still = {id(p) for p in running}
    reports = []
    for r, p in enumerate(procs):
        if id(p) in still:
            status = "timeout" if timed_out else "killed"
        else:
            status = "ok" if p.returncode == 0 else "died"
        reports.append(_report(r, p, workdir, status, stopped=id(p) in still))
    elapsed = time.monotonic() - start
    if timed_out:
        hung = [rep.rank for rep in reports if rep.status == "timeout"]
        raise DistributedTimeoutError(
            f"distributed case timed out after {timeout_s:g}s (ranks {hung} still running; killed)",
            reports,
            pgid,
            elapsed,
        )
    bad = [rep.rank for rep in reports if rep.status == "error" or rep.status == "died"]
    raise DistributedRunError(f"distributed case failed on ranks {bad}", reports, pgid, elapsed)


def _report(r: int, p: subprocess.Popen, workdir: str, status: str, stopped: bool = False) -> RankReport:
    res = _read_result(os.path.join(workdir, f"result{r}.pkl"))
    rep = RankReport(
        rank=r,
        pid=p.pid,
        exitcode=None if stopped else p.returncode,
        status=status,
        output_tail=_tail(os.path.join(workdir, f"rank{r}.log")),
    )
    if res is not None and res[0] == "error":
        rep.status = "error"
        rep.error, rep.traceback = res[1], res[2]
    return rep


# ---------------------------------------------------------------------------------------------- worker

_STATE: dict[str, Any] = {}


def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the parent dies (no orphans if the test runner is killed)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        return
    if os.getppid() != parent_pid:  # the parent already died before prctl
        os._exit(1)


def _worker_main(
    workdir: str, rank_s: str, world_s: str, backend: str, timeout_s: str, threads_s: str, parent_s: str
) -> None:
    import faulthandler
    import traceback
    from datetime import timedelta

    _set_parent_death_signal(int(parent_s))
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    r, W = int(rank_s), int(world_s)
    result_path = os.path.join(workdir, f"result{r}.pkl")
    os.environ.update(
        {"RANK": str(r), "WORLD_SIZE": str(W), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(W)}
    )
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(threads_s))
        main_txt = os.path.join(workdir, "main_file.txt")
        if os.path.exists(main_txt):
            import importlib.util

            with open(main_txt) as f:
                spec = importlib.util.spec_from_file_location("__mp_main__", f.read())
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["__mp_main__"] = module
            spec.loader.exec_module(module)
            sys.modules["__main__"] = module
        with open(os.path.join(workdir, "payload.pkl"), "rb") as f:
            fn, args, kwargs = pickle.load(f)
        if backend == "nccl":
            n_dev = torch.cuda.device_count()
            if n_dev == 0:
                raise RuntimeError("backend='nccl' needs CUDA GPUs, but this process sees none")
            torch.cuda.set_device(r % n_dev)
            _STATE["device"] = torch.device("cuda", r % n_dev)
        else:
            _STATE["device"] = torch.device("cpu")
        _STATE.update(rank=r, world_size=W, backend=backend)
        store = dist.FileStore(os.path.join(workdir, "store"), W)
        # NCCL: bind the communicator to this rank's GPU up front (no per-barrier device guess)
        bind = {"device_id": _STATE["device"]} if backend == "nccl" else {}
        dist.init_process_group(
            backend,
            store=store,
            rank=r,
            world_size=W,
            timeout=timedelta(seconds=float(timeout_s) + 10.0),
            **bind,
        )
        result = fn(*args, **kwargs)
        blob = pickle.dumps(("ok", result))
        dist.destroy_process_group()
    except BaseException as e:  # report everything, including SystemExit / KeyboardInterrupt
        code = 1
        blob = pickle.dumps(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    with open(result_path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(result_path + ".tmp", result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (communicator destructors may block)


# ---------------------------------------------------------------------------------------------- helpers for fn


def rank() -> int:
    """This process's rank (inside :func:`run_distributed`, or torchrun's ``RANK``)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def device():
    """``cuda:<local rank>`` under NCCL, else ``cpu``."""
    import torch

    if "device" in _STATE:
        return _STATE["device"]
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cp_mesh(name: str = "cp"):
    """A 1-D ``DeviceMesh`` over all ranks, dimension named ``name`` (the context-parallel mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    dev = device()
    return init_device_mesh(dev.type, (world_size(),), mesh_dim_names=(name,))
