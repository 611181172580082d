"""`leafkd adapt-text`: short training texts cut from an index's own documents (see leafkd.data.adaptation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from leafkd.atomic import write_text
from leafkd.cli.options import add_number, output_folder
from leafkd.data.adaptation import adaptation_text
from leafkd.data.sources import Source
from leafkd.errors import LeafkdError


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # A source may carry a column and a weight (PATH[#COLUMN][*WEIGHT]); the weight is replaced by --weight.
    sources = [Source.parse(s) for s in args.source]
    plain = [f"{s.path}#{s.column}" if s.column else str(s.path) for s in sources]
    names = [s.path.name if s.path.is_dir() else s.path.stem for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LeafkdError(f"two sources named {dupes[0]!r}: their output files would collide; adapt them separately")
    # Every source is read and cut before anything is written: a bad one leaves no output of the others.
    results = []
    for source, name in zip(plain, names):
        pieces, spans = adaptation_text(source, args.spans, seed=f"{args.seed}:{name}")
        if not pieces and not spans:
            raise LeafkdError(f"{source}: no piece of 4+ words in any document")
        results.append((source, name, pieces, spans))
    out.mkdir(parents=True, exist_ok=True)
    data = []
    for source, name, pieces, spans in results:
        pieces_path, spans_path = out / f"{name}-pieces.txt", out / f"{name}-spans.txt"
        write_text(pieces_path, "".join(f"{p}\n" for p in pieces))
        data += [f"--data '{source}*{args.weight}'", f"--data '{pieces_path}*{args.weight}'"]
        if spans:
            write_text(spans_path, "".join(f"{s}\n" for s in spans))
            data.append(f"--data {spans_path}")
        written = f"{source}: {len(pieces)} pieces -> {pieces_path}"
        print(written + (f", {len(spans)} spans -> {spans_path}" if spans else ""))
    print("train on them with your other data (the measured mix: documents and pieces 3x, spans once):")
    print("  " + " ".join(data))
    # The bank loss: the student learns to rank these documents (their teacher vectors) as the teacher does.
    print("and rank the documents as the teacher does (the bank loss at its measured weight):")
    print("  --bank 300 " + " ".join(f"--bank-data '{source}'" for source, *_ in results))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("adapt-text",
                       help="cut an index's documents into sentence pieces and query-sized spans for training")
    p.add_argument("source", nargs="+", help="documents: a BEIR folder (its corpus.jsonl) or any --data source")
    p.add_argument("--out", required=True, type=output_folder,
                   help="folder for NAME-pieces.txt and NAME-spans.txt (written atomically)")
    add_number(p, "--spans", int, min=0, max=10_000, default=4, help="random 4-32-word spans per document (0: none)")
    add_number(p, "--weight", int, min=1, max=1000, default=3,
               help="visits per epoch suggested for the documents and pieces")
    add_number(p, "--seed", int, min=0, max=2**32 - 1, default=0, help="seed of the span draw")
    p.set_defaults(func=_run)
