"""The training run's metrics.jsonl (append-only, truncated on resume) and its curves.png."""

from __future__ import annotations

import json
from pathlib import Path

from leafkd import atomic


# -- the run ---------------------------------------------------------------------------------------------
class MetricsLog:
    """Append-only JSONL of training and evaluation records (truncated to the resumed step on resume)."""

    def __init__(self, path: Path, resume_step: int | None, readonly: bool = False):
        self.path = path
        self.readonly = readonly  # distributed ranks other than 0 keep the records in memory only
        self.records: list[dict] = []
        if path.exists() and resume_step is not None:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        if not readonly:
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.readonly:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    if evals:
        steps = [r["step"] for r in evals]
        axes[1].plot(steps, [r["heldout_cos_mean"] for r in evals], marker="o", label="mean cosine")
        axes[1].plot(steps, [r["heldout_cos_p5"] for r in evals], marker=".", label="5th pct cosine")
        axes[1].plot(steps, [r["top10_agreement"] for r in evals], marker="x", label="top-10 agreement")
        axes[1].legend(loc="lower right")
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out alignment to the teacher")
    fig.tight_layout()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


