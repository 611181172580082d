"""Teacher-built FAISS indexes on disk: load (checksummed), search with metadata filters, apply updates in memory.

An index folder ``indexes/<name>/`` holds a base FAISS index, per-add segment files and an SQLite document store
(see `leafkd.retrieval.segments` for the layout and why every update is atomic and O(batch)). Loading reads the
base, adds the segments and applies the recorded deletions in memory; texts stay in SQLite and are read for the
hits only, so memory holds the vectors and 8 bytes of key per document.

The FAISS factory string is the one vocabulary for index types (``Flat``, ``IVF4096,Flat``, ``HNSW32``,
``IVF4096,PQ64``, ``SQ8``, ...); quantised indexes (`leafkd.retrieval.quantized`) load the same way.

Every document has an int64 key (`leafkd.retrieval.docstore`). How FAISS labels map to keys
(``manifest["labels"]``):

- ``keys``: indexes that take explicit ids (IVF family) are labelled by the keys themselves;
- ``positions``: every other index labels vectors by position, and ``DocIndex.keys[position]`` is the key (keys
  ascend with position, so a key's position is found by binary search).

Deleted documents are removed from FAISS at load where the index can remove vectors (Flat, SQ, PQ, IVF, quantised);
HNSW cannot, and documents deleted while an index is loaded are not removed either: those labels are tombstones,
excluded inside the search by an ``IDSelector``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval.backend import Hit, accepts
from leafkd.retrieval.columns import MetadataColumns
from leafkd.retrieval.docstore import DocStore, StoreState
from leafkd.retrieval.faiss_utils import add_vectors, apply_search_params, faiss_error, gpu_count, index_to_gpu
from leafkd.retrieval.filters import Filter
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR, index_path, read_manifest, verify_index
from leafkd.retrieval.migrate import upgrade
from leafkd.retrieval.segments import has_store, read_base, read_segment, store_path
from leafkd.retrieval.selection import search_among
from leafkd.vectors import normalize

__all__ = ["DocIndex", "Hit", "IndexInfo", "index_info", "load_index"]

logger = logging.getLogger(__name__)

NO_LABELS = np.empty(0, dtype=np.int64)


@dataclass
class IndexInfo:
    """What `leafkd index info` shows."""

    path: Path
    manifest: dict

    def summary(self) -> str:
        m = self.manifest
        size = sum((self.path / f).stat().st_size for f in m["files"].values() if (self.path / f).exists())
        lines = [
            f"index      {self.path}",
            f"factory    {m['factory']} ({m['dim']}-d, {m['metric']}, labels by {m['labels']})",
            f"documents  {m['count']} live, {m['tombstones']} deleted-in-place",
            f"teacher    {m.get('teacher')} (fingerprint {m['teacher_fingerprint'][:16]}...)",
            f"built with {m.get('built_with')}; created {m.get('created')}, updated {m.get('updated')}",
            f"on disk    {size / 2**20:.1f} MiB (generation {m['generation']})",
        ]
        if m.get("store"):
            lines.append(f"store      {m['store']} (update {m.get('seq', 0)}; {m.get('segments', 0)} segment(s) and "
                         f"{m.get('removed', 0)} deletion(s) since the base, folded in by `compact`)")
        if m.get("quantization"):
            q = m["quantization"]
            lines.append(f"quantized  {q['precision']} search, {q['rescore']} rescoring of top_k x {q['multiplier']}")
        if m.get("search_params"):
            lines.append(f"search     {m['search_params']}")
        return "\n".join(lines)


class DocIndex:
    """A loaded index: the FAISS index (base + segments, deletions applied), its keys and the document store."""

    def __init__(self, path: Path | None, manifest: dict, index: Any, store: DocStore, keys: np.ndarray, *,
                 state: StoreState, dead: np.ndarray = NO_LABELS, search_index: Any = None, device: str = "cpu"):
        self.path = path
        self.static = manifest  # manifest.json as read (plus search parameter overrides)
        self.index = index  # faiss.Index (CPU copy; `search_index` may be a GPU clone)
        self.search_index = search_index if search_index is not None else index
        self.store = store
        self.keys = keys  # position -> key, ascending
        self.dead = np.asarray(dead, dtype=np.int64)  # labels of tombstones, sorted
        self.state = state  # the store update this in-memory index reflects
        self.device = device
        self.by_key = manifest["labels"] == "keys"
        self.columns = MetadataColumns()  # filtered fields, evaluated in memory
        self._lock = threading.RLock()  # searches and in-memory updates
        self.write_lock = threading.Lock()  # serialises this process's updates (taken before the writer lock)
        self.manifest = self.current_manifest()

    @property
    def keys(self) -> np.ndarray:
        return self._keys[: self._nkeys]

    @keys.setter
    def keys(self, keys: np.ndarray) -> None:
        self._keys = np.array(keys, dtype=np.int64)
        self._nkeys = len(self._keys)

    def append_keys(self, keys: np.ndarray) -> None:
        """Append keys in amortised O(batch) (a server's adds should not copy every key each time)."""
        need = self._nkeys + len(keys)
        if need > len(self._keys):
            grown = np.empty(max(need, 2 * len(self._keys), 1024), dtype=np.int64)
            grown[: self._nkeys] = self.keys
            self._keys = grown
        self._keys[self._nkeys : need] = keys
        self._nkeys = need

    def current_manifest(self) -> dict:
        """The manifest with the live counts of this in-memory index."""
        return {**self.static, "count": self.count, "rows": int(self.index.ntotal), "tombstones": int(len(self.dead)),
                "next_key": self.state.next_key, "seq": self.state.seq}

    # -- facts
    @property
    def dim(self) -> int:
        return int(self.static["dim"])

    @property
    def count(self) -> int:
        return int(len(self.keys) - len(self.dead))

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.static["teacher_fingerprint"])

    def accepts_fingerprint(self, fp: str | None) -> bool:
        """Whether vectors of a teacher with fingerprint ``fp`` (any capture prompt/normalisation) share this space."""
        return accepts(self.static, fp)

    def nbytes(self) -> int:
        """Bytes of the base index file (a good proxy for its memory; quantised: the in-memory codes)."""
        if self.path is None:
            return 0
        f = self.path / self.static["files"]["index"]
        return f.stat().st_size if f.exists() else 0

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.store

    def live_ids(self) -> frozenset[str]:
        """The ids of the documents in the store (O(corpus); for tests and exports)."""
        return frozenset(self.store.ids())

    def get_document(self, doc_id: str) -> Document | None:
        """The document (title, text, metadata) with this id, or None."""
        return self.store.get(doc_id)

    def ids_of(self, keys: list[int]) -> list[str | None]:
        """The ids of documents by key (None for a key no longer in the store)."""
        docs = self.store.fetch(keys)
        return [docs[k].id if k in docs else None for k in keys]

    def document(self, doc_id: str) -> Document:
        doc = self.store.get(doc_id)
        if doc is None:
            raise KeyError(doc_id)
        return doc

    # -- device
    def to_gpu(self, fp16: bool = False, shards: int = 1) -> DocIndex:
        """Search on the GPU(s) from now on; the CPU copy stays for saving. Raises LeafkdError if impossible."""
        try:
            gpu = index_to_gpu(self.index, fp16=fp16, shards=shards)
        except LeafkdError:
            raise
        except Exception as e:
            raise LeafkdError(f"index {self.static['factory']!r} cannot move to the GPU ({faiss_error(e)})") from None
        apply_search_params(gpu, self.static.get("search_params"), gpu=True)
        with self._lock:
            self.search_index = gpu
        n = gpu_count() if shards < 0 else min(max(shards, 1), gpu_count())
        self.device = f"gpu x{n}" + (" fp16" if fp16 else "")
        return self

    # -- keys and labels
    def labels_of(self, keys: np.ndarray) -> np.ndarray:
        """Sorted FAISS labels of the keys that are in this in-memory index and not tombstones."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys) or not len(self.keys):
            return NO_LABELS
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[pos] == keys
        labels = keys[found] if self.by_key else pos[found]
        if len(self.dead):
            labels = labels[~np.isin(labels, self.dead)]
        return np.unique(labels)

    def keys_of(self, labels: np.ndarray) -> np.ndarray:
        return labels if self.by_key else self.keys[labels]

    # -- search
    def search(self, queries: np.ndarray, top_k: int, filter: Filter | dict | None = None
               ) -> tuple[list[list[int]], list[list[float]]]:
        """Keys and inner-product scores of the ``top_k`` nearest live documents of each (normalised) query, among
        those whose metadata passes ``filter`` (see `leafkd.retrieval.filters`)."""
        queries = normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.dim:
            raise LeafkdError(f"query vectors are {queries.shape[1]}-d, the index is {self.dim}-d")
        flt = Filter.parse(filter)
        if top_k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))], [[] for _ in range(len(queries))]
        with self._lock:
            allowed = self.labels_of(self.columns.match(self.store, flt)) if flt is not None else None
            scores, labels = search_among(self.index, self.search_index, queries, top_k, allowed,
                                          self.dead if len(self.dead) else None)
            out_keys, out_scores = [], []
            for s_row, l_row in zip(scores, labels):
                ok = l_row >= 0
                out_keys.append(self.keys_of(l_row[ok]).tolist())
                out_scores.append([float(s) for s in s_row[ok]])
        return out_keys, out_scores

    def hits(self, queries: np.ndarray, top_k: int, filter: Filter | dict | None = None) -> list[list[Hit]]:
        """The ``top_k`` documents of each query (id, score, title, text, metadata), read from the store."""
        keys, scores = self.search(queries, top_k, filter)
        docs = self.store.fetch(k for row in keys for k in row)
        # a key missing from the store was deleted by another process since this index was loaded (see `refresh`)
        return [[Hit.of(docs[k], s) for k, s in zip(kk, ss) if k in docs] for kk, ss in zip(keys, scores)]

    # -- updates (the files and the store are written by leafkd.retrieval.updates; these follow in memory)
    def apply_added(self, vectors: np.ndarray, keys: np.ndarray, state: StoreState) -> None:
        """Add vectors committed under ``keys`` (greater than every key here)."""
        keys = np.asarray(keys, dtype=np.int64)
        with self._lock:
            add_vectors(self.index, vectors, keys if self.by_key else None)
            if self.search_index is not self.index:
                try:
                    add_vectors(self.search_index, vectors, keys if self.by_key else None)
                except Exception as e:  # keep serving correct results, on the CPU
                    logger.warning("note: the GPU index cannot take added vectors (%s); searching on the CPU",
                                   faiss_error(e))
                    self.search_index, self.device = self.index, "cpu"
            self.append_keys(keys)
            self.state = state
            self.manifest = self.current_manifest()

    def apply_deleted(self, keys: np.ndarray, state: StoreState) -> None:
        """Tombstone the vectors of deleted keys (removed from FAISS at the next load)."""
        with self._lock:
            self.dead = np.union1d(self.dead, self.labels_of(keys))
            self.state = state
            self.manifest = self.current_manifest()

    def refresh(self) -> bool:
        """Catch up with updates other processes committed since this index was loaded; True if anything changed.
        Cheap when nothing did (one read of the store's state)."""
        if self.path is None or not has_store(self.static):
            return False
        with self._lock:
            if read_manifest(self.path).get("generation") != self.static.get("generation"):
                fresh = load_index(self.path, verify=False, search_params=self.static.get("search_params"))
                self.adopt(fresh)
                return True
            changes = self.store.changes(segments_after=self.state.seq, removed_after=self.state.seq)
            if changes.state.seq == self.state.seq:
                return False
            for seg in changes.segments:
                self.apply_added(read_segment(self.path, seg, self.dim, verify=False), seg.keys(), self.state)
            self.apply_deleted(changes.removed, changes.state)
            return True

    def adopt(self, other: DocIndex) -> None:
        """Take over another loaded copy of this index (after a compaction elsewhere), keeping the device."""
        old_store = self.store
        self.static, self.index, self.store, self.keys = other.static, other.index, other.store, other.keys
        self.dead, self.state, self.search_index, self.device = other.dead, other.state, other.index, "cpu"
        self.columns = MetadataColumns()
        self.manifest = self.current_manifest()
        old_store.close()

    def close(self) -> None:
        """Close the document store."""
        self.store.close()


def apply_removals(index: Any, keys: np.ndarray, removed: np.ndarray, by_key: bool) -> tuple[np.ndarray, np.ndarray]:
    """Remove the vectors of ``removed`` keys from FAISS where it can; returns (keys, tombstone labels)."""
    pos = np.flatnonzero(np.isin(keys, removed))
    if not len(pos):
        return keys, NO_LABELS
    labels = keys[pos] if by_key else pos
    before = int(index.ntotal)
    try:
        gone = int(index.remove_ids(np.ascontiguousarray(labels, dtype=np.int64)))
    except RuntimeError:
        gone = -1  # this index type cannot remove vectors (HNSW): tombstones
    if gone == len(labels) and index.ntotal == before - len(labels):
        return np.delete(keys, pos), NO_LABELS
    if gone in (-1, 0) and index.ntotal == before and not by_key:
        return keys, labels
    raise LeafkdError(f"FAISS removed {gone} of {len(labels)} deleted vectors; the index cannot be loaded")


def open_folder(folder: Path, manifest: dict, *, verify: bool, store: DocStore | None = None,
                base_keys: np.ndarray | None = None) -> DocIndex:
    """A DocIndex from the files of one manifest (``store``/``base_keys``: a legacy index read into memory)."""
    if verify:
        verify_index(folder, manifest)
    else:
        for role, name in manifest["files"].items():
            if not (folder / name).exists():
                raise LeafkdError(f"{folder}: the {role} file {name} is missing; the index is incomplete")
    index, keys = read_base(folder, manifest, keys=base_keys)
    store = store if store is not None else DocStore(store_path(folder, manifest))
    try:
        changes = store.changes(segments_after=int(manifest.get("base_seq", 0)), removed_after=-1)
        by_key = manifest["labels"] == "keys"
        parts = [keys]
        for seg in changes.segments:
            add_vectors(index, read_segment(folder, seg, int(manifest["dim"]), verify), seg.keys() if by_key else None)
            parts.append(seg.keys())
        keys, dead = apply_removals(index, np.concatenate(parts), changes.removed, by_key)
        if len(keys) - len(dead) != changes.state.count:
            raise LeafkdError(f"{folder}: the index holds {len(keys) - len(dead)} live vectors but the store "
                              f"{changes.state.count} documents")
    except BaseException:
        store.close()
        raise
    apply_search_params(index, manifest.get("search_params"))
    return DocIndex(folder, manifest, index, store, keys, state=changes.state, dead=dead)


def load_index(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR, *, verify: bool = True,
               gpu: bool | None = False, fp16: bool | None = None, shards: int = 1,
               search_params: dict | None = None) -> DocIndex:
    """Load an index folder (verifying checksums); ``gpu=True`` searches on the GPU(s), ``None``: if present.

    A ``leafkd-index/1`` folder with a JSONL store is migrated first (under the writer lock); where it cannot be
    written, it is served from memory as it is."""
    folder = index_path(name_or_path, indexes_dir)
    for attempt in range(3):
        manifest = read_manifest(folder)
        store, base_keys = None, None
        if not has_store(manifest):
            manifest, store, base_keys = upgrade(folder, manifest)
        if search_params:
            manifest = {**manifest, "search_params": {**manifest.get("search_params", {}), **search_params}}
        try:
            doc_index = open_folder(folder, manifest, verify=verify, store=store, base_keys=base_keys)
        except LeafkdError:
            if attempt < 2 and changed(folder, manifest):
                continue  # a compaction replaced the files while they were read
            raise
        if attempt == 2 or not changed(folder, manifest) or store is not None:
            break
        doc_index.close()
    want_gpu = gpu_count() > 0 if gpu is None else gpu
    if want_gpu:
        try:
            doc_index.to_gpu(fp16=manifest.get("fp16", False) if fp16 is None else fp16, shards=shards)
        except LeafkdError as e:
            if gpu:  # asked for explicitly
                raise
            logger.warning("note: searching on the CPU: %s", e)  # e.g. HNSW has no GPU version
    return doc_index


def changed(folder: Path, manifest: dict) -> bool:
    try:
        now = read_manifest(folder)
    except LeafkdError:
        return True
    return now.get("generation") != manifest.get("generation") or now.get("files") != manifest.get("files")


def index_info(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> IndexInfo:
    """The manifest, with the live counts of the document store."""
    folder = index_path(name_or_path, indexes_dir)
    manifest = read_manifest(folder)
    if has_store(manifest):
        try:
            store = DocStore(store_path(folder, manifest), readonly=True)
        except LeafkdError as e:
            logger.warning("note: %s; showing the counts of the last base write", e)
        else:
            try:
                state = store.state()
                segments, removed = store.pending(int(manifest.get("base_seq", 0)))
            finally:
                store.close()
            manifest = {**manifest, "count": state.count, "next_key": state.next_key, "seq": state.seq,
                        "segments": segments, "removed": removed, "tombstones": removed}
    return IndexInfo(folder, manifest)
