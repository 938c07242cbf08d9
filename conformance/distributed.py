"""Multi-process runner for context-parallel cases (gloo on CPU, NCCL on GPUs).

:func:`run_distributed` launches ``world_size`` fresh Python processes, all in **one new process
group** (``os.killpg`` reaches every rank and anything a rank started), rendezvoused through a
``torch.distributed.FileStore`` on a fresh temporary file (never a port). Each rank initialises the
default process group, signals that it is ready, runs ``fn(*args, **kwargs)`` and sends back its
(picklable) result. Start-up (importing torch, joining the group) has its own deadline; the case's
deadline counts from the moment every rank is ready, so a loaded machine's slow start-up does not eat
into it. When a rank raises, dies or a deadline passes, the runner asks the ranks still running for
their Python stacks (``faulthandler`` on ``SIGUSR1``), kills the whole group at once with
``SIGKILL``, reaps it, and raises :class:`DistributedRunError` (or its subclass
:class:`DistributedTimeoutError`) carrying every rank's exception, traceback and output tail.

Faults at their root: when one rank fails, the others usually fail *because* of it (gloo's
"Connection closed by peer", a collective's timeout, NCCL's "remote process exited"). The error names
the root cause first — the rank whose own exception (or death) came first, preferring an exception
that is not a communication error — with its type, message and traceback, and labels every other
rank's error as a follow-on ("rank 0: follow-on error after rank 1 failed"). ``str(error)`` (what
the conformance reports show) leads with the root cause.

No orphans: every rank asks the kernel to kill it when the parent dies (``PR_SET_PDEATHSIG``), and a
small watchdog process (in a session of its own, no torch import) holds the read end of a pipe from
the parent: if the parent dies without saying it finished — ``SIGKILL``, ``SIGTERM``'s default
action, a crash — the pipe reaches end-of-file and the watchdog kills the ranks' process group
(grandchildren included) and deletes the temporary folder.

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
    "find_root",
    "looks_like_follow_on",
    "rank",
    "run_dir",
    "run_distributed",
    "world_size",
]

_TAIL_LINES = 40
_GRACE_S = 1.0  # after the first failure, how long the other ranks get to report their own error
_STACK_DUMP_S = 2.0  # how long hung ranks get to write their stacks before SIGKILL
DEFAULT_STARTUP_TIMEOUT_S = 180.0  # importing torch and joining the group, on a loaded machine

# Text of errors that a rank raises *because another rank failed* (its peer closed the connection,
# a collective waited in vain): such an error is a root cause only if no rank has a better one.
_FOLLOW_ON_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "distbackenderror",
    "distnetworkerror",
    "diststoreerror",
    "remote process exited",
    "nccl communicator was aborted",
    "watchdog caught collective operation timeout",
    "timed out",
    "timeout",
    "socket",
    "econnreset",
    "econnrefused",
)


def looks_like_follow_on(error: str | None) -> bool:
    """True if ``error`` ("Type: message") reads like a communication failure caused by a peer."""
    text = (error or "").lower()
    return any(m in text for m in _FOLLOW_ON_MARKERS)


@dataclass
class RankReport:
    """What one rank did: its exit code, its exception (if any) and the tail of its output.

    ``role`` is filled in by the runner when the case failed: ``"root"`` (the rank whose failure
    came first: the cause), ``"follow-on"`` (it failed or was killed after the root rank failed) or
    ``""`` (it finished, or the case timed out with no rank at fault)."""

    rank: int
    pid: int
    exitcode: int | None  # None: still running when the case was stopped
    status: str  # "ok", "error" (raised), "died" (no report), "timeout" (still running), "killed"
    error: str | None = None  # "ExceptionType: message"
    traceback: str | None = None
    output_tail: str = ""
    failed_at: float | None = None  # time.time() of its exception, or when its death was seen
    role: str = ""
    root_rank: int | None = None  # for a follow-on: the rank at fault

    @property
    def failed(self) -> bool:
        return self.status in ("error", "died")

    def headline(self) -> str:
        """One line: ``rank 1 raised RuntimeError: boom`` / ``rank 1 died (exit code -11, SIGSEGV)``."""
        if self.status == "error":
            return f"rank {self.rank} raised {self.error}"
        if self.status == "died":
            return f"rank {self.rank} died without a report ({self._exit_text() or 'no exit code'})"
        if self.status == "timeout":
            return f"rank {self.rank} was still running at the deadline"
        if self.status == "killed":
            return f"rank {self.rank} was still running when the case was stopped"
        return f"rank {self.rank} finished"

    def _exit_text(self) -> str:
        if self.exitcode is None:
            return ""
        text = f"exit code {self.exitcode}"
        if self.exitcode < 0:
            with contextlib.suppress(ValueError):
                text += f", {signal.Signals(-self.exitcode).name}"
        return text

    def describe(self) -> str:
        status = {"error": "raised", "died": "died without a report"}.get(self.status, self.status)
        details = ", ".join(x for x in (f"pid {self.pid}", self._exit_text()) if x)
        if self.role == "root":
            head = f"root cause: rank {self.rank} {status} ({details})"
        elif self.role == "follow-on" and self.failed:
            head = (
                f"rank {self.rank}: follow-on error after rank {self.root_rank} failed ({status}; {details})"
            )
        elif self.role == "follow-on":
            head = f"rank {self.rank}: {status} after rank {self.root_rank} failed ({details})"
        else:
            head = f"rank {self.rank}: {status} ({details})"
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


def find_root(reports: list[RankReport]) -> RankReport | None:
    """The rank at fault among ``reports``: of the ranks that raised or died, the earliest whose
    error is not a peer's communication failure; if every error reads like one, the earliest."""
    failed = [r for r in reports if r.failed]
    if not failed:
        return None

    def when(r: RankReport) -> float:
        return r.failed_at if r.failed_at is not None else float("inf")

    own = [r for r in failed if not (r.status == "error" and looks_like_follow_on(r.error))]
    return min(own or failed, key=lambda r: (when(r), r.rank))


