"""Charts of eval/RESULTS.md, drawn from the recorded results files (nothing is typed in by hand).

    python eval/charts.py        # -> eval/results/charts/recipes.png, eval/results/charts/curves.png

recipes.png: each recipe's asymmetric retrieval and student-alone score as % of the teacher (mean over seeds,
every seed as a dot), against the issue's targets. curves.png: held-out cosine to the teacher during training
(seed 0 of each recipe), the fit on training texts at the end, the 0.95 target and the rank-384 projection bound.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

from seed_table import RETRIEVAL, run_row  # noqa: E402

RESULTS = REPO / "eval" / "results"
# (label, results folder, recipe name as seed_table reads it)
RECIPES = [
    ("generic (LEAF loss)", "flagship_package_docs", "leaf"),
    ("generic + package docs", "flagship_package_docs", "leaf-pkgdocs"),
    ("corpus-adapted", "flagship_adapted", "adapted"),
    ("adapted, corpora 3x, 384 tokens", "flagship_seeds", "adapted-w3-len384"),
    ("+ 4 query-sized spans per doc", "flagship_seeds", "adapted-w3-len384-crops4"),
    ("+ bank loss on the docs (w 300)", "flagship_bank", "adapted-bank300"),
]
CURVES = [
    ("generic", "flagship_package_docs/train-leaf"),
    ("generic + package docs", "flagship_package_docs/train-leaf-pkgdocs"),
    ("corpus-adapted + spans", "flagship_seeds/train-adapted-w3-len384-crops4"),
    ("+ bank loss (w 300)", "flagship_bank/train-adapted-bank300"),
]
PROJECTION_BOUND = 0.9765  # eval/results/projection_bound.md, rank 384


def recipe_rows() -> list[tuple[str, list[dict]]]:
    rows = []
    for label, folder, recipe in RECIPES:
        # seed 0 of adapted-w3-len384 was recorded in its own folder before the seed study
        folders = [RESULTS / folder] + ([RESULTS / "flagship_recipe_adapted"] if recipe == "adapted-w3-len384" else [])
        runs = [run_row(f) for d in folders for f in sorted(d.glob("eval-*/results.json"))]
        runs = [r for r in runs if r["recipe"] == recipe]
        if not runs:
            raise SystemExit(f"error: no results for {recipe} under {folder}")
        rows.append((label, runs))
    return rows


def draw_recipes(path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = recipe_rows()
    ridge = json.loads(next((RESULTS / "flagship_package_docs").glob("eval-leaf/results.json")).read_text())
    modes = {r["mode"]: r["scores"] for r in ridge["rows"]}
    ridge_pct = 100 * sum(modes["ridge"][t] for t in RETRIEVAL) / sum(modes["teacher"][t] for t in RETRIEVAL)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    labels = [label for label, _ in rows]
    for ax, key, title, target in [(axes[0], "asym_pct", "asymmetric retrieval (student queries, teacher docs)", 99.5),
                                   (axes[1], "student_pct", "student alone (retrieval + STS)", 98.0)]:
        for i, (_, runs) in enumerate(rows):
            xs = [r[key] for r in runs]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            ax.barh(i, statistics.mean(xs), xerr=sd, color="#4c72b0", alpha=0.75, capsize=3)
            ax.scatter(xs, [i] * len(xs), color="black", s=12, zorder=3)
            ax.text(max(xs) + 0.8, i, f"{statistics.mean(xs):.2f}% ({len(xs)} seed{'s' * (len(xs) > 1)})",
                    va="center", fontsize=8)
        ax.axvline(target, color="crimson", ls="--", lw=1)
        ax.text(target, len(rows) - 0.45, f" target {target:g}%", color="crimson", fontsize=8, ha="right")
        if key == "asym_pct":
            ax.axvline(ridge_pct, color="gray", ls=":", lw=1)
            ax.text(ridge_pct, len(rows) - 0.45, f" ridge map {ridge_pct:.0f}%", color="gray", fontsize=8)
        ax.set_xlim(55 if key == "asym_pct" else 85, 104)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("% of the teacher (all-mpnet-base-v2)")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    fig.suptitle("all-mpnet-base-v2 -> 22M student (all-MiniLM-L6-v2 encoder + 384->768 projection), H100", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_curves(path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, folder in CURVES:
        records = [json.loads(line) for line in (RESULTS / folder / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if r["type"] == "eval"]
        line, = ax.plot([r["step"] for r in evals], [r["heldout_cos_mean"] for r in evals], marker=".", label=label)
        fit = [r for r in records if r["type"] == "train_fit"]
        if fit:
            ax.scatter([evals[-1]["step"]], [fit[-1]["cos_mean"]], marker="^", color=line.get_color(), zorder=3)
    ax.axhline(0.95, color="crimson", ls="--", lw=1, label="target 0.95")
    ax.axhline(PROJECTION_BOUND, color="gray", ls=":", lw=1, label=f"rank-384 projection bound {PROJECTION_BOUND}")
    ax.scatter([], [], marker="^", color="black", label="fit on training texts (end)")
    ax.set_xlabel("training step (batch 512)")
    ax.set_ylabel("held-out mean cosine to the teacher")
    ax.set_ylim(0.68, 1.0)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Alignment during training (seed 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import matplotlib

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "charts")
    out = p.parse_args(argv).out
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    draw_recipes(out / "recipes.png")
    draw_curves(out / "curves.png")
    print(f"wrote {out / 'recipes.png'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
