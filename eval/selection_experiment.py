"""Teacher-guided data selection (issue 8) against uniform sampling, at equal steps and at half the samples.

    # H100, flagship data (about 5-6 minutes with a captured store; add --eval for nDCG/STS, ~15 s a model):
    python eval/selection_experiment.py --teacher all-mpnet-base-v2 --student all-MiniLM-L6-v2 \
        --vectors runs/flagship-vectors --steps 1600 --eval --out eval/results/selection_h100

    # CPU smoke test (tiny):
    python eval/selection_experiment.py --teacher all-MiniLM-L6-v2 --student all-MiniLM-L6-v2 --student-layers 1 \
        --max-texts 600 --heldout 100 --steps 8 --batch-size 16 --device cpu --eval --eval-tasks stsb \
        --runs-dir /tmp/sel-smoke/runs --out /tmp/sel-smoke/out

Runs (`--variants`, comma-separated): `uniform` (no selection), `reweight` and `subset` (selection) at `--steps`;
`uniform-half`, `reweight-half`, `subset-half` at half the steps, i.e. half the training samples. Every run is
`examples/flagship.toml` (data paths moved to --data-dir) with the overrides below, seed 0, and the same
held-out texts, trained by `leafkd.train`. Held-out cosine comes from each run's `model/leafkd.json`; with
--eval, `leafkd.run_evaluation` (fast engine, student and asymmetric modes) adds nDCG@10 (SciFact, Cranfield,
NPL) and STS Spearman (STS-B, SICK-R).
"Steps to match" is the first periodic held-out evaluation of a selection run at or above uniform's final
cosine (a lower bound on the budget: that run's learning rate had not decayed yet). Writes OUT/results.md and
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import leafkd  # noqa: E402
from leafkd.evaluation import write_report  # noqa: E402

log_handler = logging.StreamHandler(sys.stdout)

VARIANTS = {
    "uniform": ({"select": "none"}, 1.0),
    "uniform-half": ({"select": "none"}, 0.5),
    "reweight": ({"select": "reweight"}, 1.0),
    "reweight-half": ({"select": "reweight"}, 0.5),
    "subset": ({"select": "subset"}, 1.0),
    "subset-half": ({"select": "subset"}, 0.5),
}
RETRIEVAL = ("SciFact", "Cranfield", "NPL")
STS = ("STSBenchmark", "SICK-R")


def base_config(args) -> dict:
    import tomllib

    base = tomllib.loads((REPO / args.config).read_text())["train"]
    data_dir = str(Path(args.data_dir).resolve())
    base["data"] = args.data or [d.replace("../shared/data", data_dir) for d in base["data"]]
    base.update(teacher=args.teacher, student=args.student, batch_size=args.batch_size, lr=args.lr,
                projection_lr=args.projection_lr, heldout=args.heldout, device=args.device, progress=False,
                plot=True, resume=False, checkpoint_every=0, max_texts=args.max_texts,
                select_refresh_every=args.refresh_every, select_score_texts=args.score_texts,
                select_temperature=args.temperature, select_diversity=args.diversity,
                select_fraction=args.fraction)
    for key in ("student_layers", "max_seq_length", "ridge_samples"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.vectors:
        base["vectors"] = args.vectors
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            base[key] = json.loads(value)
        except json.JSONDecodeError:
            base[key] = value
    return base


def eval_scores(model: Path, out: Path, args) -> dict:
    tasks = {"tasks": args.eval_tasks.split(",")} if args.eval_tasks else {}
    results = leafkd.run_evaluation(teacher=args.teacher, student=model, modes=["student", "asymmetric"],
                                    data_dir=args.data_dir, engine="fast",
                                    device=args.device if args.device != "auto" else None, **tasks)
    write_report(results, out)
    rows = results["rows"]
    res = {}
    for row in rows:
        s = row["scores"]
        mean = lambda names: 100 * sum(s[t] for t in names if t in s) / sum(t in s for t in names) \
            if any(t in s for t in names) else None
        res[row["mode"]] = {"retrieval": mean(RETRIEVAL), "sts": mean(STS), "scores": s}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--student-layers", type=int)
    p.add_argument("--config", default="examples/flagship.toml")
    p.add_argument("--data-dir", default=os.environ.get("LEAFKD_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--data", action="append", help="text sources instead of the flagship's (repeatable)")
    p.add_argument("--vectors", help="shared teacher-vector store (captured by the first run when missing)")
    p.add_argument("--runs-dir", default="runs/selection")
    p.add_argument("--out", default="eval/results/selection")
    p.add_argument("--variants", type=lambda s: s.split(","),
                   default=["uniform", "uniform-half", "reweight", "subset", "subset-half"])
    p.add_argument("--steps", type=int, default=1600, help="optimiser steps of a full-budget run")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--projection-lr", type=float, default=1e-3)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--max-texts", type=int)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--ridge-samples", type=int)
    p.add_argument("--refresh-every", type=int, default=400, help="select_refresh_every (0: select once)")
    p.add_argument("--score-texts", type=int, default=50000, help="select_score_texts")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--diversity", type=float, default=0.5)
    p.add_argument("--fraction", type=float, default=0.5, help="subset size as a fraction of the pool")
    p.add_argument("--evals", type=int, default=8, help="periodic held-out evaluations per full run")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval", action="store_true", help="also run leafkd eval (student and asymmetric modes)")
    p.add_argument("--eval-tasks", help="leafkd eval --tasks (default: all five; e.g. stsb for a smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other TrainConfig override")
    args = p.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if "uniform" not in args.variants:
        sys.exit("error: the uniform run is the reference; keep it in --variants")
    if not args.vectors:
        args.vectors = str(Path(args.runs_dir) / "teacher-vectors")

    logging.getLogger("leafkd").addHandler(log_handler)
    logging.getLogger("leafkd").setLevel(logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(args)
    results: dict[str, dict] = {}
    for name in args.variants:
        extra, share = VARIANTS[name]
        steps = max(1, int(round(args.steps * share)))
        run = {"max_steps": steps, "eval_every": max(1, args.steps // args.evals), "output": str(Path(args.runs_dir) / name)}
        cfg = leafkd.load_config(None, **{**base, **extra, **run})
        log_handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
        t = time.perf_counter()
        res = leafkd.train(cfg)
        seconds = time.perf_counter() - t
        run_dir = Path(cfg.output)
        info = json.loads((run_dir / "model" / "leafkd.json").read_text())
        curve = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["step"], r["heldout_cos_mean"]) for r in curve if r.get("type") == "eval"]
        sel = info.get("selection") or {}
        results[name] = {"steps": steps, "samples": steps * cfg.batch_size * cfg.grad_accum, "seconds": seconds,
                         "final": info["metrics"]["final"], "ridge": info["metrics"]["ridge_baseline"],
                         "curve": curve, "pool": sel.get("pool"), "chosen": sel.get("chosen"),
                         "dropped": sel.get("dropped")}
        print(f"[{name}] {steps} steps in {seconds:.0f} s: held-out cos {res['final']['heldout_cos_mean']:.4f}", flush=True)
        if args.eval:
            results[name]["eval"] = eval_scores(run_dir / "model", out / f"eval-{name}", args)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    ref = results["uniform"]["final"]["heldout_cos_mean"]
    lines = ["# Data selection vs uniform sampling", "",
             f"teacher `{args.teacher}`, student `{args.student}`" + (f" (first {args.student_layers} layers)" if args.student_layers else "")
             + f", batch {args.batch_size}, lr {args.lr}, full budget {args.steps} steps; refresh every {args.refresh_every} steps,"
             f" temperature {args.temperature}, diversity {args.diversity}, subset fraction {args.fraction}.", "",
             "| run | steps | samples | train texts | held-out cos | p5 | top-10 agr. | steps to reach uniform's final | "
             "asym retrieval | student retrieval | student STS | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        f = r["final"]
        reach = next((s for s, c in r["curve"] if c >= ref), None)
        ev = r.get("eval", {})
        cell = lambda mode, key: f"{ev[mode][key]:.2f}" if ev.get(mode, {}).get(key) is not None else ""
        lines.append(f"| {name} | {r['steps']} | {r['samples']:,} | {r['chosen'] or r['pool'] or ''} | {f['heldout_cos_mean']:.4f} | "
                     f"{f['heldout_cos_p5']:.4f} | {f['top10_agreement']:.3f} | {reach if reach is not None else '-'} | "
                     f"{cell('asymmetric', 'retrieval')} | {cell('student', 'retrieval')} | {cell('student', 'sts')} | {r['seconds']:.0f} |")
    ridge = results["uniform"]["ridge"]
    lines += ["", f"Ridge start (step 0): held-out cos {ridge['heldout_cos_mean']:.4f}." if ridge else "",
              f"Drops (uniform run, degenerate guard): {results['uniform'].get('dropped')}."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
