"""`leafkd eval`: score teacher / student / asymmetric / baselines on local retrieval and STS tasks."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from leafkd.errors import LeafkdError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(subparsers) -> None:
    from leafkd.evaluation.embedders import Mode
    from leafkd.evaluation.engines import Engine
    from leafkd.evaluation.tasks import DEFAULT_TASKS

    p = subparsers.add_parser(
        "eval", help="evaluate teacher, student, asymmetric and baselines (MTEB-style, offline)",
        description="Score each mode on local retrieval (nDCG@10) and STS (Spearman) tasks; print a table and "
                    "save JSON, markdown and PNG charts under --out.")
    p.add_argument("--teacher", help="teacher model folder (default: the student's leafkd.json 'teacher')")
    p.add_argument("--student", help="distilled student folder (with leafkd.json)")
    p.add_argument("--base", help="the student's base model before distillation (default: leafkd.json 'base')")
    p.add_argument("--ridge", action="store_true", help="add the ridge-map baseline (base -> teacher)")
    p.add_argument("--modes", type=_csv,
                   help=f"comma-separated, from {','.join(m.value for m in Mode)} (default: all available)")
    p.add_argument("--tasks", type=_csv, default=list(DEFAULT_TASKS),
                   help=f"comma-separated: {','.join(DEFAULT_TASKS)}, BEIR folders or STS .tsv files "
                        "(default: all five)")
    p.add_argument("--data-dir", help="data folder (default: $LEAFKD_DATA or ../shared/data beside the repo)")
    p.add_argument("--out", help="output folder (default: eval/results/<student or teacher>-<time>)")
    p.add_argument("--engine", choices=[e.value for e in Engine],
                   help="mteb (reference; default when installed) or fast")
    p.add_argument("--alignment", action="store_true",
                   help="also run alignment diagnostics (cosine, top-10 agreement, truncation, quantisation)")
    p.add_argument("--ridge-texts", type=int, default=20000, help="training texts for the ridge fit (default 20000)")
    p.add_argument("--ridge-alpha", type=float, default=1e-2,
                   help="relative ridge penalty: alpha x the mean eigenvalue of the base vectors' centred Gram matrix "
                        "(default 0.01, the rule and value of training's projection warm start)")
    p.add_argument("--batch-tokens", type=int, help="token budget per encoding batch")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--teacher-query-prompt", help="override the teacher's query prompt ('' for none)")
    p.add_argument("--student-query-prompt", help="override the student's query prompt ('' for none)")
    p.add_argument("--keep-identical-ids", action="store_true",
                   help="let a document whose id equals the query's be retrieved (BEIR/MTEB skip it)")
    p.add_argument("--progress", action="store_true", help="show encoding progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leafkd.evaluation.report import markdown_table, write_report
    from leafkd.evaluation.runner import run_evaluation

    if args.ridge_texts < 2:
        raise LeafkdError("--ridge-texts must be at least 2")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise LeafkdError("--batch-tokens must be positive")
    if not args.teacher and not args.student:
        raise LeafkdError("give --teacher and/or --student")
    data_dir = args.data_dir
    modes = args.modes
    if modes is not None and args.ridge and "ridge" not in modes:
        modes = [*modes, "ridge"]

    results = run_evaluation(
        teacher=args.teacher, student=args.student, base=args.base, modes=modes, tasks=args.tasks,
        data_dir=data_dir, engine=args.engine, ridge=args.ridge, ridge_n=args.ridge_texts,
        ridge_alpha=args.ridge_alpha, with_alignment=args.alignment, device=args.device,
        batch_tokens=args.batch_tokens, teacher_query_prompt=args.teacher_query_prompt,
        student_query_prompt=args.student_query_prompt, ignore_identical_ids=not args.keep_identical_ids,
        progress=args.progress)
    out = Path(args.out) if args.out else Path("eval/results") / (
        f"{Path(args.student or args.teacher).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_report(results, out)
    print(markdown_table(results), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr, flush=True)
    return 0