class DistributedRunError(RuntimeError):
    """A distributed case failed; ``reports`` has one :class:`RankReport` per rank.

    ``root`` is the report of the rank at fault (``None`` for a timeout with every rank still
    running); ``str(error)`` leads with it, the other ranks follow, labelled as follow-on."""

    def __init__(self, summary: str, reports: list[RankReport], pgid: int, elapsed_s: float):
        self.summary = summary
        self.reports = reports
        self.pgid = pgid
        self.pids = [r.pid for r in reports]
        self.elapsed_s = elapsed_s
        self.startup_s: float | None = None  # seconds until every rank had joined the group
        self.root = find_root(reports)
        if self.root is not None:
            for r in reports:
                if r is self.root:
                    r.role, r.root_rank = "root", r.rank
                elif r.status != "ok":
                    r.role, r.root_rank = "follow-on", self.root.rank
        ordered = sorted(reports, key=lambda r: (r is not self.root, r.rank))
        body = "\n".join(r.describe() for r in ordered)
        head = f"{summary} after {elapsed_s:.1f}s"
        if self.root is not None:
            head += f"; root cause: {self.root.headline()}"
            others = [r.rank for r in reports if r.role == "follow-on"]
            if others:
                head += f" (ranks {others}: follow-on after rank {self.root.rank} failed)"
        super().__init__(f"{head}\n{body}")

    @property
    def failed_ranks(self) -> list[int]:
        return [r.rank for r in self.reports if r.status != "ok"]

    @property
    def root_rank(self) -> int | None:
        return None if self.root is None else self.root.rank


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

# The watchdog: no torch, no site packages. It reads the parent's pipe; "pgid N" names the ranks'
# group, "done" means the parent cleans up itself. End-of-file without "done" means the parent died:
# kill the group, delete the folder.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
workdir, pgid, done = sys.argv[1], 0, False
for line in sys.stdin.buffer:
    line = line.decode().strip()
    if line.startswith("pgid "):
        pgid = int(line.split()[1])
    elif line == "done":
        done = True
        break
if not done:
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for _ in range(50):
        shutil.rmtree(workdir, ignore_errors=True)
        if not os.path.exists(workdir):
            break
        time.sleep(0.1)
