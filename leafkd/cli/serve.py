"""`leafkd serve`: the HTTP search server over an index and a query encoder."""

from __future__ import annotations

import os
import sys

from leafkd.errors import LeafkdError

# The values of leafkd.retrieval.Mode, spelled out: importing leafkd.retrieval here would need FAISS for `--help`.
MODES = ("asymmetric", "teacher", "student")


def cmd_serve(args) -> int:
    # Imported here, not at parser build time: a missing extra (FAISS, FastAPI) is then one `error:` line.
    from leafkd.retrieval import Retriever
    from leafkd.server import Limits, create_app, serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise LeafkdError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    retriever = Retriever.load(args.index, student=args.student, teacher=args.teacher, mode=args.mode,
                               indexes_dir=args.indexes_dir, device=args.device, gpu=args.gpu,
                               fp16=True if args.fp16 else None, shards=args.shards,
                               allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
                               query_prompt=args.query_prompt, verify=not args.no_verify)
    limits = Limits(max_query_chars=args.max_query_chars, max_queries=args.max_queries, max_top_k=args.max_top_k)
    app = create_app(retriever, api_key=api_key, limits=limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    info = retriever.info()
    print(f"leafkd serve: mode {info['mode']}, {info['documents']} documents ({info['factory']}, FAISS on "
          f"{info['index_device']}), encoder {info['encoder']} on {info['encoder_device']}, "
          f"http://{args.host}:{args.port}{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve /search over HTTP", description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, help="index name (under --indexes-dir) or folder")
    p.add_argument("--indexes-dir", default="indexes")
    p.add_argument("--student", help="student model folder (modes asymmetric and student)")
    p.add_argument("--teacher", help="teacher model folder (mode teacher; default: the index's teacher)")
    p.add_argument("--mode", choices=MODES, default="asymmetric")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=None, help="require the API key held in this environment variable")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="serve a student whose teacher fingerprint differs from the index's (black-box teachers)")
    p.add_argument("--query-prompt", default=None, help="override the query prompt")
    p.add_argument("--device", default=None, help="torch device for the encoder (default: cuda if present)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                   help="search with faiss-gpu (default: when present)")
    g.add_argument("--no-gpu", dest="gpu", action="store_false", help="search on the CPU")
    p.add_argument("--fp16", action="store_true", help="float16 vectors on the GPU (default: as built)")
    p.add_argument("--shards", type=int, default=1, help="shard the index over this many GPUs (-1: all)")
    p.add_argument("--max-batch", type=int, default=256, help="most queries per micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="longest wait to fill a micro-batch under load")
    p.add_argument("--max-query-chars", type=int, default=2048)
    p.add_argument("--max-queries", type=int, default=256, help="most queries per request")
    p.add_argument("--max-top-k", type=int, default=1000)
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification at load (large indexes)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_serve)


