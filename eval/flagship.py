"""The flagship recipes (issue 6) in one command: train the runs, then evaluate them all.

    python eval/flagship.py --stage all                  # train the generic recipe ("leaf") and evaluate it
    python eval/flagship.py --stage train --runs leaf    # only its training
    python eval/flagship.py --stage eval
    python eval/flagship.py --runs adapted               # + the retrieval corpora's documents (corpus adaptation)
    python eval/flagship.py --runs adapted-bank300       # the corpus-adapted recipe: corpora 3x, 384-token student,
                                                         # 4 query-sized spans per document, bank loss on the
                                                         # corpora's documents (weight 300)
    python eval/flagship.py --runs adapted-bank300 --set seed=1   # the same with another seed
    python eval/flagship.py --runs leaf-pkgdocs          # the generic recipe + Debian's scientific package docs

Each run is a recipe file, examples/recipes/RUN.toml (or a path to any TOML file), that `train-embedder --config`
runs unchanged; this script moves its folders (--data-dir, --runs-dir, --package-text-dir) and applies --set and
the other overrides. Runs with the same data mix share one teacher-vector store. Training is `leafkd.train`;
evaluation is `leafkd.run_evaluation` (fast engine where mteb is absent) on SciFact, Cranfield, NPL, STS-B and
SICK-R for the teacher, the base student, the ridge map (with the first run) and every trained student (student
and asymmetric modes), with alignment diagnostics. Results land in --out (default eval/results/flagship).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import leafkd  # noqa: E402
from leafkd.evaluation import DEFAULT_TASKS, markdown_table, write_report  # noqa: E402

RECIPES = REPO / "examples" / "recipes"
PACKAGE_TEXT = "runs/package-text"  # where the recipes name eval/package_text.py's paragraph files
SHARED_DATA = "../shared/data"  # where the recipes name the data folder
log_handler = logging.StreamHandler(sys.stdout)


def recipe_path(run: str) -> Path:
    """A run's recipe file: examples/recipes/RUN.toml ('+' read as '-', as in the old run names) or a TOML path."""
    return Path(run) if run.endswith(".toml") else RECIPES / f"{run.replace('+', '-')}.toml"


def run_name(run: str, args) -> str:
    """Folder name of a run: the recipe's name, plus each --set override (`adapted-bank300-seed1`)."""
    suffix = "".join(f"-{k}{v}" for k, v in args.set.items())
    return f"{recipe_path(run).stem}{suffix}".replace("+", "-")


def parse_set(item: str) -> dict:
    """KEY=VALUE with a TOML value (`seed=1`, `lr=2e-3`, `loss="x"`); a bare word is a string."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {item!r}: expected KEY=VALUE")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return {key.strip(): parsed}


def moved(path: str, args) -> str:
    """A recipe's path with the data and package-text folders moved to this call's."""
    if path.startswith(SHARED_DATA):
        return str(Path(args.data_dir).resolve()) + path[len(SHARED_DATA):]
    if path.startswith(PACKAGE_TEXT):
        return str(Path(args.package_text_dir).resolve()) + path[len(PACKAGE_TEXT):]
    return path


def run_overrides(run: str, args) -> dict[str, Any]:
    """What this call changes in a recipe: its folders, --epochs/--teacher/--student and every --set."""
    raw = tomllib.loads(recipe_path(run).read_text())
    recipe = raw.get("train", raw)
    overrides: dict[str, Any] = {key: [moved(p, args) for p in recipe[key]]
                                 for key in ("data", "adapt", "bank_data") if key in recipe}
    # One store per data mix (a store holds the teacher vectors of the texts it was built from).
    store = Path(recipe.get("vectors", "runs/flagship-vectors")).name
    overrides.update(output=str(Path(args.runs_dir) / f"flagship-{run_name(run, args)}"),
                     vectors=str(Path(args.runs_dir) / store), epochs=args.epochs, teacher=args.teacher,
                     student=args.student, progress=False)
    overrides.update(args.set)
    return overrides


def ensure_package_text(paths: list[str]) -> None:
    """eval/package_text.py's paragraph files among `paths`, built (downloaded from Debian) when missing."""
    for path in map(Path, paths):
        if path.name in ("package-docs.txt", "package-docs-more.txt") and not path.is_file():
            from package_text import build

            print(f"{path} not found: building it from Debian's documentation packages", flush=True)
            build(path.parent, "http://deb.debian.org/debian", more=path.name == "package-docs-more.txt")


