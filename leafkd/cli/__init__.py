"""The `leafkd` and `train-embedder` commands: one module per subcommand, each with `register(subparsers)`.

User errors (`LeafkdError`, bad options, numbers out of range, files that cannot be read or written) print one
`error:` line on stderr and exit with status 2; Ctrl-C exits 130. Everything else keeps its traceback: that is a
bug to report. Every parser is a `leafkd.cli.options.Parser`, whose numeric options carry their ranges. Library
code logs through `logging`; the CLI shows those records on stderr and prints its own results on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from leafkd import __version__
from leafkd.cli.options import Parser
from leafkd.errors import LeafkdError

# Subcommand modules under leafkd.cli, in the order `leafkd --help` lists them.
COMMANDS = ("distill", "models", "capture", "adapt", "train", "index", "serve", "eval", "demo", "export")


def build_parser() -> argparse.ArgumentParser:
    """The `leafkd` parser, with every subcommand's options (their modules load their heavy imports lazily)."""
    parser = Parser(prog="leafkd", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"leafkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"leafkd.cli.{name}").register(sub)
    return parser


class _StderrHandler(logging.Handler):
    """One plain line per record on whatever sys.stderr is when the record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break a command
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Library log records on stderr, one plain line each (the CLI's own results go to stdout)."""
    root = logging.getLogger("leafkd")
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StderrHandler)] + [_StderrHandler()]
    root.setLevel(level)


def run(func: Callable[[], int | None]) -> int:
    """Run a command body, turning user errors into one line and a non-zero exit."""
    try:
        code = func()
        return int(code or 0)
    except LeafkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user named cannot be read or written (permissions, disk full)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """The `leafkd` command."""
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(lambda: args.func(args))


def train_embedder_main(argv: Sequence[str] | None = None) -> int:
    """The `train-embedder` command: `leafkd train`'s options on their own."""
    from leafkd.cli.train import build_train_parser

    setup_logging()
    parser = build_train_parser(Parser(prog="train-embedder"))
    args = parser.parse_args(argv)
    return run(lambda: args.func(args))
