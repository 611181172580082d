"""Adding and deleting documents of a built index: new generation files first, then the manifest swap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leafkd.atomic import write_json
from leafkd.data.documents import Document, check_unique_ids, read_documents
from leafkd.errors import LeafkdError
from leafkd.retrieval.build import embed_documents
from leafkd.retrieval.faiss_utils import add_vectors
from leafkd.retrieval.index import load_index
from leafkd.retrieval.manifest import (
    DEFAULT_INDEXES_DIR,
    MANIFEST,
    finish_manifest,
    index_path,
    remove_stale,
    save_generation,
    writer_lock,
)
from leafkd.vectors import normalize


def check_teacher(manifest: dict, teacher_fingerprint: str, allow_mismatch: bool) -> None:
    known = (teacher_fingerprint == manifest["teacher_fingerprint"]
             or teacher_fingerprint in manifest.get("teacher_fingerprints", {}))
    if not known and not allow_mismatch:
        raise LeafkdError(f"the teacher (fingerprint {teacher_fingerprint[:12]}) is not the one that built this index "
                          f"({manifest['teacher_fingerprint'][:12]}, {manifest.get('teacher')})")


def commit(folder: Path, manifest: dict, index, ids, titles, texts, keys) -> dict:
    """Write generation+1 files, then swap the manifest: the old index stays valid until the last rename."""
    gen = int(manifest["generation"]) + 1
    files = save_generation(folder, gen, index, ids, titles, texts, keys)
    manifest = finish_manifest(folder, {**manifest, "generation": gen}, files)
    write_json(folder / MANIFEST, manifest)
    remove_stale(folder, manifest)
    return manifest


def add_documents(name_or_path: str | Path, corpus: str | Path | Sequence[Document], *,
                  teacher: str | Path | None = None, model=None, vectors: np.ndarray | None = None,
                  indexes_dir: str | Path = DEFAULT_INDEXES_DIR, teacher_fingerprint: str | None = None,
                  allow_fingerprint_mismatch: bool = False, device: str | None = None,
                  show_progress: bool = False) -> dict:
    """Embed new documents with the index's teacher and add them; returns the new manifest.

    The teacher defaults to the one recorded in the manifest; its fingerprint must match the index's.
    """
    from leafkd.models import fingerprint, load_model, resolve_model

    folder = index_path(name_or_path, indexes_dir)
    with writer_lock(folder):
        current = load_index(folder)
        manifest = current.manifest
        start = int(manifest["next_key"])
        if isinstance(corpus, (str, Path)):
            docs = read_documents(corpus, id_start=start, taken=current.live_ids())
        else:
            docs = list(corpus)
        check_unique_ids(docs, corpus if isinstance(corpus, (str, Path)) else "documents")
        clash = [d.id for d in docs if d.id in current]
        if clash:
            raise LeafkdError(f"{len(clash)} document id(s) already in the index ({', '.join(clash[:5])}); "
                              "delete them first to replace them")
        if vectors is not None:
            emb = normalize(np.asarray(vectors))
            if emb.shape != (len(docs), current.dim):
                raise LeafkdError(f"vectors have shape {emb.shape}, expected ({len(docs)}, {current.dim})")
            if teacher_fingerprint is None:
                raise LeafkdError("precomputed vectors need the teacher fingerprint they were made with")
            check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
        else:
            if model is None:
                src = teacher if teacher is not None else manifest.get("teacher")
                try:
                    tpath = resolve_model(str(src))
                except LeafkdError:
                    raise LeafkdError(f"the index's teacher {src!r} is not a model folder here; "
                                      "pass --teacher") from None
                teacher_fingerprint = teacher_fingerprint or fingerprint(tpath)
                check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
                import torch

                model = load_model(tpath, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
            else:
                if teacher_fingerprint is None:
                    raise LeafkdError("an in-memory teacher model needs teacher_fingerprint")
                check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
            emb = embed_documents(model, docs, prompt=manifest.get("doc_prompt"), device=device,
                                  show_progress=show_progress)
        if emb.shape[1] != current.dim:
            raise LeafkdError(f"the teacher emits {emb.shape[1]}-d vectors, the index is {current.dim}-d")
        index = current.index
        keys = None
        if manifest["labels"] == "keys":
            new_keys = np.arange(start, start + len(docs), dtype=np.int64)
            add_vectors(index, emb, new_keys)
            keys = np.concatenate([current.keys, new_keys])
        else:
            add_vectors(index, emb, None)
        ids = current.ids + [d.id for d in docs]
        titles = current.titles + [d.title for d in docs]
        texts = current.texts + [d.text for d in docs]
        manifest = {**manifest, "count": current.count + len(docs), "rows": len(ids), "next_key": start + len(docs)}
        return commit(folder, manifest, index, ids, titles, texts, keys)


def delete_documents(name_or_path: str | Path, doc_ids: Sequence[str], *, indexes_dir: str | Path = DEFAULT_INDEXES_DIR,
                     missing_ok: bool = False) -> dict:
    """Delete documents by id; returns the new manifest. Unknown ids are an error unless ``missing_ok``."""
    folder = index_path(name_or_path, indexes_dir)
    with writer_lock(folder):
        current = load_index(folder)
        manifest = current.manifest
        wanted = list(dict.fromkeys(str(d) for d in doc_ids))
        unknown = [d for d in wanted if d not in current]
        if unknown and not missing_ok:
            raise LeafkdError(f"{len(unknown)} id(s) not in the index: {', '.join(unknown[:5])}"
                              f"{', ...' if len(unknown) > 5 else ''}")
        rows = np.array(sorted(current.row_of(d) for d in wanted if d in current), dtype=np.int64)
        if len(rows) == 0:
            return manifest
        index = current.index
        ids, titles, texts, keys = list(current.ids), list(current.titles), list(current.texts), current.keys
        labels = keys[rows] if manifest["labels"] == "keys" and keys is not None else rows
        before = int(index.ntotal)
        try:
            removed = int(index.remove_ids(np.ascontiguousarray(labels, dtype=np.int64)))
        except RuntimeError:
            removed = -1  # this index type cannot remove vectors (HNSW): tombstone the rows instead
        if removed == len(rows) and index.ntotal == before - len(rows):
            keep = np.ones(len(ids), dtype=bool)
            keep[rows] = False
            ids = [x for x, k in zip(ids, keep) if k]
            titles = [x for x, k in zip(titles, keep) if k]
            texts = [x for x, k in zip(texts, keep) if k]
            if keys is not None:
                keys = keys[keep]
            tomb = int(manifest.get("tombstones", 0))
        elif removed in (-1, 0) and index.ntotal == before and manifest["labels"] == "positions":
            for r in rows.tolist():
                ids[r], titles[r], texts[r] = None, "", ""
            tomb = int(manifest.get("tombstones", 0)) + len(rows)
        else:  # the in-memory copy is now inconsistent; nothing was written, so the folder is intact
            raise LeafkdError(f"FAISS removed {removed} of {len(rows)} vectors from {manifest['factory']!r}; "
                              "the index on disk is unchanged")
        manifest = {**manifest, "count": current.count - len(rows), "rows": len(ids), "tombstones": tomb}
        return commit(folder, manifest, index, ids, titles, texts, keys)