"""


class _Watchdog:
    """The parent's side of the watchdog process (see the module docstring)."""

    def __init__(self, workdir: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, workdir],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a SIGINT/SIGTERM sent to the parent's group does not reach it
        )

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def watch(self, pgid: int) -> None:
        self._send(f"pgid {pgid}")

    def stand_down(self) -> None:
        """The parent cleaned up itself: the watchdog exits without touching anything."""
        self._send("done")
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - it only reads a pipe
            self.proc.kill()
            self.proc.wait()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    startup_timeout_s: float | None = None,
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
        timeout_s: deadline for ``fn``, counted from the moment every rank has imported torch and
            joined the process group (the process group's own timeout is a little longer, so the
            supervisor reports a hang — with stacks — before NCCL/gloo do).
        startup_timeout_s: deadline for start-up (launch to every rank joined); default
            ``max(180, timeout_s)``.
        threads_per_rank: ``torch.set_num_threads`` in each rank (default: ``OMP_NUM_THREADS`` or the
            CPU cores, divided by the world size, at least 1), so ranks do not oversubscribe the machine.
        env: extra environment variables for the ranks.

    Raises:
        DistributedRunError: a rank raised or died (every rank's report is attached; the root cause
            first, the other ranks' errors labelled follow-on).
        DistributedTimeoutError: a deadline passed (the hung ranks' stacks are attached).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if startup_timeout_s is None:
        startup_timeout_s = max(DEFAULT_STARTUP_TIMEOUT_S, timeout_s)
    if not startup_timeout_s > 0:
        raise ValueError(f"startup_timeout_s must be positive, got {startup_timeout_s!r}")
    try:
        payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
    except Exception as e:
        raise TypeError(
            f"run_distributed needs a picklable fn/args/kwargs (a module-level function): {e}"
        ) from e
    cores = int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or os.cpu_count() or 1  # a bounded parent's share
    threads = threads_per_rank or max(1, cores // world_size)
    workdir = tempfile.mkdtemp(prefix="olmo_attn_dist_")
    procs: list[subprocess.Popen] = []
    logs: list[Any] = []
    pgid = 0
    watchdog: _Watchdog | None = None
    start = time.monotonic()
    try:
        watchdog = _Watchdog(workdir)
        with open(os.path.join(workdir, "sys_path.json"), "w") as f:
            json.dump([os.getcwd() if p == "" else p for p in sys.path], f)
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
                watchdog.watch(pgid)
        return _supervise(procs, workdir, pgid, start, timeout_s, startup_timeout_s)
    finally:
        if pgid:
            _killpg(pgid, signal.SIGKILL)  # anything left (ranks or what they started)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
                p.wait(timeout=10)
        for log in logs:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if watchdog is not None:
            watchdog.stand_down()


def _all_ready(workdir: str, n: int) -> bool:
    return all(os.path.exists(os.path.join(workdir, f"ready{r}")) for r in range(n))


def _supervise(
    procs: list[subprocess.Popen],
    workdir: str,
    pgid: int,
    start: float,
    timeout_s: float,
    startup_timeout_s: float,
) -> list[Any]:
    W = len(procs)
    deadline = start + startup_timeout_s
    ready_at: float | None = None
    failed_at: float | None = None
    timed_out = False
    seen_exit: dict[int, float] = {}  # rank -> time.time() its exit was first seen
    while True:
        codes = [p.poll() for p in procs]
        for r, c in enumerate(codes):
            if c is not None and r not in seen_exit:
                seen_exit[r] = time.time()
        if all(c == 0 for c in codes):
            break
        now = time.monotonic()
        if ready_at is None and _all_ready(workdir, W):
            ready_at = now
            deadline = now + timeout_s
        if failed_at is None and any(c is not None and c != 0 for c in codes):
            failed_at = now
        if failed_at is not None and (all(c is not None for c in codes) or now - failed_at > _GRACE_S):
            break
        if now > deadline:
            timed_out = True
            break
        time.sleep(0.01)
    startup_s = None if ready_at is None else ready_at - start

    if failed_at is None and not timed_out:
        results = []
        reports = []
        for r in range(W):
            res = _read_result(os.path.join(workdir, f"result{r}.pkl"))
            if res is None or res[0] != "ok":
                reports.append(_report(r, procs[r], workdir, "died", seen_exit=seen_exit.get(r)))
            else:
                results.append(res[1])
        if len(results) == W:
            return results
        err = DistributedRunError(
            "a rank exited cleanly without a result", reports, pgid, time.monotonic() - start
        )
        err.startup_s = startup_s
        raise err

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
        reports.append(_report(r, p, workdir, status, stopped=id(p) in still, seen_exit=seen_exit.get(r)))
    elapsed = time.monotonic() - start
    if timed_out:
        hung = [rep.rank for rep in reports if rep.status == "timeout"]
        if ready_at is None:
            waiting = [r for r in range(W) if not os.path.exists(os.path.join(workdir, f"ready{r}"))]
            summary = (
                f"distributed case timed out in start-up after {startup_timeout_s:g}s (ranks {waiting} "
                f"had not joined the process group; ranks {hung} still running; killed)"
            )
        else:
            summary = (
                f"distributed case timed out after {timeout_s:g}s (counted from {startup_s:.1f}s, when "
                f"every rank had joined the group; ranks {hung} still running; killed)"
            )
        err: DistributedRunError = DistributedTimeoutError(summary, reports, pgid, elapsed)
    else:
        bad = [rep.rank for rep in reports if rep.failed]
        err = DistributedRunError(f"distributed case failed on ranks {bad}", reports, pgid, elapsed)
    err.startup_s = startup_s
    raise err


def _report(
    r: int,
    p: subprocess.Popen,
    workdir: str,
    status: str,
    stopped: bool = False,
    seen_exit: float | None = None,
) -> RankReport:
    res = _read_result(os.path.join(workdir, f"result{r}.pkl"))
    rep = RankReport(
        rank=r,
        pid=p.pid,
        exitcode=None if stopped else p.returncode,
        status=status,
        output_tail=_tail(os.path.join(workdir, f"rank{r}.log")),
        failed_at=None if stopped else seen_exit,
    )
    if res is not None and res[0] == "error":
        rep.status = "error"
        rep.error, rep.traceback = res[1], res[2]
        if len(res) > 3:
            rep.failed_at = res[3]
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
        _STATE.update(rank=r, world_size=W, backend=backend, workdir=workdir)
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
        with open(os.path.join(workdir, f"ready{r}"), "w"):
            pass  # the case's deadline starts once every rank is here
        result = fn(*args, **kwargs)
        blob = pickle.dumps(("ok", result))
        dist.destroy_process_group()
    except BaseException as e:  # report everything, including SystemExit / KeyboardInterrupt
        code = 1
        when = time.time()
        blob = pickle.dumps(("error", f"{type(e).__name__}: {e}", traceback.format_exc(), when))
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


def run_dir() -> str | None:
    """The runner's temporary folder for this case (``None`` outside :func:`run_distributed`); it is
    deleted when the case ends, or by the watchdog when the parent dies."""
    return _STATE.get("workdir")


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
