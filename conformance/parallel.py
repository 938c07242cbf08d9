"""``olmo-attn conformance --jobs N``: the selected cases in N worker processes on this host, merged.

The parent builds the case list (so usage errors, ``--list`` and ``--require`` behave as in a
single-process run), then starts one worker per non-empty shard: ``python -m conformance <the same
options> --shard i/N --jobs 1 --no-progress --json <tmp>/shard-i.json``. Shards split by problem
(``cases.build_cases``), so pairwise checks stay inside one worker. Each worker gets
``OMP_NUM_THREADS`` and ``TORCHINDUCTOR_COMPILE_THREADS`` = cores / N (unless already set) and one
of the visible GPUs, round-robin over ``CUDA_VISIBLE_DEVICES`` (or all devices). The ``multigpu``
tier needs every GPU: its cases run in the parent after the workers end.

A worker that dies (a signal, an exit without its report) loses nothing the others did: its cases
without a result (it checkpoints its JSON every few seconds) are reported as *failed* with its exit
status and the tail of its stderr. SIGINT / SIGTERM of the parent stops every worker's process
group. The verdict and exit code come from the parent's options, as in a one-process run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .cases import TIERS, Case, build_cases
from .results import FAILED, SKIPPED, CaseResult
from .runner import EXIT_FAILED, EXIT_NOT_VERIFIED, EXIT_OK, RunReport, run_cases

MAX_AUTO_JOBS = 8
CORES_PER_AUTO_JOB = 4
PROGRESS_EVERY_S = 15.0  # the parent's progress line while workers run
WORKER_CHECKPOINT_S = 10.0  # how often a worker rewrites its JSON (progress, and what survives a crash)
STOP_GRACE_S = 5.0  # SIGTERM → SIGKILL of a worker's process group
TAIL_LINES = 6  # stderr lines of a dead worker quoted in each of its failed cases
TAIL_CHARS = 600
THREAD_VARS = ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")
SINGLE_GPU_TIERS = tuple(t for t in TIERS if t != "multigpu")


def cpu_count() -> int:
    """Cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_jobs(cuda_available: bool, cores: int) -> int:
    """``--jobs auto``: 1 without CUDA; on a CUDA host one worker per 4 cores, 1 to 8."""
    if not cuda_available:
        return 1
    return max(1, min(MAX_AUTO_JOBS, cores // CORES_PER_AUTO_JOB))


def resolve_jobs(
    value: int | str | None, *, cuda_available: bool | None = None, cores: int | None = None
) -> int:
    """The worker count for ``--jobs value`` (``None`` = not given = ``auto``)."""
    if isinstance(value, int):
        return value
    if cuda_available is None:
        import torch  # the harness has imported it already (cases.py)

        cuda_available = torch.cuda.is_available()
    return auto_jobs(cuda_available, cpu_count() if cores is None else cores)


def visible_gpus(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The GPUs workers are spread over: the ``CUDA_VISIBLE_DEVICES`` entries (ids or UUIDs) when it
    is set, else ``0 .. device_count - 1``; none when CUDA sees no device."""
    if device_count <= 0:
        return []
    if "CUDA_VISIBLE_DEVICES" in environ:
        entries = [e.strip() for e in environ["CUDA_VISIBLE_DEVICES"].split(",") if e.strip()]
        return entries[:device_count]
    return [str(i) for i in range(device_count)]


def worker_env(
    environ: Mapping[str, str], *, slot: int, workers: int, gpus: Sequence[str], cores: int
) -> dict[str, str]:
    """The environment of worker ``slot`` (0-based) of ``workers``: bounded thread pools, one GPU."""
    env = dict(environ)
    per = str(max(1, cores // max(1, workers)))
    for var in THREAD_VARS:
        env.setdefault(var, per)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    root = str(Path(__file__).resolve().parent.parent)  # where `python -m conformance` finds the package
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


def worker_argv(
    args: argparse.Namespace,
    *,
    tiers: Sequence[str],
    backends: Sequence[str] | None,
    require: Sequence[str] | None,
    shard: tuple[int, int],
    json_path: str | os.PathLike,
    deadline: float | None = None,
) -> list[str]:
    """``python -m conformance`` with the user's case selection and run options, for one shard; the
    parent's outputs (``--json``/``--junit``/``--markdown``), ``--list``, ``--merge`` are not passed.
    ``deadline`` (epoch seconds: the parent's start + ``--time-budget``): a worker starts no case
    after it, however long the worker took to start (importing torch and a backend can take 20 s)."""
    argv = [sys.executable, "-m", "conformance", "--tier", ",".join(tiers)]
    argv.append("--quick" if args.quick else "--full")
    if backends:
        argv += ["--backends", *backends]
    if args.pattern:
        argv.append(f"-k{args.pattern}")  # attached: a pattern may start with "-"
    if require:
        argv += ["--require", *require]
    if args.strict:
        argv.append("--strict")
    if args.compile_cache:
        argv += ["--compile-cache", str(args.compile_cache)]
    if args.time_budget is not None:
        argv += ["--time-budget", repr(float(args.time_budget))]
        if deadline is not None:
            argv += ["--deadline", repr(float(deadline))]
    argv += ["--seed", str(args.seed), "--shard", f"{shard[0]}/{shard[1]}", "--jobs", "1", "--no-progress"]
    argv += ["--checkpoint-every", repr(WORKER_CHECKPOINT_S), "--json", str(json_path)]
    return argv


def exit_text(returncode: int | None) -> str:
    """``"was killed by signal SIGSEGV (exit status -11)"`` / ``"exited with status 2"``."""
    if returncode is None:
        return "did not finish"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by signal {name} (exit status {returncode})"
    return f"exited with status {returncode}"


def text_tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last ``lines`` non-empty lines of ``text``, joined with `` | ``, at most ``chars`` long."""
    kept = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    out = " | ".join(kept)
    return out if len(out) <= chars else "…" + out[-(chars - 1) :]


def _read_tail(path: Path, nbytes: int = 16384) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def unreported_results(
    cases: Sequence[Case],
    report: RunReport | None,
    *,
    worker: str,
    returncode: int | None,
    stderr_tail: str,
) -> list[CaseResult]:
    """Failed results for the ``cases`` of one worker that its ``report`` (its final or last
    checkpointed JSON; ``None``: it left none) does not contain. A crash is a fault the user must see,
    so these fail; the worker's exit status and stderr tail say what happened."""
    seen = {r.case.id for r in report.results} if report is not None else set()
    missing = [c for c in cases if c.id not in seen]
    if not missing:
        return []
    how = exit_text(returncode)
    where = "before reporting this case" if report is not None else "without writing a report"
    msg = f"worker {worker} {how} {where}; its stderr ends: {stderr_tail or '(nothing)'}"
    return [CaseResult(c, FAILED, [], msg, 0.0) for c in missing]


@dataclass
class Worker:
    """One worker process: its shard, the cases the parent expects from it, its files."""

    shard: tuple[int, int]
    cases: list[Case]
    argv: list[str]
    env: dict[str, str]
    json_path: Path
    out_path: Path
    err_path: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    done: int = 0  # cases reported so far (from its checkpoints)
    stopped: bool = False  # stopped by the parent (SIGINT / SIGTERM of the run), not by a fault
    failed: int = 0
    _mtime: float = field(default=-1.0, repr=False)

    @property
    def name(self) -> str:
        return f"{self.shard[0]}/{self.shard[1]}"

    def start(self) -> None:
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: stopped as a whole, with its children
            )

    def poll(self) -> bool:
        """True once the worker has exited (then its leftover children are stopped too)."""
        if self.returncode is not None:
            return True
        if self.proc is None:
            return False
        rc = self.proc.poll()
        if rc is None:
            return False
        self.returncode = rc
        self.kill_group(signal.SIGKILL)  # e.g. compile workers a crashed worker left behind
        return True

    def kill_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def count(self) -> None:
        """Update ``done`` / ``failed`` from its JSON when it changed (a half-written one is skipped)."""
        try:
            mtime = self.json_path.stat().st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        try:
            doc = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        ids = {c.id for c in self.cases}
        mine = [r for r in doc.get("results", []) if r.get("id") in ids]
        self.done, self.failed = len(mine), sum(r.get("status") == FAILED for r in mine)
        self._mtime = mtime

    def report(self) -> RunReport | None:
        from .report import load_json

        try:
            return load_json(self.json_path)
        except (OSError, ValueError, KeyError, TypeError):
            return None


class _Terminated(Exception):
    """SIGTERM of the parent while workers run."""


def stop_all(workers: Sequence[Worker], grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every running worker's process group, SIGKILL what is left after ``grace_s``; returns
    how many were running."""
    running = [w for w in workers if w.proc is not None and not w.poll()]
    for w in running:
        w.stopped = True
        w.kill_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in running:
        if w.proc is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        w.kill_group(signal.SIGKILL)
        w.proc.wait()
        w.poll()
    return len(running)


def plan_workers(
    args: argparse.Namespace,
    *,
    jobs: int,
    tiers: Sequence[str],
    backends: Sequence[str] | None,
    require: Sequence[str] | None,
    tmpdir: Path,
    environ: Mapping[str, str] | None = None,
    gpus: Sequence[str] | None = None,
    cores: int | None = None,
    deadline: float | None = None,
) -> list[Worker]:
    """One :class:`Worker` per non-empty shard of the single-GPU tiers in ``tiers``."""
    environ = os.environ if environ is None else environ
    if gpus is None:
        import torch

        gpus = visible_gpus(environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    cores = cpu_count() if cores is None else cores
    worker_tiers = [t for t in tiers if t in SINGLE_GPU_TIERS]
    shards: list[tuple[tuple[int, int], list[Case]]] = []
    if worker_tiers:
        for i in range(1, jobs + 1):
            cases = build_cases(
                tiers=worker_tiers,
                backends=backends,
                quick=args.quick,
                seed=args.seed,
                pattern=args.pattern,
                shard=(i, jobs),
            )
            if cases:
                shards.append(((i, jobs), cases))
    workers = []
    for slot, (shard, cases) in enumerate(shards):
        json_path = tmpdir / f"shard-{shard[0]}.json"
        workers.append(
            Worker(
                shard=shard,
                cases=cases,
                argv=worker_argv(
                    args,
                    tiers=worker_tiers,
                    backends=backends,
                    require=require,
                    shard=shard,
                    json_path=json_path,
                    deadline=deadline,
                ),
                env=worker_env(environ, slot=slot, workers=len(shards), gpus=gpus, cores=cores),
                json_path=json_path,
                out_path=tmpdir / f"shard-{shard[0]}.out",
                err_path=tmpdir / f"shard-{shard[0]}.err",
            )
        )
    return workers


def _run_workers(
    workers: Sequence[Worker],
    *,
    progress: bool,
    stream: TextIO,
    t0: float,
    on_tick: Callable[[], None] | None = None,
    tick_every_s: float = 30.0,
) -> int | None:
    """Start the workers, print a progress line every ``PROGRESS_EVERY_S`` and call ``on_tick``
    every ``tick_every_s`` until all have exited. On SIGINT / SIGTERM: stop them all and return
    that signal's number (the caller reports what they finished); else ``None``."""
    total = sum(len(w.cases) for w in workers)

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: no SIGTERM handler can be set
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for w in workers:
            w.start()
        next_line = time.monotonic() + PROGRESS_EVERY_S
        next_tick = time.monotonic() + tick_every_s
        while not all(w.poll() for w in workers):
            time.sleep(0.2)
            if on_tick is not None and time.monotonic() >= next_tick:
                on_tick()
                next_tick = time.monotonic() + tick_every_s
            if progress and time.monotonic() >= next_line:
                for w in workers:
                    w.count()
                running = sum(not w.poll() for w in workers)
                print(
                    f"[jobs] {sum(w.done for w in workers)}/{total} cases done, "
                    f"{sum(w.failed for w in workers)} failed, {running} of {len(workers)} workers running "
                    f"({time.monotonic() - t0:.0f} s)",
                    file=stream,
                    flush=True,
                )
                next_line = time.monotonic() + PROGRESS_EVERY_S
    except (KeyboardInterrupt, _Terminated) as e:
        n = stop_all(workers)
        print(f"olmo-attn conformance --jobs: interrupted; stopped {n} running worker(s)", file=sys.stderr)
        return int(signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except BaseException:
        stop_all(workers)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return None


def _multigpu_report(
    cases: Sequence[Case],
    *,
    options: dict[str, Any],
    progress: bool,
    time_budget_s: float | None,
    elapsed: float,
) -> RunReport | None:
    """The multigpu tier's cases, in this process with every GPU (after the workers)."""
    if not cases:
        return None
    remaining = None if time_budget_s is None else time_budget_s - elapsed
    if remaining is not None and remaining <= 0:
        from .hardware import fingerprint

        reason = f"not started: the run's time budget of {time_budget_s:g} s was used up"
        return RunReport(
            [CaseResult(c, SKIPPED, [], reason, 0.0) for c in cases], fingerprint(), options, time.time()
        )
    return run_cases(cases, progress=progress, options=options, time_budget_s=remaining)


def interrupted_reason(signum: int) -> str:
    """The skip reason of cases an interrupted run did not finish."""
    return f"interrupted: the run was stopped by {signal.Signals(signum).name} before this case finished"


def run_parallel(
    args: argparse.Namespace,
    cases: Sequence[Case],
    *,
    jobs: int,
    tiers: Sequence[str],
    backends: Sequence[str] | None,
    require: Sequence[str] | None,
    options: dict[str, Any],
    stream: TextIO | None = None,
    checkpoint: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Run ``cases`` (the parent's selection) in ``jobs`` worker processes plus, for the multigpu tier,
    this process; one merged report with the parent's ``options`` (so the same verdict).

    ``checkpoint`` (``--json``) gets the merged report of what the workers finished so far every
    ``args.checkpoint_every`` seconds. SIGINT / SIGTERM stop every worker; the report then holds what
    they finished, the rest skipped as interrupted, and ``options["interrupted"]`` names the signal."""
    from . import report as rep
    from .hardware import fingerprint, merge_fingerprints
    from .provenance import run_provenance

    stream = stream or sys.stdout
    progress = not args.no_progress
    started, t0 = time.time(), time.monotonic()
    deadline = None if args.time_budget is None else started + float(args.time_budget)
    tmpdir = Path(tempfile.mkdtemp(prefix="olmo-attn-conformance-jobs-"))
    keep_logs = False
    try:
        workers = plan_workers(
            args, jobs=jobs, tiers=tiers, backends=backends, require=require, tmpdir=tmpdir, deadline=deadline
        )
        multigpu = [c for c in cases if c.tier == "multigpu"]
        if progress:
            threads = workers[0].env.get("OMP_NUM_THREADS") if workers else "-"
            gpus = ",".join(
                dict.fromkeys(
                    w.env["CUDA_VISIBLE_DEVICES"] for w in workers if "CUDA_VISIBLE_DEVICES" in w.env
                )
            )
            print(
                f"[jobs] {sum(len(w.cases) for w in workers)} cases in {len(workers)} worker(s) "
                f"({jobs} shards; {threads} threads each"
                + (f"; GPUs {gpus}" if gpus else "")
                + ")"
                + (f"; then the multigpu tier's {len(multigpu)} cases in this process" if multigpu else ""),
                file=stream,
                flush=True,
            )
        rank = {t: i for i, t in enumerate(TIERS)}
        prov = run_provenance(options, seed=args.seed)
        prov["worker_commands"] = [shlex.join(w.argv) for w in workers]

        def build(results: list[CaseResult], reports: list[RunReport], opts: dict[str, Any]) -> RunReport:
            merged = rep.merge(reports) if reports else None
            fps = [fingerprint()] + ([merged.fingerprint] if merged else [])
            return RunReport(
                sorted(
                    (merged.results if merged else []) + results,
                    key=lambda r: rank.get(r.case.tier, len(rank)),
                ),
                merge_fingerprints(fps),
                dict(opts, jobs=jobs, busy_s=round(sum(r.duration_s for r in reports), 3)),
                started,
                time.monotonic() - t0,
                prov,
            )

        def tick() -> None:  # what the workers have checkpointed, merged (unfinished cases left out)
            if checkpoint is None:
                return
            got = [r for r in (w.report() for w in workers) if r is not None]
            with contextlib.suppress(ValueError):
                checkpoint(build([], got, options))

        signum = _run_workers(
            workers, progress=progress, stream=stream, t0=t0, on_tick=tick, tick_every_s=args.checkpoint_every
        )
        reports: list[RunReport] = []
        unfinished: list[CaseResult] = []
        for w in workers:
            got = w.report()
            if got is not None:
                reports.append(got)
            if w.stopped:  # stopped by us: what it did not report was interrupted, not a crash
                seen = {r.case.id for r in got.results} if got is not None else set()
                reason = interrupted_reason(signum)
                unfinished += [CaseResult(c, SKIPPED, [], reason, 0.0) for c in w.cases if c.id not in seen]
                continue
            tail = _read_tail(w.err_path)
            lost = unreported_results(
                w.cases, got, worker=w.name, returncode=w.returncode, stderr_tail=text_tail(tail)
            )
            abnormal = w.returncode not in (EXIT_OK, EXIT_FAILED, EXIT_NOT_VERIFIED)
            if lost or abnormal:
                keep_logs = True
                print(
                    f"olmo-attn conformance --jobs: worker {w.name} (pid {w.proc.pid if w.proc else '?'}) "
                    f"{exit_text(w.returncode)}; {len(lost)} of its {len(w.cases)} cases unreported "
                    f"(reported as failed); its stderr ends:\n" + "\n".join(tail.splitlines()[-40:]),
                    file=sys.stderr,
                )
            unfinished += lost
        if signum is not None:
            reason = interrupted_reason(signum)
            unfinished += [CaseResult(c, SKIPPED, [], reason, 0.0) for c in multigpu]
            return build(unfinished, reports, dict(options, interrupted=signal.Signals(signum).name))
        mg = _multigpu_report(
            multigpu,
            options=options,
            progress=progress,
            time_budget_s=args.time_budget,
            elapsed=time.monotonic() - t0,
        )
        if mg is not None:
            reports.append(mg)
        return build(unfinished, reports, options)
    finally:
        if keep_logs:
            print(f"olmo-attn conformance --jobs: worker logs kept in {tmpdir}", file=sys.stderr)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)


__all__ = [
    "Worker",
    "auto_jobs",
    "exit_text",
    "interrupted_reason",
    "plan_workers",
    "resolve_jobs",
    "run_parallel",
    "stop_all",
    "text_tail",
    "unreported_results",
    "visible_gpus",
    "worker_argv",
    "worker_env",
]
