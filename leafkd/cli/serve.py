"""`leafkd serve`: the HTTP search server over an index and a query encoder."""

from __future__ import annotations

import argparse
import os
import sys

from leafkd.cli.options import add_number, existing_file

# The values of leafkd.retrieval.Mode, spelled out: importing leafkd.retrieval here would need FAISS for `--help`.
MODES = ("asymmetric", "teacher", "student")
QUERY_BACKENDS = ("torch", "onnx")  # leafkd.retrieval.onnx_encoder.QueryBackend
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
BACKENDS = ("faiss", "milvus")  # leafkd.retrieval.Backend
MILVUS_TOKEN_ENV = "LEAFKD_MILVUS_TOKEN"


def cmd_serve(args) -> int:
    # Imported here, not at parser build time: a missing extra (FAISS, FastAPI) is then one `error:` line.
    from leafkd.retrieval import Retriever
    from leafkd.server import Limits, create_app, serve
    from leafkd.server.auth import auth_line, resolve_api_key
    from leafkd.server.run import bind_socket

    # Everything a user can get wrong is checked before the (slow) model and index load.
    key = resolve_api_key(key=args.api_key, key_file=args.api_key_file, key_env=args.api_key_env)
    sock = bind_socket(args.host, args.port)
    try:
        address, port = sock.getsockname()[:2]
        auth = auth_line(key, address, args.no_auth)
        threads = cpu_threads(args.threads, "cpu" if args.query_backend == "onnx" else args.device)
        # A plain name is checked and looked up under --indexes-dir; a path is an index folder (served read-only).
        retriever = Retriever.load(args.index, student=args.student, teacher=args.teacher, mode=args.mode,
                                   indexes_dir=args.indexes_dir, device=args.device, gpu=args.gpu,
                                   fp16=True if args.fp16 else None, shards=args.shards,
                                   allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
                                   query_prompt=args.query_prompt, verify=not args.no_verify,
                                   backend=args.backend, uri=args.milvus_uri,
                                   token=os.environ.get(MILVUS_TOKEN_ENV) if args.backend == "milvus" else None,
                                   query_backend=args.query_backend, onnx_threads=threads or 1)
        teacher = None
        if args.with_teacher:  # for POST /documents and /v1/embeddings input_type=document
            from leafkd.server.teacher import DocumentEncoder

            teacher = DocumentEncoder.load(retriever.index, args.teacher, device=args.device,
                                           allow_fingerprint_mismatch=args.allow_fingerprint_mismatch)
        limits = Limits(max_query_chars=args.max_query_chars, max_queries=args.max_queries, max_top_k=args.max_top_k,
                        max_hits=args.max_hits, max_response_bytes=int(args.max_response_mb * 2**20),
                        max_body_bytes=int(args.max_body_mb * 2**20), max_documents=args.max_documents,
                        max_document_chars=args.max_document_chars)
        app = create_app(retriever, api_key=key.value if key else None, limits=limits, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, docs=args.docs, teacher=teacher)
        info = retriever.info()
        print(f"leafkd serve: mode {info['mode']}, {info['documents']} documents ({info['factory']}, "
              f"{info['backend']} on {info['index_device']}), encoder {info['encoder']} on {info['encoder_device']}"
              f"{f' ({threads} threads)' if threads else ''}"
              f"{f', teacher {teacher.name} for documents' if teacher else ''}, http://{args.host}:{port}; {auth}",
              file=sys.stderr, flush=True)
        serve(app, log_level=args.log_level, sock=sock)
    finally:
        sock.close()
    return 0


def cpu_threads(threads: int | None, device: str | None) -> int | None:
    """Set torch's CPU threads for the encoder; returns the number set (None: left to torch, on a GPU).

    By default a CPU server keeps one core for the event loop, HTTP parsing and tokenisation: with every core in
    torch's thread pool, its spinning threads and the request handling slow each other down under load.
    """
    import torch

    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if threads is None and not on_cpu:
        return None
    n = threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(n)
    return n


