"""Teacher-built FAISS indexes on disk: build, save, load (checksummed), add and delete documents.

An index folder ``indexes/<name>/`` holds

- ``manifest.json``: teacher fingerprint, dimension, metric, factory string, counts, dates, the names of the
  current data files and their sha256 checksums;
- ``index.<gen>.faiss``: the FAISS index (inner product on L2-normalised vectors);
- ``docs.<gen>.jsonl``: the document store, one ``[id, title, text]`` row per line, in row order;
- ``keys.<gen>.npy``: the FAISS label of each row (only for indexes that store labels, i.e. IVF).

The FAISS factory string is the one vocabulary for index types (``Flat``, ``IVF4096,Flat``, ``HNSW32``,
``IVF4096,PQ64``, ``SQ8``, ...). Every write is atomic: a build happens in a temporary folder that is renamed
into place, and add/delete write new ``<gen+1>`` files first and then swap the manifest, so a failed or
interrupted update leaves the previous index loadable.

How FAISS labels map to document rows (``manifest["labels"]``):

- ``keys``: indexes that take explicit ids (IVF family) get a unique, increasing int64 key per document; rows are
  kept in key order so a label is found by binary search. Deletion removes the vectors from FAISS.
- ``positions``: every other index labels vectors by insertion position, which equals the row. Deletion uses
  ``remove_ids`` where FAISS compacts in order (Flat, SQ, PQ, LSH); where it cannot (HNSW), the row is kept as a
  tombstone (id ``null``, text blanked) and filtered out at search time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval.docstore import read_docs
from leafkd.retrieval.faiss_utils import apply_search_params, faiss_error, gpu_count, index_to_gpu
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR, index_path, read_manifest, verify_index
from leafkd.vectors import normalize

logger = logging.getLogger(__name__)


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
        if m.get("search_params"):
            lines.append(f"search     {m['search_params']}")
        return "\n".join(lines)


@dataclass
class Hit:
    """One search result."""

    id: str
    score: float
    title: str
    text: str

    def to_dict(self, include_text: bool = True) -> dict:
        d: dict[str, Any] = {"id": self.id, "score": self.score}
        if include_text:
            d["title"] = self.title
            d["text"] = self.text
        return d


@dataclass
class DocIndex:
    """A loaded index: the FAISS index, the document store and the manifest."""

    path: Path | None
    manifest: dict
    index: Any  # faiss.Index (CPU copy; `search_index` may be a GPU clone)
    ids: list[str | None]
    titles: list[str]
    texts: list[str]
    keys: np.ndarray | None = None
    search_index: Any = None
    device: str = "cpu"
    _row_of_id: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.search_index is None:
            self.search_index = self.index
        self._row_of_id = {d: r for r, d in enumerate(self.ids) if d is not None}

    # -- facts
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return len(self._row_of_id)

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.manifest["teacher_fingerprint"])

    def accepts_fingerprint(self, fp: str | None) -> bool:
        """Whether vectors of a teacher with fingerprint ``fp`` (any capture prompt/normalisation) share this space."""
        known = self.manifest.get("teacher_fingerprints", {})
        return fp is not None and (fp == self.teacher_fingerprint or fp in known)

    def nbytes(self) -> int:
        """Bytes of the index file (a good proxy for its memory)."""
        if self.path is None:
            return 0
        f = self.path / self.manifest["files"]["index"]
        return f.stat().st_size if f.exists() else 0

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row_of_id

    def live_ids(self) -> frozenset[str]:
        """The ids of the documents in the index (deleted rows excluded)."""
        return frozenset(self._row_of_id)

    def row_of(self, doc_id: str) -> int:
        """The row of a document in the store (and, for ``positions`` labels, in FAISS)."""
        return self._row_of_id[doc_id]

    def document(self, doc_id: str) -> Document:
        r = self._row_of_id[doc_id]
        return Document(doc_id, self.titles[r], self.texts[r])

    # -- device
    def to_gpu(self, fp16: bool = False, shards: int = 1) -> DocIndex:
        """Search on the GPU(s) from now on; the CPU copy stays for saving. Raises LeafkdError if impossible."""
        try:
            gpu = index_to_gpu(self.index, fp16=fp16, shards=shards)
        except LeafkdError:
            raise
        except Exception as e:
            raise LeafkdError(f"index {self.manifest['factory']!r} cannot move to the GPU ({faiss_error(e)})") from None
        apply_search_params(gpu, self.manifest.get("search_params"), gpu=True)
        self.search_index = gpu
        n = gpu_count() if shards < 0 else min(max(shards, 1), gpu_count())
        self.device = f"gpu x{n}" + (" fp16" if fp16 else "")
        return self

    # -- search
    def search(self, queries: np.ndarray, top_k: int) -> tuple[list[list[int]], list[list[float]]]:
        """Rows and inner-product scores of the ``top_k`` nearest live documents of each (normalised) query."""
        queries = normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise LeafkdError(f"query vectors are {queries.shape[1]}-d, the index is {self.dim}-d")
        ntotal = int(self.search_index.ntotal)
        tomb = int(self.manifest.get("tombstones", 0))
        k = min(top_k + tomb, ntotal)  # over-fetch past tombstones so top_k live rows remain
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))], [[] for _ in range(len(queries))]
        # FAISS GPU indexes cap k (2048); a deeper search runs on the CPU copy.
        engine = self.search_index if k <= 2048 or self.search_index is self.index else self.index
        scores, labels = engine.search(queries, k)
        keys = self.keys
        if self.manifest["labels"] == "keys" and keys is not None:  # load_index checked there are keys
            pos = np.searchsorted(keys, labels)
            pos = np.minimum(pos, len(keys) - 1)
            rows = np.where((labels >= 0) & (keys[pos] == labels), pos, -1)
        else:
            rows = labels
        out_rows, out_scores = [], []
        for r_row, s_row in zip(rows.tolist(), scores.tolist()):
            rr, ss = [], []
            for r, s in zip(r_row, s_row):
                if r < 0 or self.ids[r] is None:
                    continue
                rr.append(r)
                ss.append(float(s))
                if len(rr) == top_k:
                    break
            out_rows.append(rr)
            out_scores.append(ss)
        return out_rows, out_scores

    def hits(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        rows, scores = self.search(queries, top_k)
        return [[Hit(self.ids[r], s, self.titles[r], self.texts[r]) for r, s in zip(rr, ss)]  # type: ignore[arg-type]
                for rr, ss in zip(rows, scores)]


def load_index(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR, *, verify: bool = True,
               gpu: bool | None = False, fp16: bool | None = None, shards: int = 1,
               search_params: dict | None = None) -> DocIndex:
    """Load an index folder (verifying checksums); ``gpu=True`` searches on the GPU(s), ``None``: if present."""
    folder = index_path(name_or_path, indexes_dir)
    manifest = read_manifest(folder)
    if verify:
        verify_index(folder, manifest)
    else:
        for role, name in manifest["files"].items():
            if not (folder / name).exists():
                raise LeafkdError(f"{folder}: the {role} file {name} is missing; the index is incomplete")
    try:
        index = faiss.read_index(str(folder / manifest["files"]["index"]))
    except Exception as e:
        raise LeafkdError(f"{folder}: FAISS cannot read {manifest['files']['index']} "
                          f"({str(e).strip()[:200]})") from None
    ids, titles, texts = read_docs(folder / manifest["files"]["docs"])
    keys = np.load(folder / manifest["files"]["keys"]) if "keys" in manifest["files"] else None
    if manifest["labels"] == "keys":
        if keys is None or len(keys) != len(ids) or index.ntotal != len(ids):
            raise LeafkdError(f"{folder}: the index holds {index.ntotal} vectors but the store {len(ids)} documents")
    elif index.ntotal != len(ids):
        raise LeafkdError(f"{folder}: the index holds {index.ntotal} vectors but the store {len(ids)} rows")
    if index.d != int(manifest["dim"]):
        raise LeafkdError(f"{folder}: the index is {index.d}-d but the manifest says {manifest['dim']}")
    if search_params:
        manifest = {**manifest, "search_params": {**manifest.get("search_params", {}), **search_params}}
    apply_search_params(index, manifest.get("search_params"))
    doc_index = DocIndex(folder, manifest, index, ids, titles, texts, keys)
    want_gpu = gpu_count() > 0 if gpu is None else gpu
    if want_gpu:
        try:
            doc_index.to_gpu(fp16=manifest.get("fp16", False) if fp16 is None else fp16, shards=shards)
        except LeafkdError as e:
            if gpu:  # asked for explicitly
                raise
            logger.warning("note: searching on the CPU: %s", e)  # e.g. HNSW has no GPU version
    return doc_index


def index_info(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> IndexInfo:
    folder = index_path(name_or_path, indexes_dir)
    return IndexInfo(folder, read_manifest(folder))


