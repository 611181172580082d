"""Seed spread of flagship runs: one row per evaluated run, then mean, standard deviation and range per recipe.

    python eval/seed_table.py eval/results/flagship_seeds eval/results/flagship_recipe_adapted

Reads every `eval-*/results.json` under the given folders (written by `leafkd eval` through eval/flagship.py).
A run's recipe is its folder name without a trailing `-seedN` (seed 0 has no suffix). Percentages are of the
teacher row of the same results file (or, for a run evaluated without one, the teacher row that the other runs
of its folder share): asymmetric over the retrieval tasks, student alone over all tasks.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

RETRIEVAL = ("SciFact", "Cranfield", "NPL")


def folder_teacher(folder: Path) -> dict | None:
    """The teacher row of the runs in `folder`, when they carry one and all agree on it."""
    found = [r["scores"] for f in sorted(folder.glob("eval-*/results.json"))
             for r in json.loads(f.read_text())["rows"] if r["mode"] == "teacher"]
    if found and all(t == found[0] for t in found):
        return found[0]
    return None


def run_row(path: Path) -> dict:
    """The numbers of one evaluated run (nDCG@10 and Spearman as x100)."""
    result = json.loads(path.read_text())
    rows = {r["mode"]: r["scores"] for r in result["rows"]}
    if "teacher" not in rows and (shared := folder_teacher(path.parent.parent)) is not None:
        rows["teacher"] = shared  # evaluated after the first run of its call, which carries the teacher row
    missing = {"teacher", "student", "asymmetric"} - rows.keys()
    if missing:
        raise SystemExit(f"error: {path}: no {', '.join(sorted(missing))} row (evaluate with --modes teacher,student,asymmetric)")
    name = path.parent.name.removeprefix("eval-")
    seed = re.search(r"-seed(\d+)$", name)
    teacher_ret = sum(rows["teacher"][t] for t in RETRIEVAL) / 3
    asym = [100 * rows["asymmetric"][t] for t in RETRIEVAL]
    student_all = 100 * sum(rows["student"].values()) / len(rows["student"])
    teacher_all = 100 * sum(rows["teacher"].values()) / len(rows["teacher"])
    return {"recipe": name[: seed.start()] if seed else name, "seed": int(seed.group(1)) if seed else 0,
            "asym": asym, "asym_avg": sum(asym) / 3, "asym_pct": sum(asym) / 3 / teacher_ret,
            "student_all": student_all, "student_pct": 100 * student_all / teacher_all}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args()
    paths = sorted(f for d in args.folders for f in d.glob("eval-*/results.json"))
    if not paths:
        sys.exit(f"error: no eval-*/results.json under {', '.join(map(str, args.folders))}")
    runs = sorted((run_row(f) for f in paths), key=lambda r: (r["recipe"], r["seed"]))
    print("| recipe | seed | asym SciFact / Cranfield / NPL | asym avg | % of teacher | student all avg | % of teacher |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in runs:
        print(f"| `{r['recipe']}` | {r['seed']} | {' / '.join(f'{x:.2f}' for x in r['asym'])} | {r['asym_avg']:.2f} "
              f"| {r['asym_pct']:.2f}% | {r['student_all']:.2f} | {r['student_pct']:.2f}% |")
    print()
    print("| recipe | seeds | asym % of teacher: mean ± sd (min-max) | student all % of teacher: mean ± sd (min-max) |")
    print("|---|---:|---|---|")
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        group = [r for r in runs if r["recipe"] == recipe]

        def spread(key: str) -> str:
            xs = [r[key] for r in group]
            if len(xs) == 1:
                return f"{xs[0]:.2f}% (one seed)"
            return f"{statistics.mean(xs):.2f}% ± {statistics.stdev(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

        print(f"| `{recipe}` | {len(group)} | {spread('asym_pct')} | {spread('student_pct')} |")


if __name__ == "__main__":
    main()
