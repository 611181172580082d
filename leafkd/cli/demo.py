"""`leafkd demo`: the main job on an embedded default, on CPU in minutes.

Distils all-MiniLM-L6-v2 (teacher) into its own first 3 layers + a projection (student) on a sample of the
shared training text, and prints held-out alignment before training, after the ridge warm start (the
linear-map baseline) and after training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _run(args: argparse.Namespace) -> int:
    from leafkd.data.paths import data_dir
    from leafkd.runtime.encode import encode
    from leafkd.student.build import build_student
    from leafkd.training.alignment import heldout_alignment
    from leafkd.training.config import load_config
    from leafkd.training.trainer import train

    folder = data_dir(args.data_dir)
    assert folder is not None  # required: a missing data folder is a one-line error
    train_dir = folder / "train"
    data = [f"{train_dir}/questions.tsv", f"{train_dir}/wordnet_examples.txt",
            f"{train_dir}/sentences/movie_reviews.txt", f"{train_dir}/sentences/product_reviews.txt",
            f"{train_dir}/wiki_summaries.jsonl*0.5"]
    cfg = load_config(None, teacher=args.teacher, student=args.teacher, student_layers=3, projection="always",
                      data=data, max_texts=args.texts, heldout=500, epochs=args.epochs, batch_size=32, lr=3e-4,
                      projection_lr=3e-4, output=args.output, eval_every=100, checkpoint_every=100, max_seq_length=128,
                      progress=not args.quiet)
    result = train(cfg)
    # "Before": the truncated student as it is, no projection (same 384-d space as the teacher).
    from leafkd.training.data import prepare_data

    data_obj = prepare_data(cfg, Path(cfg.output))
    held_texts = [data_obj.texts[i] for i in data_obj.heldout_idx]
    raw = build_student(args.teacher, 384, layers=3, projection="none", normalize=True)
    before = heldout_alignment(encode(raw, held_texts), data_obj.teacher[data_obj.heldout_idx].astype(np.float32))
    rows = [("student before training (3 layers, no map)", before),
            ("ridge linear map only (step 0)", result["ridge_baseline"]), ("trained student (leafkd)", result["final"])]
    print()
    print(f"held-out alignment to the teacher ({len(held_texts)} texts never trained on)")
    print(f"{'':46s} {'mean cos':>9s} {'p5 cos':>8s} {'top-10 agr':>10s}")
    for name, m in rows:
        print(f"{name:46s} {m['heldout_cos_mean']:9.4f} {m['heldout_cos_p5']:8.4f} {m['top10_agreement']:10.3f}")
    print(f"\nstudent saved to {result['model']} (loads with SentenceTransformer(path))")
    summary = {name: m for name, m in rows}
    (Path(cfg.output) / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="distil all-MiniLM-L6-v2 into its first 3 layers on CPU and report alignment")
    p.add_argument("--teacher", default="all-MiniLM-L6-v2", help="teacher (default: %(default)s)")
    p.add_argument("--texts", type=int, default=8000, help="unique training texts sampled (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default: %(default)s)")
    p.add_argument("--output", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $LEAFKD_DATA or ../shared/data)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


