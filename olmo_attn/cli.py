"""``olmo-attn``: the command-line entry point (a thin one).

* ``olmo-attn conformance [...]`` — run the conformance harness (``conformance/``; its options,
  exit codes and reports are described in ``conformance/cli.py`` and ``conformance/README.md``).
* ``olmo-attn info [--json]`` — provenance, the environment fingerprint and the capability table.
* ``olmo-attn --version``.

The harness owns both subcommands (``conformance/cli.py``); this module imports it only when one of
them runs, so ``import olmo_attn``, ``import olmo_attn.cli`` and ``olmo-attn --version`` never load
it. ``python -m conformance`` is ``olmo-attn conformance``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USAGE = 2
COMMANDS = {
    "conformance": "run the conformance harness",
    "info": "environment fingerprint and the backends' capability table",
}


def _top_parser() -> argparse.ArgumentParser:
    """``olmo-attn [--version] COMMAND``: the subcommands' own options are the harness's."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="olmo-attn", description="OLMo-core-compatible attention: tools")
    parser.add_argument("--version", action="version", version=f"olmo-attn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every subcommand's options included (imports the harness; for
    validating documented commands and for tools, not needed to run a command)."""
    from conformance.cli import add_conformance_args, add_info_args

    from ._version import __version__

    parser = argparse.ArgumentParser(prog="olmo-attn", description="OLMo-core-compatible attention: tools")
    parser.add_argument("--version", action="version", version=f"olmo-attn {__version__}")
    sub = parser.add_subparsers(dest="command")
    add_conformance_args(sub.add_parser("conformance", help=COMMANDS["conformance"]))
    add_info_args(sub.add_parser("info", help=COMMANDS["info"]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``olmo-attn`` command (returns the exit code)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "conformance":
        from conformance.cli import main as conformance_main

        return conformance_main(args[1:], prog="olmo-attn conformance")
    if args and args[0] == "info":
        from conformance.cli import info_main

        return info_main(args[1:], prog="olmo-attn info")
    parser = _top_parser()
    parser.parse_args(args)  # --version / --help exit here; an unknown command is a usage error
    parser.print_help()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
