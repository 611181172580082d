"""What every command's parser shares: one-line parse errors, ranged numbers and checked paths.

- `Parser`: an ``argparse.ArgumentParser`` whose errors are one ``error: ...`` line and exit status 2 (argparse's
  own print a usage block and ``prog: error:``). Subparsers made from it are `Parser` too.
- `Range` / `number`: the numeric-range layer. Each numeric option declares its range once, where it is defined
  (``type=number(int, min=1, max=65535)``, or a dataclass field's ``metadata={"min": 1}`` read by
  `number_from_metadata`); the parser then refuses anything outside it, as well as NaN and infinities, before
  a command runs, and ``--help`` shows the range.
- `output_folder`, `existing_file`: path options checked at parse time (an output folder that is a file or a
  symbolic link is refused before hours of work, not after).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# Bounds that apply when an option names none: what int64 arrays and FAISS take, and the largest float any
# leafkd knob could mean (beyond it a float no longer counts steps or tokens exactly).
INT_MAX = 2**63 - 1
FLOAT_MAX = 1e15


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose parse errors are one ``error: ...`` line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: ``min <= x <= max`` (``gt``: ``x > gt``), plus the ``also`` values."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    also: tuple[float, ...] = ()

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None."""
        if value in self.also:
            return None
        if self.gt is not None and not value > self.gt:
            return f"must be > {_fmt(self.gt)}"
        if self.min is not None and value < self.min:
            return f"must be >= {_fmt(self.min)}"
        if self.max is not None and value > self.max:
            return f"must be <= {_fmt(self.max)}"
        return None

    def describe(self) -> str:
        """The range as ``--help`` shows it: ``1..65535``, ``> 0``, ``>= 0``, with its extra values."""
        low = f"> {_fmt(self.gt)}" if self.gt is not None else None
        if self.min is not None and self.max is not None:
            text = f"{_fmt(self.min)}..{_fmt(self.max)}"
        elif low is not None:
            text = low + (f", <= {_fmt(self.max)}" if self.max is not None else "")
        elif self.min is not None:
            text = f">= {_fmt(self.min)}"
        else:
            text = f"<= {_fmt(self.max)}" if self.max is not None else "any"
        return text + "".join(f" or {_fmt(v)}" for v in self.also)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


class NumberType:
    """An argparse ``type=`` that parses an int or a float and checks it against a `Range`."""

    def __init__(self, kind: type, rng: Range) -> None:
        if kind not in (int, float):
            raise TypeError(f"number() takes int or float, not {kind!r}")
        self.kind = kind
        self.range = rng
        self.__name__ = kind.__name__  # argparse names the type in some of its messages

    def __call__(self, text: str) -> int | float:
        what = "an integer" if self.kind is int else "a number"
        try:
            value = int(text, 10) if self.kind is int else float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
        limit = INT_MAX if self.kind is int else FLOAT_MAX
        problem = self.range.problem(value) or (f"must be <= {_fmt(limit)}" if abs(value) > limit else None)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem} ({self.range.describe()}), not {text}")
        return value

    def __repr__(self) -> str:
        return f"number({self.kind.__name__}, {self.range.describe()})"


def number(kind: type, *, min: float | None = None, max: float | None = None, gt: float | None = None,
           also: tuple[float, ...] = ()) -> NumberType:
    """A ranged int or float option type: ``p.add_argument("--port", type=number(int, min=1, max=65535))``."""
    return NumberType(kind, Range(min=min, max=max, gt=gt, also=tuple(also)))


RANGE_KEYS = ("min", "max", "gt", "also")


def number_from_metadata(kind: type, metadata: Mapping[str, Any]) -> NumberType:
    """The option type of a dataclass field whose metadata holds its range (keys ``min``, ``max``, ``gt``,
    ``also``), e.g. ``field(default=1, metadata={"help": ..., "min": 1})``."""
    return NumberType(kind, Range(**{k: metadata[k] for k in RANGE_KEYS if k in metadata}))


def range_problem(name: str, value: Any, kind: type, metadata: Mapping[str, Any]) -> str | None:
    """Why a value from a config file is not a valid ``kind`` in the field's range (None if it is): config files
    bypass the parser, so the same check runs on their values."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        return f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}"
    try:
        number_from_metadata(kind, metadata)(repr(value))
    except argparse.ArgumentTypeError as e:
        return f"{name} {e}"
    return None


def with_range(help_text: str, kind: NumberType) -> str:
    """A help text with the option's range added."""
    return f"{help_text} [{kind.range.describe()}]" if help_text else f"[{kind.range.describe()}]"


def add_number(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, kind: type, *, help: str = "",
               min: float | None = None, max: float | None = None, gt: float | None = None,
               also: tuple[float, ...] = (), **kwargs: Any) -> argparse.Action:
    """``parser.add_argument`` for a ranged number: the range is checked at parse time and shown in --help."""
    typ = number(kind, min=min, max=max, gt=gt, also=also)
    return parser.add_argument(flag, type=typ, help=with_range(help, typ), **kwargs)


def output_folder(text: str) -> Path:
    """An output folder option: may not exist yet; never an existing file or a symbolic link (writing through a
    link would replace whatever the link points at)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, not an empty string")
    path = Path(text)
    if path.is_symlink():
        raise argparse.ArgumentTypeError(f"{text} is a symbolic link; give the folder itself")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {parent} is not a folder")
    return path


def existing_file(suffixes: tuple[str, ...] = ()) -> Callable[[str], Path]:
    """An input file option: must exist, be a file, and end with one of ``suffixes`` (when given)."""

    def check(text: str) -> Path:
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{text}: no such file")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is not a file")
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: expected a {' or '.join(suffixes)} file")
        return path

    check.__name__ = "file"
    return check
