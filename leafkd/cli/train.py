"""`leafkd train` / `train-embedder`: options generated from TrainConfig, so --help documents every one."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, Field, fields
from typing import Any

from leafkd.cli.options import RANGE_KEYS, number_from_metadata, range_problem, with_range
from leafkd.errors import LeafkdError


def _type_of(annotation: Any) -> type:
    text = str(annotation)
    for name, typ in (("int", int), ("float", float), ("bool", bool), ("str", str)):
        if text.startswith(name) or text.startswith(f"{name} |"):
            return typ
    return str


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def build_train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from leafkd.training.config import TrainConfig

    parser.description = "Distil a student into a teacher's embedding space (LEAF + LELP losses)."
    parser.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = _default(f)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        choices = f.metadata.get("choices")
        if isinstance(default, list):
            parser.add_argument(flag, action="append", default=None, metavar="SOURCE", help=help_text)
        elif choices is not None:
            # Parsed (and refused with a one-line error) by TrainConfig, which also reads them from TOML.
            metavar = "{" + ",".join(c.value for c in choices) + "}"
            parser.add_argument(flag, default=None, metavar=metavar, help=help_text)
        elif _type_of(f.type) is bool:
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
            if f.name in ("resume", "plot", "progress"):
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const",
                                    const=False, help=argparse.SUPPRESS)
        elif any(k in f.metadata for k in RANGE_KEYS):
            kind = number_from_metadata(_type_of(f.type), f.metadata)
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                                help=with_range(help_text, kind))
        else:
            parser.add_argument(flag, type=_type_of(f.type), default=None, metavar=f.name.upper(), help=help_text)
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from leafkd.runtime import distributed
    from leafkd.training.config import TrainConfig, load_config
    from leafkd.training.trainer import train

    overrides = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    cfg = load_config(args.config, **overrides)
    for f in fields(TrainConfig):  # a --config file's values bypass the parser: the same ranges apply to them
        if any(k in f.metadata for k in RANGE_KEYS):
            problem = range_problem(f.name, getattr(cfg, f.name), _type_of(f.type), f.metadata)
            if problem is not None:
                raise LeafkdError(problem)
    result = train(cfg)  # joins the torchrun process group when launched by torchrun
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return 0
    final, base = result["final"], result["ridge_baseline"]
    print(json.dumps({"model": result["model"], "steps": result["steps"], "final": final, "ridge_baseline": base},
                     indent=2))
    return 0


def register(sub) -> None:
    parser = sub.add_parser("train", help="train a student (same as train-embedder)")
    build_train_parser(parser)
