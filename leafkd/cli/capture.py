"""`leafkd capture`: embed a corpus with the teacher once; resumable; or store black-box vectors."""

from __future__ import annotations

import argparse
import time

from leafkd.cli.options import add_number, existing_file, output_folder
from leafkd.data.sources import load_corpus
from leafkd.errors import LeafkdError


def _run(args: argparse.Namespace) -> int:
    # Loads torch: imported when the command runs, not at `leafkd --help`.
    from leafkd.capture.teacher import capture, capture_blackbox
    from leafkd.runtime import distributed

    distributed.init_from_env(args.device)  # under torchrun: one rank per GPU, shards split over the ranks
    corpus = load_corpus(args.data, args.max_texts, args.seed)
    t = time.perf_counter()
    if args.teacher_vectors:
        store = capture_blackbox(corpus.texts, args.teacher_vectors, args.out, normalize=args.normalize)
    elif args.teacher:
        store = capture(args.teacher, corpus, args.out, prompt=args.prompt, normalize=args.normalize,
                        shard_size=args.shard_size, batch_tokens=args.batch_tokens, device=args.device,
                        show_progress=not args.quiet, compile=args.compile)
    else:
        raise LeafkdError("give --teacher (a model) or --teacher-vectors (a .npy of precomputed vectors)")
    dt = time.perf_counter() - t
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return 0
    print(f"{store.count} vectors ({store.dim}-d, float16) in {store.path}; teacher {store.fingerprint[:12]}; "
          f"{store.manifest.get('truncated', 0)} texts truncated; {dt:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("capture", help="embed texts with the teacher into a resumable vector store")
    p.add_argument("--teacher", help="teacher model folder or installed name")
    p.add_argument("--teacher-vectors", type=existing_file((".npy",)),
                   help="black-box teacher: .npy whose row i embeds text i of --data")
    p.add_argument("--data", action="append", required=True, metavar="SOURCE",
                   help="PATH[#COLUMN][*WEIGHT]: .txt, .jsonl, .tsv or a BEIR folder (repeatable)")
    p.add_argument("--out", required=True, type=output_folder, help="vector store folder (resumed if it exists)")
    p.add_argument("--prompt", default=None, help="prompt prepended to every text")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the stored vectors")
    add_number(p, "--max-texts", int, min=1, max=2**40, default=None, help="a seeded sample of this many unique texts")
    add_number(p, "--seed", int, min=0, max=2**32 - 1, default=0, help="seed of the sample")
    add_number(p, "--shard-size", int, min=1, max=2**31 - 1, default=65536,
               help="texts per committed shard (default: %(default)s)")
    add_number(p, "--batch-tokens", int, min=1, max=2**31 - 1, default=None, help="token budget per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the teacher's packed forward (default: on CUDA for 2,000,000 texts or "
                        "more, where its ~25 s pay off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
