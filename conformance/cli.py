"""The harness's own command: ``python -m conformance`` = ``olmo-attn conformance``; ``olmo-attn info``.

``olmo-attn`` (``olmo_attn/cli.py``) is a thin entry point: it imports this module only when one
of these subcommands runs, so importing ``olmo_attn`` or asking ``olmo-attn --version`` never loads
the harness.

* ``olmo-attn conformance [--tier T] [--quick|--full] [--backends B ...] [-k PATTERN] [--seed N]
  [--require B ...] [--strict] [--compile-cache DIR] [--jobs N|auto] [--json F] [--junit F]
  [--markdown F]`` — run the conformance harness; ``--jobs N`` runs the selected cases in N worker
  processes on this host (``conformance/parallel.py``: shards by problem, one GPU each round-robin,
  the multigpu tier afterwards in the parent, a dead worker's unreported cases fail) and merges them
  into one report with the same verdict; ``auto`` (default): 1 without CUDA, else cores / 4 (1 to 8).
  Exit codes: 0 cases ran, none failed and everything named (tiers, backends, ``-k``, ``--require``)
  was exercised; 1 a case failed; 2 a usage error; 3 nothing, or not everything
  requested, was verified (or, with ``--strict``, a case was skipped); 128 + N when stopped by
  signal N (SIGINT 130, SIGTERM 143): the reports are still written, with what finished and the rest
  skipped as interrupted. With no arguments: the
  configuration, CPU and multi-process tiers (plus gpu / multigpu where CUDA is available), quick mode.
* ``olmo-attn info [--json]`` — provenance, the environment fingerprint and the capability table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

TIER_CHOICES = "config | cpu | multiproc | gpu | multigpu | all (comma-separated for several)"
EXIT_USAGE = 2


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_jobs(text: str) -> int | str:
    """``--jobs`` value: a whole number >= 1 or ``auto`` (an ``argparse`` type)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"--jobs takes a whole number >= 1 or 'auto', got {text!r}; e.g. --jobs 4 (--jobs 1: run in "
            "this process)"
        )
    return n


def add_conformance_args(p: argparse.ArgumentParser) -> None:
    """The options of ``olmo-attn conformance`` (``python -m conformance``), added to ``p``."""
    p.add_argument(
        "--tier",
        action="append",
        help=f"tiers to run, cheapest first: {TIER_CHOICES}; default: config,cpu,multiproc "
        "(+gpu,multigpu with CUDA)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=True,
        help="small shapes, a covering subset of the matrix (default)",
    )
    mode.add_argument(
        "--full",
        dest="quick",
        action="store_false",
        help="every point of the matrix, larger and more awkward shapes",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        metavar="B",
        help="backends to test (default: all; unavailable ones are reported as skipped)",
    )
    p.add_argument(
        "-k",
        dest="pattern",
        metavar="PATTERN",
        help="pytest-style filter on case ids: substrings with and/or/not, e.g. 'cpu and window'",
    )
    p.add_argument(
        "--require",
        nargs="+",
        metavar="B",
        help="exit 3 unless each of these backends ran cases (outside the config tier) and none failed",
    )
    p.add_argument("--strict", action="store_true", help="any skipped case makes the run exit 3")
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep torch.compile's Inductor and Triton caches and flash-attn-4's CuTe DSL cache in DIR "
        "(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=DIR/cute), so a "
        "second run reuses the first run's kernels",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every case's shapes and inputs (default 0)")
    p.add_argument("--json", metavar="FILE", help="write the JSON report")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--markdown", metavar="FILE", help="write the Markdown report")
    p.add_argument("--list", action="store_true", help="print the selected case ids and exit")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: merge these JSON reports (one machine, a run split to fit a time limit) and "
        "write/print the combined report",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (1-based; cases split by problem, so pairwise checks stay whole): "
        "parallel runs, e.g. one per GPU, merged afterwards with --merge",
    )
    p.add_argument(
        "--jobs",
        type=parse_jobs,
        metavar="N",
        help="run the selected cases in N worker processes on this host (split by problem, one GPU each "
        "round-robin, the multigpu tier afterwards in this process), merged into one report; 'auto' "
        "(default): 1 without CUDA, else cores / 4 (1 to 8); 1: in this process",
    )
    p.add_argument(
        "--checkpoint-every", type=float, default=30.0, help=argparse.SUPPRESS
    )  # seconds between --json checkpoints (--jobs workers use a shorter one)
    p.add_argument(
        "--deadline", type=float, default=None, help=argparse.SUPPRESS
    )  # epoch seconds after which no case starts (--jobs workers: the parent's start + --time-budget)
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no case after this many seconds; the rest are reported as skipped (runs that must fit "
        "a time limit, e.g. one device call); with --json the report is also checkpointed every 30 s",
    )


