"""`orthosae` command line. Each sub-command lives in orthosae.commands.<name> and registers itself;
its options come from a config dataclass's field docs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from orthosae import __version__
from orthosae.errors import UserError

# Sub-commands in --help order. Add a module under orthosae/commands/ and its name here.
COMMANDS = ("train", "cache", "run", "sweep", "report", "eval")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return int(e.code or 0)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"orthosae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orthosae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