def _auth_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("authentication", "A key from any source turns authentication on: requests to every "
                             "route but /health and /openapi.json must carry it in the X-API-Key header or as "
                             "'Authorization: Bearer KEY'. Without a key the server binds to a loopback address "
                             "only, unless --no-auth.")
    g.add_argument("--api-key-file", type=existing_file(), metavar="FILE", help="read the API key from this file")
    g.add_argument("--api-key-env", metavar="VAR", help="read the API key from this environment variable "
                   "(default: LEAFKD_API_KEY, whenever it is set)")
    g.add_argument("--api-key", metavar="KEY", help="the API key itself (visible to other users in the process "
                   "list: prefer --api-key-file or LEAFKD_API_KEY)")
    g.add_argument("--no-auth", action="store_true",
                   help="serve without an API key on a non-loopback --host (anyone who reaches it can search)")


def _limit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits", "Requests beyond them get a 4xx answer.")
    add_number(g, "--max-query-chars", int, min=1, max=1_000_000, default=2048, help="longest query, in characters")
    add_number(g, "--max-queries", int, min=1, max=100_000, default=256, help="most queries per request")
    add_number(g, "--max-top-k", int, min=1, max=100_000, default=1000, help="largest top_k")
    add_number(g, "--max-hits", int, min=1, max=100_000_000, default=10_000,
               help="most queries x top_k per request")
    add_number(g, "--max-response-mb", float, gt=0, max=65_536, default=64.0, help="largest answer, in MiB")
    add_number(g, "--max-body-mb", float, gt=0, max=1024, default=4.0, help="largest request body, in MiB")
    add_number(g, "--max-documents", int, min=1, max=100_000, default=256,
               help="most documents per POST/DELETE /documents (and inputs per /v1/embeddings of documents)")
    add_number(g, "--max-document-chars", int, min=1, max=100_000_000, default=100_000,
               help="longest document (title + text), in characters")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve /search over HTTP", description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True,
                   help="index name (under --indexes-dir), or the path of an index folder (with a '/')")
    p.add_argument("--indexes-dir", default="indexes", help="where named indexes live (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="faiss",
                   help="faiss: an index folder; milvus: the Milvus collection named --index at --milvus-uri")
    p.add_argument("--milvus-uri", default=None,
                   help=f"Milvus Lite file (.db) or server/cluster URI (http://host:19530); its token, if any, "
                        f"from ${MILVUS_TOKEN_ENV}")
    p.add_argument("--student", help="student model folder (modes asymmetric and student)")
    p.add_argument("--teacher", help="teacher model folder (mode teacher, --with-teacher; default: the index's "
                   "teacher)")
    p.add_argument("--with-teacher", action="store_true",
                   help="also load the index's teacher, to add documents (POST /documents) and embed them "
                        "(/v1/embeddings with input_type document)")
    p.add_argument("--mode", choices=MODES, default="asymmetric")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add_number(p, "--port", int, min=0, max=65535, default=8000,
               help="port to listen on (0: any free port, shown at start-up; default: %(default)s)")
    _auth_options(p)
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="serve a student whose teacher fingerprint differs from the index's (black-box teachers)")
    p.add_argument("--query-prompt", default=None, help="override the query prompt")
    p.add_argument("--device", default=None, help="torch device for the encoder (default: cuda if present)")
    p.add_argument("--query-backend", choices=QUERY_BACKENDS, default="torch",
                   help="query encoder: torch, or onnx (the model's `leafkd export --onnx` graph in onnxruntime on "
                        "the CPU; its int8 graph when exported; --threads sets onnxruntime's threads)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                   help="search with faiss-gpu (default: when present)")
    g.add_argument("--no-gpu", dest="gpu", action="store_false", help="search on the CPU")
    p.add_argument("--fp16", action="store_true", help="float16 vectors on the GPU (default: as built)")
    add_number(p, "--threads", int, min=1, max=1024, default=None,
               help="torch CPU threads (default on a CPU encoder: one fewer than the cores, at least 1)")
    add_number(p, "--shards", int, min=1, max=1024, also=(-1,), default=1,
               help="shard the index over this many GPUs (-1: all)")
    add_number(p, "--max-batch", int, min=1, max=65_536, default=256, help="most queries per micro-batch")
    add_number(p, "--max-wait-ms", float, min=0, max=10_000, default=2.0,
               help="longest wait to fill a micro-batch under load")
    _limit_options(p)
    p.add_argument("--docs", action="store_true",
                   help="serve the API pages /docs and /redoc (off by default: the browser loads their scripts "
                        "from a CDN); /openapi.json is always served")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification at load (large indexes)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning")
    p.set_defaults(func=cmd_serve)