def run_conformance(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run (or merge, or list) what ``args`` asks for; ``argv``: the arguments as typed (recorded as
    the report's command). Returns the exit code."""
    if args.shard and args.jobs not in (None, 1):
        print(
            f"olmo-attn conformance: --jobs {args.jobs} and --shard {args.shard} cannot be combined: --jobs "
            "splits the run into shards itself; drop --shard, or use --jobs 1 to run that one shard here",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.compile_cache:  # before the harness imports torch or compiles anything
        from .compile_stats import use_compile_cache

        try:
            use_compile_cache(args.compile_cache)
        except (OSError, RuntimeError) as e:
            print(f"olmo-attn conformance --compile-cache {args.compile_cache}: {e}", file=sys.stderr)
            return EXIT_USAGE
    from . import report as rep
    from .cases import build_cases, parse_shard
    from .provenance import command_line
    from .runner import parse_tiers, run_cases

    if args.merge:
        try:
            report = rep.merge([rep.load_json(p) for p in args.merge])
        except (OSError, ValueError, KeyError) as e:
            print(f"olmo-attn conformance --merge: {e}", file=sys.stderr)
            return EXIT_USAGE
        return _finish(report, args)
    try:
        tiers = parse_tiers(_split(args.tier))
        backends = _split(args.backends)
        shard = parse_shard(args.shard)
        cases = build_cases(
            tiers=tiers,
            backends=backends,
            quick=args.quick,
            seed=args.seed,
            pattern=args.pattern,
            shard=shard,
        )
    except ValueError as e:
        print(f"olmo-attn conformance: {e}", file=sys.stderr)
        return EXIT_USAGE
    require = _split(args.require)
    if require:
        from .cases import GDN_IMPLS
        from .subjects import all_subjects

        known = {s.name for s in all_subjects()} | set(GDN_IMPLS)
        unknown = [b for b in require if b not in known]
        if unknown:
            print(
                f"olmo-attn conformance: --require: unknown backend(s) {unknown}; choose among "
                f"{sorted(known)}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    if args.list:
        for c in cases:
            print(c.id + (f"  [skipped: {c.skip_reason}]" if c.skip_reason else ""))
        return 0
    options = {
        "tiers": tiers,
        "backends": backends or "all",
        "mode": "quick" if args.quick else "full",
        "pattern": args.pattern,
        "seed": args.seed,
        "shard": args.shard,
        "explicit_tiers": tiers if args.tier else None,
        "explicit_backends": backends,
        "require": require,
        "strict": args.strict,
        "command": command_line(["olmo-attn", "conformance", *(sys.argv[1:] if argv is None else argv)]),
    }
    from .parallel import resolve_jobs

    if args.deadline is not None and args.time_budget is not None:  # a --jobs worker: the parent's clock
        args.time_budget = max(0.0, min(args.time_budget, args.deadline - time.time()))
    checkpoint = None
    if args.json:
        json_path = args.json

        def checkpoint(partial: Any) -> None:  # written whole, then renamed: a reader never sees half
            tmp = f"{json_path}.partial"
            rep.write_json(partial, tmp)
            os.replace(tmp, json_path)

    jobs = 1 if args.shard else resolve_jobs(args.jobs)
    options["jobs"] = jobs
    if jobs > 1:
        from .parallel import run_parallel

        try:
            report = run_parallel(
                args,
                cases,
                jobs=jobs,
                tiers=tiers,
                backends=backends,
                require=require,
                options=options,
                checkpoint=checkpoint,
            )
        except ValueError as e:  # the workers' reports would not merge (e.g. GPUs of different models)
            print(f"olmo-attn conformance --jobs {jobs}: {e}; run with --jobs 1", file=sys.stderr)
            return EXIT_USAGE
        return _finish(report, args)
    done: list[Any] = []
    try:
        with _signals_raise():
            report = run_cases(
                cases,
                progress=not args.no_progress,
                options=options,
                time_budget_s=args.time_budget,
                checkpoint=checkpoint,
                checkpoint_every_s=args.checkpoint_every,
                on_result=done.append,
            )
    except _Interrupted as e:
        report = _interrupted_report(cases, done, options, e.signum, seed=args.seed)
    return _finish(report, args)


class _Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM of an in-process run (a KeyboardInterrupt: no case's error handling takes it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Any:
    """SIGINT / SIGTERM raise :class:`_Interrupted` in the main thread (outside it: unchanged)."""
    import signal

    def on_signal(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted_report(
    cases: Sequence[Any], done: Sequence[Any], options: dict[str, Any], signum: int, *, seed: int
) -> Any:
    """What an in-process run finished before ``signum``; every other case skipped as interrupted."""
    import signal

    from .hardware import fingerprint
    from .parallel import interrupted_reason
    from .provenance import run_provenance
    from .results import SKIPPED, CaseResult
    from .runner import RunReport

    seen = {r.case.id for r in done}
    rest = [CaseResult(c, SKIPPED, [], interrupted_reason(signum), 0.0) for c in cases if c.id not in seen]
    prov = run_provenance(options, seed=seed)
    return RunReport(
        [*done, *rest],
        fingerprint(),
        dict(options, interrupted=signal.Signals(signum).name),
        time.time(),
        0.0,
        prov,
    )


def _finish(report: Any, args: argparse.Namespace) -> int:
    """Print the matrix, write the requested files, return the exit code (``report``: a RunReport)."""
    from . import report as rep
    from .runner import print_summary

    print_summary(report, sys.stdout)
    for path, writer in (
        (args.json, rep.write_json),
        (args.junit, rep.write_junit),
        (args.markdown, rep.write_markdown),
    ):
        if path:
            written = writer(report, path)
            print(f"wrote {written}")
    interrupted = report.options.get("interrupted")
    if interrupted:  # the shell's convention for a command stopped by a signal
        import signal

        return 128 + int(signal.Signals[interrupted])
    return report.exit_code


def run_info(args: argparse.Namespace) -> int:
    """``olmo-attn info``: provenance, the environment fingerprint and the capability table."""
    from .hardware import capability_rows, fingerprint, format_fingerprint
    from .provenance import git_commit, olmo_attn_version

    fp = fingerprint()
    prov = {"olmo_attn_version": olmo_attn_version(), "git_commit": git_commit()}
    gdn = _gdn_order(fp.arch)
    if args.json:
        print(json.dumps({"provenance": prov, **fp.as_dict(), "gdn_kernel_order": gdn}, indent=1))
        return 0
    print(f"olmo-attn {prov['olmo_attn_version']}   commit: {prov['git_commit'] or 'not a git checkout'}")
    for line in format_fingerprint(fp):
        print(line)
    if fp.arch == "cpu":
        print(
            "GatedDeltaNet backend='auto' on cpu: our PyTorch kernel (the Triton and fla kernels need CUDA)"
        )
    else:
        measured = "measured on it" if gdn["measured"] else "not measured on it: ours first"
        print(
            f"GatedDeltaNet backend='auto' on {fp.arch} ({measured}; a kernel runs where its guard lets it):"
        )
        for slot, order in gdn["order"].items():
            print(f"    {slot.replace('_', ' ')}: {' > '.join([*order, 'torch'])}")
    rows = capability_rows(fp)
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="capability table")
            for k in rows[0]:
                table.add_column(k, overflow="fold")
            for r in rows:
                table.add_row(*(str(v) for v in r.values()))
            Console().print(table)
            return 0
        except ImportError:
            pass
    keys = list(rows[0])
    print()
    for r in rows:  # transposed: one block per backend, wrapped under 100 columns
        print(f"{r['backend']} ({r['version']}): {r['status']}")
        for k in keys[3:]:
            if r[k]:
                for i, line in enumerate(textwrap.wrap(str(r[k]), 96 - len(k)) or [""]):
                    print(f"    {k + ':' if i == 0 else ' ' * (len(k) + 1)} {line}")
    return 0


def _gdn_order(arch: str) -> dict[str, Any]:
    """GatedDeltaNet's chunk-kernel order on ``arch`` per pass and layout (what ``backend="auto"``
    walks; our PyTorch kernel closes each)."""
    from olmo_attn.recurrent import kernel_order as ko

    order = {
        f"{pas}_{lay}": list(ko.kernel_order(arch, train=pas == "train", documents=lay == "documents"))
        for pas in ("train", "infer")
        for lay in ("rows", "documents")
    }
    return {"measured": arch in ko.load_orders(), "order": order}


def _pipe_safe(fn: Callable[[], int]) -> int:
    """Run ``fn``; a reader that closed the pipe early (``| head``) ends the command quietly."""
    try:
        code = fn()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # stdout's buffer cannot be flushed any more: point it at devnull so exit does not complain
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def conformance_parser(prog: str = "olmo-attn conformance") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="run the conformance harness")
    add_conformance_args(parser)
    return parser


def info_parser(prog: str = "olmo-attn info") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="environment fingerprint and the backends' capability table"
    )
    add_info_args(parser)
    return parser


def add_info_args(p: argparse.ArgumentParser) -> None:
    """The options of ``olmo-attn info``, added to ``p``."""
    p.add_argument("--json", action="store_true", help="print the fingerprint as JSON")


def main(argv: Sequence[str] | None = None, prog: str = "olmo-attn conformance") -> int:
    """``olmo-attn conformance [args]`` / ``python -m conformance [args]`` (returns the exit code)."""
    rest = list(sys.argv[1:] if argv is None else argv)
    args = conformance_parser(prog).parse_args(rest)
    return _pipe_safe(lambda: run_conformance(args, rest))


def info_main(argv: Sequence[str] | None = None, prog: str = "olmo-attn info") -> int:
    """``olmo-attn info [--json]`` (returns the exit code)."""
    args = info_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    return _pipe_safe(lambda: run_info(args))


if __name__ == "__main__":
    sys.exit(main())
