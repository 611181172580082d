"""`leafkd distill CORPUS --teacher T`: the main job in one command (see leafkd.pipeline.distill).

A student distilled for one corpus: the teacher embeds the corpus (and the extra training text) once, the student
trains with the corpus-adapted recipe, the corpus's index is built from the captured vectors, the result is
evaluated when the corpus has queries and relevance labels, and the command that serves it is printed.
"""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

from leafkd.cli.options import number, output_folder


def _train_override(item: str) -> dict[str, Any]:
    """KEY=VALUE of a training option, the value read as TOML (`epochs=3`, `lr=2e-3`); a bare word is a string."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {item!r}: expected KEY=VALUE (a train-embedder option)")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return {key.strip().replace("-", "_"): parsed}


def _run(args: argparse.Namespace) -> int:
    from leafkd.pipeline import distill, load_distill_config

    train = {k: v for item in args.set or [] for k, v in item.items()}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    cfg = load_distill_config(args.config, corpus=args.corpus, teacher=args.teacher, student=args.student,
                              out=args.out, queries=args.queries, qrels=args.qrels, data=args.data,
                              data_dir=args.data_dir, vectors=args.vectors, factory=args.factory, seed=args.seed,
                              device=args.device, deterministic=args.deterministic or None,
                              evaluate=False if args.no_eval else None, progress=False if args.quiet else None,
                              train=train)
    result = distill(cfg)
    print(f"student  {result.student}  (SentenceTransformer(path) loads it)")
    print(f"index    {result.index}  ({result.documents} documents, from the captured teacher vectors)")
    print(f"teacher  {result.teacher_texts} texts embedded once, in {result.store}")
    if result.scores:
        teacher = result.scores.get("teacher") or float("nan")
        print(f"\nnDCG@10 on {cfg.corpus}:")
        for mode, score in result.scores.items():
            print(f"  {mode:<11} {100 * score:6.2f}  {100 * score / teacher:6.1f}% of the teacher")
        print(f"report   {result.out / 'report.md'}")
    print(f"\nserve it:\n  {result.serve_command}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("distill", help="distil a student for a corpus, index it and evaluate it (the main job)",
                       description=__doc__.splitlines()[0])
    p.add_argument("corpus", nargs="?", help="documents: a BEIR folder, corpus.jsonl, a .jsonl (_id, title, text) "
                   "or a .txt (or corpus = ... in the --config file's [distill] table)")
    p.add_argument("--teacher", help="teacher model folder or installed name")
    p.add_argument("--student", help="student base encoder (default: all-MiniLM-L6-v2); 'teacher' (its own layers) "
                   "or 'static', and NAME:LAYERS / static:DIM in one string (teacher:first:6, static:256)")
    p.add_argument("--out", type=output_folder, help="run folder (default: runs/distill)")
    p.add_argument("--queries", help="queries.jsonl to evaluate with (a BEIR folder brings its own)")
    p.add_argument("--qrels", help="relevance TSV (query-id, corpus-id, score) to evaluate with")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="extra training text PATH[#COLUMN][*WEIGHT] (repeatable; default: the generic mix of "
                        "DATA/train)")
    p.add_argument("--data-dir", help="where the generic mix is found (default: $LEAFKD_DATA or ../shared/data)")
    p.add_argument("--vectors", help="teacher-vector store to use or fill (default: OUT/teacher-vectors); one "
                   "store can serve many runs with the same teacher")
    p.add_argument("--factory", help="FAISS factory string of the index (default: Flat)")
    p.add_argument("--seed", type=number(int, min=0, max=2**32 - 1),
                   help="seed of the spans, the split and the training (default: 0)")
    p.add_argument("--epochs", type=number(float, gt=0), help="training epochs (default: the recipe's 10)")
    p.add_argument("--set", type=_train_override, action="append", metavar="KEY=VALUE",
                   help="any train-embedder option over the recipe (repeatable), e.g. --set batch_size=1024")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--deterministic", action="store_true",
                   help="eager GPU kernels (no compile, no CUDA graphs): the same weights on every run, slower")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation stage")
    p.add_argument("--config", help="TOML file with a [distill] table (and a [train] table of recipe overrides)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