def stage_train(args) -> dict:
    timings = {}
    for run in args.runs:
        name = run_name(run, args)
        overrides = run_overrides(run, args)
        ensure_package_text(overrides.get("data", []) + overrides.get("adapt", []))
        cfg = leafkd.load_config(recipe_path(run), **overrides)
        log_handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
        t = time.perf_counter()
        result = leafkd.train(cfg)
        timings[name] = {"seconds": time.perf_counter() - t, **result}
        print(f"[{name}] done in {time.perf_counter() - t:.0f} s: {json.dumps(result['final'])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = json.loads((out / "train_summary.json").read_text()) if (out / "train_summary.json").exists() else {}
    prev.update(timings)
    (out / "train_summary.json").write_text(json.dumps(prev, indent=2))
    return timings


def stage_eval(args) -> None:
    out = Path(args.out)
    for i, run in enumerate(args.runs):
        name = run_name(run, args)
        model = Path(args.runs_dir) / f"flagship-{name}" / "model"
        # The first run's table carries the teacher, base and ridge rows; the others add their own student rows.
        modes = ["teacher", "student", "asymmetric", "base", "ridge"] if i == 0 else ["student", "asymmetric"]
        log_handler.setFormatter(logging.Formatter(f"[eval {name}] %(message)s"))
        t = time.perf_counter()
        results = leafkd.run_evaluation(teacher=args.teacher, student=model, modes=modes, tasks=args.tasks,
                                        data_dir=args.data_dir, engine=args.engine, ridge=i == 0,
                                        with_alignment=True)
        paths = write_report(results, out / f"eval-{name}")
        print(markdown_table(results), end="", flush=True)
        print(f"eval {name}: {time.perf_counter() - t:.0f} s, wrote {', '.join(map(str, paths.values()))}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["train", "eval", "all"], default="all")
    known = sorted(f.stem for f in RECIPES.glob("*.toml"))
    p.add_argument("--runs", type=lambda s: s.split(","), default=["leaf"],
                   help=f"comma-separated recipes of examples/recipes ({', '.join(known)}) or TOML files")
    p.add_argument("--data-dir", default=os.environ.get("LEAFKD_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="eval/results/flagship")
    p.add_argument("--epochs", type=float, default=None, help="override the recipes' epochs")
    p.add_argument("--teacher", default=None, help="override the teacher folder")
    p.add_argument("--student", default=None, help="override the student base folder")
    p.add_argument("--engine", default="fast")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(DEFAULT_TASKS),
                   help=f"comma-separated evaluation tasks (default: {','.join(DEFAULT_TASKS)})")
    p.add_argument("--package-text-dir", default=PACKAGE_TEXT,
                   help="folder of eval/package_text.py's paragraph files (built there when missing)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="override a training option in every run (repeatable; e.g. seed=1); named in the run folders")
    args = p.parse_args()
    args.set = {k: v for item in args.set for k, v in item.items()}
    unknown = [r for r in args.runs if not recipe_path(r).is_file()]
    if unknown:
        sys.exit(f"error: unknown run(s) {', '.join(unknown)} (known: {', '.join(known)}, or a TOML file)")
    logging.getLogger("leafkd").addHandler(log_handler)
    logging.getLogger("leafkd").setLevel(logging.INFO)
    if args.stage in ("train", "all"):
        stage_train(args)
    if args.stage in ("eval", "all"):
        stage_eval(args)


if __name__ == "__main__":
    try:
        main()
    except leafkd.LeafkdError as e:  # a user error (a missing data folder, a bad config): one line, no traceback
        sys.exit(f"error: {e}")
