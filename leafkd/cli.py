"""The `leafkd` and `train-embedder` commands.

User errors (`LeafkdError`, missing files, bad options) print one line on stderr and exit with status 2;
Ctrl-C exits 130. Everything else keeps its traceback: that is a bug to report.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from leafkd.errors import LeafkdError

# Subcommand modules under leafkd.commands, each with register(subparsers).
COMMANDS = ["models", "capture", "adapt", "train", "index", "serve", "eval", "bench", "demo", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leafkd", description=__doc__.splitlines()[0])
    from leafkd import __version__

    parser.add_argument("--version", action="version", version=f"leafkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"leafkd.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"leafkd.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def run(func: Callable[[], int | None]) -> int:
    """Run a command body, turning user errors into one line and a non-zero exit."""
    try:
        code = func()
        return int(code or 0)
    except LeafkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(lambda: args.func(args))


def train_embedder_main(argv: Sequence[str] | None = None) -> int:
    from leafkd.commands.train import build_train_parser

    parser = build_train_parser(argparse.ArgumentParser(prog="train-embedder"))
    args = parser.parse_args(argv)
    return run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
