"""`leafkd index build|add|delete|info`: teacher-embedded FAISS indexes under indexes/<name>/."""

from __future__ import annotations

import argparse
from pathlib import Path

from leafkd.errors import LeafkdError


def _parse_params(items: list[str] | None) -> dict:
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LeafkdError(f"--param {item!r}: use NAME=VALUE, e.g. nprobe=64")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                raise LeafkdError(f"--param {item!r}: the value must be a number") from None
    return out


def _ids_from(args) -> list[str]:
    ids: list[str] = []
    for item in args.ids or []:
        ids.extend(x for x in item.split(",") if x)
    if args.ids_file:
        p = Path(args.ids_file)
        if not p.exists():
            raise LeafkdError(f"{p}: no such file")
        ids.extend(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if not ids:
        raise LeafkdError("no document ids given (--ids A,B or --ids-file FILE)")
    return ids


def cmd_build(args) -> int:
    from leafkd.retrieval.build import build_index
    from leafkd.retrieval.faiss_utils import faiss_build_name, gpu_count

    gpu = args.gpu
    if gpu is None:
        gpu = gpu_count() > 0
    print(f"FAISS: {faiss_build_name()}, {'GPU' if gpu else 'CPU'} build"
          + ("" if gpu or gpu_count() == 0 else " (GPU present but --no-gpu)"))
    if args.teacher is None and args.vectors is None:
        raise LeafkdError("give --teacher (a model folder) or --vectors (precomputed teacher vectors)")
    folder = build_index(args.name, args.corpus, teacher=args.teacher, vectors=args.vectors, factory=args.factory,
                         indexes_dir=args.indexes_dir, gpu=gpu, fp16=args.fp16, doc_prompt=args.doc_prompt,
                         query_prompt=args.query_prompt, search_params=_parse_params(args.param),
                         overwrite=args.overwrite, device=args.device, show_progress=not args.quiet)
    from leafkd.retrieval.index import index_info

    print(index_info(folder).summary())
    return 0


def cmd_add(args) -> int:
    from leafkd.retrieval.manifest import index_path
    from leafkd.retrieval.updates import add_documents

    m = add_documents(args.name, args.corpus, teacher=args.teacher, indexes_dir=args.indexes_dir, device=args.device,
                      allow_fingerprint_mismatch=args.allow_fingerprint_mismatch, show_progress=not args.quiet)
    print(f"{index_path(args.name, args.indexes_dir)}: {m['count']} documents (generation {m['generation']})")
    return 0


def cmd_delete(args) -> int:
    from leafkd.retrieval.manifest import index_path
    from leafkd.retrieval.updates import delete_documents

    m = delete_documents(args.name, _ids_from(args), indexes_dir=args.indexes_dir, missing_ok=args.missing_ok)
    print(f"{index_path(args.name, args.indexes_dir)}: {m['count']} documents (generation {m['generation']})")
    return 0


def cmd_info(args) -> int:
    import json

    from leafkd.retrieval.index import index_info
    from leafkd.retrieval.manifest import verify_index

    info = index_info(args.name, args.indexes_dir)
    if args.verify:
        verify_index(info.path, info.manifest)
    if args.json:
        print(json.dumps(info.manifest, indent=2))
    else:
        print(info.summary())
        if args.verify:
            print("checksums  ok")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build and update teacher-embedded FAISS indexes",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name", required=True, help="index name under --indexes-dir, or a folder path")
        q.add_argument("--indexes-dir", default="indexes", help="where named indexes live (default: indexes)")

    b = sub.add_parser("build", help="embed a corpus with the teacher and build an index")
    common(b)
    b.add_argument("--teacher", help="teacher model folder (or installed model name)")
    b.add_argument("--vectors", help="precomputed teacher vectors (.npy, corpus order) for a black-box teacher")
    b.add_argument("--corpus", required=True, help="BEIR folder, corpus.jsonl, .jsonl or .txt")
    b.add_argument("--factory", default="Flat",
                   help="FAISS factory string: Flat, HNSW32, IVF4096,Flat, IVF4096,PQ64, SQ8 ...")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                   help="build with faiss-gpu (default: when present)")
    g.add_argument("--no-gpu", dest="gpu", action="store_false", help="build on the CPU")
    b.add_argument("--fp16", action="store_true", help="search flat/IVF vectors in float16 on GPUs")
    b.add_argument("--doc-prompt", default=None, help="prompt the teacher puts before documents")
    b.add_argument("--query-prompt", default=None, help="prompt for teacher-encoded queries (mode teacher)")
    b.add_argument("--param", action="append", help="search parameter NAME=VALUE (nprobe=64, efSearch=256)")
    b.add_argument("--device", default=None, help="torch device for the teacher (default: cuda if present)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index of that name")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("add", help="embed more documents and add them to an index")
    common(a)
    a.add_argument("--corpus", required=True, help="BEIR folder, corpus.jsonl, .jsonl or .txt")
    a.add_argument("--teacher", default=None, help="teacher folder (default: the one recorded in the index)")
    a.add_argument("--device", default=None)
    a.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="accept a teacher with another fingerprint")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_add)

    d = sub.add_parser("delete", help="delete documents by id")
    common(d)
    d.add_argument("--ids", action="append", help="comma-separated document ids (repeatable)")
    d.add_argument("--ids-file", help="file with one id a line")
    d.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the index")
    d.set_defaults(func=cmd_delete)

    i = sub.add_parser("info", help="show an index's manifest")
    common(i)
    i.add_argument("--verify", action="store_true", help="also check the files' checksums")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_info)


