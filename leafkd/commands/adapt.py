"""`leafkd adapt-text`: short training texts cut from an index's own documents (see leafkd.adapt)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from leafkd.adapt import adaptation_text
    from leafkd.atomic import write_text
    from leafkd.errors import LeafkdError

    if args.spans < 0:
        raise LeafkdError(f"--spans {args.spans}: must be >= 0")
    names = [Path(s).name if Path(s).is_dir() else Path(s.split("#")[0]).stem for s in args.source]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LeafkdError(f"two sources named {dupes[0]!r}: their output files would collide; adapt them separately")
    out = Path(args.out)
    data = []
    for source, name in zip(args.source, names):
        pieces, spans = adaptation_text(source, args.spans, seed=f"{args.seed}:{name}")
        if not pieces and not spans:
            raise LeafkdError(f"{source}: no piece of 4+ words in any document")
        out.mkdir(parents=True, exist_ok=True)
        pieces_path, spans_path = out / f"{name}-pieces.txt", out / f"{name}-spans.txt"
        write_text(pieces_path, "".join(f"{p}\n" for p in pieces))
        data += [f"--data '{source}*{args.weight}'", f"--data '{pieces_path}*{args.weight}'"]
        if spans:
            write_text(spans_path, "".join(f"{s}\n" for s in spans))
            data.append(f"--data {spans_path}")
        print(f"{source}: {len(pieces)} pieces -> {pieces_path}" + (f", {len(spans)} spans -> {spans_path}" if spans else ""))
    print("train on them with your other data (the measured mix: documents and pieces 3x, spans once):")
    print("  " + " ".join(data))
    return 0


def register(sub) -> None:
    p = sub.add_parser("adapt-text", help="cut an index's documents into sentence pieces and query-sized spans for training")
    p.add_argument("source", nargs="+", help="documents: a BEIR folder (its corpus.jsonl) or any --data source")
    p.add_argument("--out", required=True, help="folder for NAME-pieces.txt and NAME-spans.txt (written atomically)")
    p.add_argument("--spans", type=int, default=4, help="random 4-32-word spans per document (0: none)")
    p.add_argument("--weight", type=int, default=3, help="visits per epoch suggested for the documents and pieces")
    p.add_argument("--seed", type=int, default=0, help="seed of the span draw")
    p.set_defaults(func=_run)
