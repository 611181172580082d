"""The files of an index folder with a document store (manifest ``"layout": 2``).

- ``manifest.json``: what the index is (teacher, dim, factory, ...), the base files and their checksums, the name of
  the store (``"store": "docs.sqlite"``) and ``base_seq``, the last update folded into the base. It is rewritten only
  by a build, a compaction or a migration: each of those is committed by the manifest's atomic rename.
- ``index.<gen>.faiss`` and ``keys.<gen>.npy``: the base FAISS index and the key of each of its vectors, ascending
  (quantised indexes add ``rescore.<gen>.npy`` and ``ranges.<gen>.npy``, see `leafkd.retrieval.quantized`).
- ``segment.<seq>.npy``: the float32 vectors of one add, for the keys the store's ``segments`` table gives.
- ``docs.sqlite``: the document store (`leafkd.retrieval.docstore`); an add or a delete is committed by its
  SQLite transaction.

An add writes its segment file, then commits the store; a delete only commits the store. Both cost O(batch) on disk,
and a kill at any moment leaves either the old or the new state (a segment file the store does not name is an
orphan, removed by `tidy` under the next writer lock). Loading reads the base, adds the segments newer than
``base_seq`` in memory and applies the recorded deletions; `leafkd.retrieval.compaction.compact_index` folds them
into a new base.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from leafkd.atomic import atomic_path, sha256_file, write_npy
from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval.docstore import STORE, DocStore, Segment
from leafkd.retrieval.manifest import MANIFEST, finish_manifest
from leafkd.retrieval.quantized import QuantizedIndex

LAYOUT = 2
GENERATION_FILE = re.compile(r"^(index|docs|keys|rescore|ranges)\.\d+\.")
SEGMENT_FILE = re.compile(r"^segment\.(\d+)\.npy$")
TEMP_FILE = re.compile(r"^\..+\.tmp(\.npy|-journal|-wal|-shm)?$")


def has_store(manifest: dict) -> bool:
    """Whether the manifest describes this layout (else: a ``docs.<gen>.jsonl`` index to migrate)."""
    return bool(manifest.get("store"))


def write_base(folder: Path, gen: int, index: Any, keys: np.ndarray) -> dict[str, str]:
    """Write the base index of generation ``gen`` and its keys (each file atomically); returns {role: file}."""
    if isinstance(index, QuantizedIndex):
        files = index.save(folder, gen)
    else:
        files = {"index": f"index.{gen}.faiss"}
        with atomic_path(folder / files["index"]) as tmp:
            faiss.write_index(index, str(tmp))
    files["keys"] = f"keys.{gen}.npy"
    write_npy(folder / files["keys"], np.asarray(keys, dtype=np.int64))
    return files


def write_new_index(folder: Path, manifest: dict, index: Any, docs: Sequence[Document], keys: np.ndarray | None
                    ) -> dict:
    """Write a freshly built index (generation 1: base, keys, store) into ``folder``; returns its full manifest.
    ``keys`` are the FAISS labels of IVF indexes; other indexes get keys 0..n-1."""
    keys = np.asarray(keys if keys is not None else np.arange(len(docs)), dtype=np.int64)
    files = write_base(folder, 1, index, keys)
    DocStore.create(folder / STORE, docs, keys, next_key=int(keys.max()) + 1 if len(keys) else 0)
    return finish_manifest(folder, {**manifest, "store": STORE, "layout": LAYOUT, "base_seq": 0}, files)


def checksums(folder: Path, files: dict[str, str]) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in files.values()}


def read_base(folder: Path, manifest: dict, keys: np.ndarray | None = None) -> tuple[Any, np.ndarray]:
    """The base index (CPU) and the keys of its vectors (read from its keys file unless given)."""
    files = manifest["files"]
    try:
        if manifest.get("quantization"):
            index: Any = QuantizedIndex.load(folder, manifest)
        else:
            index = faiss.read_index(str(folder / files["index"]))
    except LeafkdError:
        raise
    except Exception as e:
        raise LeafkdError(f"{folder}: FAISS cannot read {files['index']} ({str(e).strip()[:200]})") from None
    if keys is None:
        keys = np.load(folder / files["keys"])
    if keys.ndim != 1 or len(keys) != index.ntotal:
        raise LeafkdError(f"{folder}: the index holds {index.ntotal} vectors but {len(keys)} keys")
    if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        raise LeafkdError(f"{folder}: the keys of the index are not strictly increasing")
    if index.d != int(manifest["dim"]):
        raise LeafkdError(f"{folder}: the index is {index.d}-d but the manifest says {manifest['dim']}")
    return index, keys


def segment_name(seq: int) -> str:
    return f"segment.{seq}.npy"


def write_segment(folder: Path, seq: int, first_key: int, vectors: np.ndarray) -> Segment:
    """Write one add's vectors (atomically, fsynced) and describe them for the store."""
    name = segment_name(seq)
    write_npy(folder / name, np.ascontiguousarray(vectors, dtype=np.float32))
    return Segment(seq, name, sha256_file(folder / name), first_key, len(vectors))


def read_segment(folder: Path, segment: Segment, dim: int, verify: bool) -> np.ndarray:
    path = folder / segment.file
    if not path.exists():
        raise LeafkdError(f"{folder}: the segment file {segment.file} is missing; the index is incomplete")
    if verify and sha256_file(path) != segment.sha256:
        raise LeafkdError(f"{folder}: checksum mismatch for {segment.file}: the file is corrupted or was changed "
                          "outside leafkd")
    vecs = np.load(path)
    if vecs.shape != (segment.count, dim):
        raise LeafkdError(f"{folder}: {segment.file} holds {vecs.shape}, expected ({segment.count}, {dim})")
    return vecs


def tidy(folder: Path, manifest: dict, store: DocStore) -> None:
    """Under the writer lock: forget updates folded into the base, and remove files nothing refers to (old
    generations, legacy JSONL stores, orphaned segments of interrupted adds, temporary files of killed writes)."""
    base_seq = int(manifest.get("base_seq", 0))
    store.forget(base_seq)
    keep = set(manifest["files"].values()) | {MANIFEST} | store.segment_files()
    for f in folder.iterdir():
        if not f.is_file() or f.name in keep:
            continue
        if GENERATION_FILE.match(f.name) or SEGMENT_FILE.match(f.name) or TEMP_FILE.match(f.name):
            with contextlib.suppress(OSError):
                f.unlink()


def store_path(folder: Path, manifest: dict) -> Path:
    return folder / str(manifest.get("store") or STORE)
