"""Migrating ``leafkd-index/1`` folders with a JSONL store (``docs.<gen>.jsonl`` + ``keys.<gen>.npy``) to the SQLite
document store layout (`leafkd.retrieval.segments`).

The migration writes ``docs.sqlite`` and the keys file next to the old files, then commits by swapping the
manifest; a kill before the swap leaves the old index as it was (the next attempt starts over). Tombstone rows of
HNSW indexes become recorded deletions. An index that cannot be migrated here (a read-only folder, or another
process holding the writer lock) is read into an in-memory store instead and served as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from leafkd.atomic import sha256_file, write_json, write_npy
from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval.docstore import STORE, DocStore, read_docs
from leafkd.retrieval.manifest import MANIFEST, read_manifest, verify_index, writer_lock
from leafkd.retrieval.segments import LAYOUT, has_store, tidy

logger = logging.getLogger(__name__)


def legacy_rows(folder: Path, manifest: dict) -> tuple[list[Document], np.ndarray, np.ndarray, np.ndarray]:
    """(live documents, their keys, every row's key in FAISS order, keys of tombstone rows) of a JSONL store."""
    ids, titles, texts = read_docs(folder / manifest["files"]["docs"])
    if manifest["labels"] == "keys":
        keys = np.load(folder / manifest["files"]["keys"]).astype(np.int64)
    else:
        keys = np.arange(len(ids), dtype=np.int64)
    if len(keys) != len(ids):
        raise LeafkdError(f"{folder}: {len(keys)} keys for {len(ids)} document rows")
    live = [i for i, d in enumerate(ids) if d is not None]
    docs = [Document(str(ids[i]), titles[i], texts[i]) for i in live]
    dead = np.array([i for i, d in enumerate(ids) if d is None], dtype=np.int64)
    return docs, keys[live], keys, keys[dead]


def migrate(folder: Path, manifest: dict) -> dict:
    """Rewrite a verified JSONL-store index in the store layout (the caller holds the writer lock)."""
    verify_index(folder, manifest)
    docs, live_keys, keys, removed = legacy_rows(folder, manifest)
    gen = int(manifest["generation"])
    DocStore.create(folder / STORE, docs, live_keys, removed=removed.tolist(),
                    next_key=int(manifest.get("next_key", len(keys))))
    files = {"index": manifest["files"]["index"], "keys": f"keys.{gen}.npy"}
    if "keys" not in manifest["files"]:
        write_npy(folder / files["keys"], keys)
    sums = {files["index"]: manifest["checksums"][files["index"]], files["keys"]: sha256_file(folder / files["keys"])}
    new = {**manifest, "store": STORE, "layout": LAYOUT, "base_seq": 0, "files": files, "checksums": sums}
    write_json(folder / MANIFEST, new)  # the commit
    store = DocStore(folder / STORE)
    try:
        tidy(folder, new, store)  # the JSONL store goes
    finally:
        store.close()
    logger.info("%s: migrated to the SQLite document store (%d documents)", folder, len(docs))
    return new


def ensure_layout(folder: Path) -> dict:
    """The current manifest, after migrating a JSONL-store index (the caller holds the writer lock)."""
    manifest = read_manifest(folder)
    return manifest if has_store(manifest) else migrate(folder, manifest)


def in_memory(folder: Path, manifest: dict) -> tuple[DocStore, np.ndarray]:
    """A JSONL-store index's documents in an in-memory store, and the keys of its FAISS rows."""
    docs, live_keys, keys, removed = legacy_rows(folder, manifest)
    store = DocStore(":memory:")
    store.fill(docs, live_keys, removed=removed.tolist(), next_key=int(manifest.get("next_key", len(keys))))
    return store, keys


def upgrade(folder: Path, manifest: dict) -> tuple[dict, DocStore | None, np.ndarray | None]:
    """Migrate a JSONL-store index for loading: (new manifest, None, None), or where it cannot be written here,
    (its manifest, an in-memory store, its keys)."""
    try:
        with writer_lock(folder):
            current = read_manifest(folder)
            return (current if has_store(current) else migrate(folder, current)), None, None
    except OSError as e:  # a read-only folder
        reason = str(e)
    except LeafkdError as e:
        if "another leafkd process" not in str(e):  # a corrupted index is an error, not a fallback
            raise
        reason = str(e)
    logger.warning("note: %s: serving the old JSONL-store index from memory, unmigrated (%s)", folder, reason)
    store, keys = in_memory(folder, manifest)
    return manifest, store, keys
