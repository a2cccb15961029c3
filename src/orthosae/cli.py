"""`orthosae` command line. Each sub-command lives in orthosae.commands.<name> and registers itself;
its options come from a config dataclass's field docs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from orthosae import __version__
from orthosae.config import add_arguments, cli_overrides
from orthosae.errors import UserError
from orthosae.threads import ThreadOptions, apply_threads

# Sub-commands in --help order. Add a module under orthosae/commands/ and its name here.
COMMANDS = ("train", "cache", "run", "sweep", "report", "eval", "export")
DISTRIBUTED = ("train", "cache", "eval")  # the commands that run under torchrun; the others refuse there


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    description = "Train and evaluate TopK SAEs with an orthogonality regulariser."
    parser = _Parser(prog="orthosae", description=description)
    parser.add_argument("--version", action="version", version=f"orthosae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"orthosae.commands.{name}").register(sub)
    for command in sub.choices.values():  # a machine setting, not part of any command's config
        add_arguments(command, ThreadOptions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return int(e.code or 0)
    try:
        if _multi_process() and ns.command not in DISTRIBUTED:
            raise UserError(
                f"only `orthosae train` runs under torchrun, and `orthosae cache` to harvest and `orthosae "
                f"eval` to evaluate; run `orthosae {ns.command}` as one process"
            )
        apply_threads(cli_overrides(ThreadOptions, ns).get("threads"))
        code = ns.func(ns)
    except UserError as e:
        if _speaks(e):
            print(f"orthosae: error: {e}", file=sys.stderr)
        code = int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("orthosae: interrupted", file=sys.stderr)
        code = 130
    distributed = sys.modules.get("orthosae.train.distributed")
    if distributed is not None:  # a torchrun rank ends here (see exit_process)
        distributed.exit_process(code)
    return code


def _speaks(e: UserError) -> bool:
    """Under torchrun every rank checks the same options: rank 0 reports those, the others report only
    what they saw themselves (messages that name their rank), so one bad flag gives one line."""
    if getattr(e, "quiet", False):
        return False
    if not _multi_process():
        return True
    return os.environ.get("RANK", "0") == "0" or str(e).startswith("rank ")


def _multi_process() -> bool:
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


if __name__ == "__main__":
    sys.exit(main())
