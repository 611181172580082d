"""Adding, deleting and reading documents of a built index, through the library.

Each function takes an index name or folder, or a loaded `DocIndex` (a server's: then the update is applied to it in
memory too, without reloading), or another `leafkd.retrieval.backend.SearchIndex` such as a Milvus collection.

For a FAISS index an add writes one segment file with the new vectors and commits the documents in one SQLite
transaction; a delete commits in SQLite only. Both cost O(batch), hold the index's writer lock, and leave the
previous state loadable if anything fails or the process is killed (see `leafkd.retrieval.segments`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.data.documents import Document, check_unique_ids, read_documents
from leafkd.errors import LeafkdError
from leafkd.retrieval.backend import DuplicateIdError, UnknownIdError
from leafkd.retrieval.build import embed_documents
from leafkd.retrieval.docstore import DocStore, StoreState, encode_metadata
from leafkd.retrieval.index import DocIndex
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR, index_path, read_manifest, writer_lock
from leafkd.retrieval.migrate import ensure_layout, upgrade
from leafkd.retrieval.segments import has_store, store_path, tidy, write_segment
from leafkd.vectors import normalize

IndexRef = Any  # str | Path | DocIndex | SearchIndex


def check_teacher(manifest: dict, teacher_fingerprint: str, allow_mismatch: bool) -> None:
    known = (teacher_fingerprint == manifest["teacher_fingerprint"]
             or teacher_fingerprint in manifest.get("teacher_fingerprints", {}))
    if not known and not allow_mismatch:
        raise LeafkdError(f"the teacher (fingerprint {teacher_fingerprint[:12]}) is not the one that built this index "
                          f"({manifest['teacher_fingerprint'][:12]}, {manifest.get('teacher')})")


def teacher_embeddings(manifest: dict, docs: Sequence[Document], *, teacher: str | Path | None = None, model=None,
                       vectors: np.ndarray | None = None, teacher_fingerprint: str | None = None,
                       allow_fingerprint_mismatch: bool = False, device: str | None = None,
                       show_progress: bool = False) -> np.ndarray:
    """Normalised vectors of ``docs`` in the index's space: precomputed ``vectors``, or embedded by the index's
    teacher (default: the one recorded in the manifest), whose fingerprint must be the index's."""
    from leafkd.models import fingerprint, load_model, resolve_model

    dim = int(manifest["dim"])
    if vectors is not None:
        emb = normalize(np.asarray(vectors, dtype=np.float32))
        if emb.shape != (len(docs), dim):
            raise LeafkdError(f"vectors have shape {emb.shape}, expected ({len(docs)}, {dim})")
        if teacher_fingerprint is None:
            raise LeafkdError("precomputed vectors need the teacher fingerprint they were made with")
        check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
        return emb
    if model is None:
        src = teacher if teacher is not None else manifest.get("teacher")
        try:
            tpath = resolve_model(str(src))
        except LeafkdError:
            raise LeafkdError(f"the index's teacher {src!r} is not a model folder here; pass --teacher") from None
        teacher_fingerprint = teacher_fingerprint or fingerprint(tpath)
        check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
        import torch

        model = load_model(tpath, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        if teacher_fingerprint is None:
            raise LeafkdError("an in-memory teacher model needs teacher_fingerprint")
        check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
    emb = embed_documents(model, docs, prompt=manifest.get("doc_prompt"), device=device, show_progress=show_progress)
    if emb.shape[1] != dim:
        raise LeafkdError(f"the teacher emits {emb.shape[1]}-d vectors, the index is {dim}-d")
    return emb


def with_counts(manifest: dict, state: StoreState) -> dict:
    return {**manifest, "count": state.count, "next_key": state.next_key, "seq": state.seq}


def is_folder_ref(index: IndexRef) -> bool:
    return isinstance(index, (str, Path, DocIndex))


@contextlib.contextmanager
def updating(index: str | Path | DocIndex, indexes_dir: str | Path = DEFAULT_INDEXES_DIR
             ) -> Iterator[tuple[Path, dict, DocStore, DocIndex | None]]:
    """(folder, manifest, store, loaded index or None) under the writer lock, the folder migrated and tidied."""
    loaded = index if isinstance(index, DocIndex) else None
    if loaded is not None and (loaded.path is None or not has_store(loaded.static)):
        raise LeafkdError("this index was loaded without its document store (unmigrated, read-only): it cannot be "
                          "updated in place")
    folder = loaded.path if loaded is not None else index_path(index, indexes_dir)  # type: ignore[arg-type]
    assert folder is not None
    with loaded.write_lock if loaded is not None else contextlib.nullcontext():
        with writer_lock(folder):
            manifest = ensure_layout(folder)
            if loaded is not None:
                loaded.refresh()  # apply what other processes committed first
                store = loaded.store
            else:
                store = DocStore(store_path(folder, manifest))
            try:
                tidy(folder, manifest, store)
                yield folder, manifest, store, loaded
            finally:
                if loaded is None:
                    store.close()


def corpus_documents(corpus: str | Path | Sequence[Document], store: DocStore, state: StoreState) -> list[Document]:
    """The documents to add: read from a file (missing ids numbered from the next key, skipping taken ids)."""
    if isinstance(corpus, (str, Path)):
        docs = read_documents(corpus, id_start=state.next_key, taken=store)
    else:
        docs = list(corpus)
    check_unique_ids(docs, corpus if isinstance(corpus, (str, Path)) else "documents")
    for d in docs:
        encode_metadata(d.id, d.metadata)  # bad metadata fails before anything is embedded
    return docs


def add_documents(index: IndexRef, corpus: str | Path | Sequence[Document], *, teacher: str | Path | None = None,
                  model=None, vectors: np.ndarray | None = None, indexes_dir: str | Path = DEFAULT_INDEXES_DIR,
                  teacher_fingerprint: str | None = None, allow_fingerprint_mismatch: bool = False,
                  device: str | None = None, show_progress: bool = False) -> dict:
    """Embed new documents (with their metadata) by the index's teacher and add them; returns the manifest with the
    new counts. An id already in the index is an error (delete it first to replace it)."""
    embed = dict(teacher=teacher, model=model, vectors=vectors, teacher_fingerprint=teacher_fingerprint,
                 allow_fingerprint_mismatch=allow_fingerprint_mismatch, device=device, show_progress=show_progress)
    if not is_folder_ref(index):  # another backend (Milvus)
        docs = list(corpus) if not isinstance(corpus, (str, Path)) else read_documents(corpus)
        check_unique_ids(docs, corpus if isinstance(corpus, (str, Path)) else "documents")
        return index.insert_documents(docs, teacher_embeddings(index.manifest, docs, **embed))  # type: ignore[arg-type]
    with updating(index, indexes_dir) as (folder, manifest, store, loaded):
        state = store.state()
        docs = corpus_documents(corpus, store, state)
        if not docs:
            return loaded.manifest if loaded is not None else with_counts(manifest, state)
        taken = list(store.keys_of([d.id for d in docs]))
        if taken:
            raise DuplicateIdError(taken)
        emb = teacher_embeddings(manifest, docs, **embed)  # type: ignore[arg-type]
        segment = write_segment(folder, state.seq + 1, state.next_key, emb)
        new_state = store.add(docs, segment)  # the commit
        if loaded is not None:
            loaded.apply_added(emb, segment.keys(), new_state)
            return loaded.manifest
        return with_counts(manifest, new_state)


def delete_documents(index: IndexRef, doc_ids: Sequence[str], *, indexes_dir: str | Path = DEFAULT_INDEXES_DIR,
                     missing_ok: bool = False) -> dict:
    """Delete documents by id; returns the manifest with the new counts. Unknown ids are an error unless
    ``missing_ok``."""
    wanted = list(dict.fromkeys(str(d) for d in doc_ids))
    if not is_folder_ref(index):
        return index.delete_ids(wanted, missing_ok=missing_ok)
    with updating(index, indexes_dir) as (_folder, manifest, store, loaded):
        found = store.keys_of(wanted)
        unknown = [d for d in wanted if d not in found]
        if unknown and not missing_ok:
            raise UnknownIdError(unknown)
        keys, new_state = store.delete(list(found))  # the commit
        if loaded is not None:
            if len(keys):
                loaded.apply_deleted(keys, new_state)
            return loaded.manifest
        return with_counts(manifest, new_state)


def get_document(index: IndexRef, doc_id: str, *, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> Document | None:
    """The document (id, title, text, metadata) with this id, or None; reads only the store."""
    if not isinstance(index, (str, Path)):
        return index.get_document(doc_id)
    folder = index_path(index, indexes_dir)
    manifest = read_manifest(folder)
    store = None
    if not has_store(manifest):
        manifest, store, _keys = upgrade(folder, manifest)
    if store is None:
        store = DocStore(store_path(folder, manifest), readonly=True)
    try:
        return store.get(doc_id)
    finally:
        store.close()
