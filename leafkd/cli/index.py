"""`leafkd index build|add|delete|info`: teacher-embedded FAISS indexes under indexes/<name>/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leafkd.cli.options import existing_file
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
        ids.extend(line.strip() for line in Path(args.ids_file).read_text(encoding="utf-8").splitlines()
                   if line.strip())
    if not ids:
        raise LeafkdError("no document ids given (--ids A,B or --ids-file FILE)")
    return ids


def _folder(args) -> Path:
    """The index folder of ``--name`` (a plain name, never a path) under ``--indexes-dir``."""
    from leafkd.retrieval.manifest import check_index_name, check_indexes_dir

    return check_indexes_dir(args.indexes_dir) / check_index_name(args.name)


def _check_vectors(path: Path) -> None:
    """A readable .npy of a 2-d numeric array (a black-box teacher's vectors), or a one-line error."""
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise LeafkdError(f"--vectors {path}: not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise LeafkdError(f"--vectors {path}: expected a 2-d numeric array (documents x dim)")


def _report_empty(corpus: str) -> None:
    """Say which documents of a corpus are skipped for being empty (no title and no text), by id."""
    from leafkd.data.documents import corpus_file, iter_jsonl

    try:
        path = corpus_file(corpus)
        if path.suffix != ".jsonl":
            return  # blank lines of a .txt are separators, not documents
        empty = [str(obj.get("_id", obj.get("id", f"line {n}"))) for n, obj in iter_jsonl(path)
                 if isinstance(obj, dict) and isinstance(obj.get("text"), str) and not obj["text"].strip()
                 and not str(obj.get("title") or "").strip()]
    except (LeafkdError, OSError, UnicodeDecodeError):
        return  # the corpus reader reports the problem itself
    if empty:
        more = f" and {len(empty) - 20} more" if len(empty) > 20 else ""
        print(f"note: {len(empty)} empty document(s) skipped (no title, no text): {', '.join(empty[:20])}{more}",
              file=sys.stderr)


def cmd_build(args) -> int:
    from leafkd.retrieval.build import build_index
    from leafkd.retrieval.faiss_utils import faiss_build_name, gpu_count

    folder = _folder(args)
    if args.teacher is None and args.vectors is None:
        raise LeafkdError("give --teacher (a model folder) or --vectors (precomputed teacher vectors)")
    if args.vectors is not None:
        _check_vectors(args.vectors)
    gpu = args.gpu
    if gpu is None:
        gpu = gpu_count() > 0
    print(f"FAISS: {faiss_build_name()}, {'GPU' if gpu else 'CPU'} build"
          + ("" if gpu or gpu_count() == 0 else " (GPU present but --no-gpu)"))
    _report_empty(args.corpus)
    folder = build_index(folder, args.corpus, teacher=args.teacher, vectors=args.vectors, factory=args.factory,
                         gpu=gpu, fp16=args.fp16, doc_prompt=args.doc_prompt, query_prompt=args.query_prompt,
                         search_params=_parse_params(args.param), overwrite=args.overwrite, device=args.device,
                         show_progress=not args.quiet)
    from leafkd.retrieval.index import index_info

    print(index_info(folder).summary())
    return 0


def cmd_add(args) -> int:
    from leafkd.retrieval.updates import add_documents

    folder = _folder(args)
    _report_empty(args.corpus)
    m = add_documents(folder, args.corpus, teacher=args.teacher, device=args.device,
                      allow_fingerprint_mismatch=args.allow_fingerprint_mismatch, show_progress=not args.quiet)
    print(f"{folder}: {m['count']} documents (generation {m['generation']})")
    return 0


def cmd_delete(args) -> int:
    from leafkd.retrieval.updates import delete_documents

    folder = _folder(args)
    m = delete_documents(folder, _ids_from(args), missing_ok=args.missing_ok)
    print(f"{folder}: {m['count']} documents (generation {m['generation']})")
    return 0


def cmd_snapshot(args) -> int:
    from leafkd.retrieval.snapshot import snapshot_index

    dest = snapshot_index(_folder(args), args.to)
    print(f"{dest}: a snapshot of {_folder(args)} (loads like any index: leafkd serve --index {dest})")
    return 0


def cmd_compact(args) -> int:
    from leafkd.retrieval.compaction import compact_index
    from leafkd.retrieval.index import index_info

    folder = _folder(args)
    compact_index(folder)
    print(index_info(folder).summary())
    return 0


def cmd_info(args) -> int:
    import json

    from leafkd.retrieval.index import index_info
    from leafkd.retrieval.manifest import verify_index

    info = index_info(_folder(args))
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
        q.add_argument("--name", required=True,
                       help="index name: letters, digits, '.', '_', '-' (a name, not a path: see --indexes-dir)")
        q.add_argument("--indexes-dir", default="indexes", help="where named indexes live (default: indexes)")

    b = sub.add_parser("build", help="embed a corpus with the teacher and build an index")
    common(b)
    b.add_argument("--teacher", help="teacher model folder (or installed model name)")
    b.add_argument("--vectors", type=existing_file((".npy",)),
                   help="precomputed teacher vectors (.npy, corpus order) for a black-box teacher")
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
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing index of that name (never another folder or a symbolic link)")
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
    d.add_argument("--ids-file", type=existing_file(), help="file with one id a line")
    d.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the index")
    d.set_defaults(func=cmd_delete)

    s = sub.add_parser("snapshot", help="copy an index consistently (while servers search and update it)")
    common(s)
    s.add_argument("--to", required=True, type=Path,
                   help="the new folder for the copy (must not exist; hard links where the filesystem allows)")
    s.set_defaults(func=cmd_snapshot)

    c = sub.add_parser("compact", help="fold pending adds and deletes into a new base index (O(corpus))")
    common(c)
    c.set_defaults(func=cmd_compact)

    i = sub.add_parser("info", help="show an index's manifest")
    common(i)
    i.add_argument("--verify", action="store_true", help="also check the files' checksums")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_info)


