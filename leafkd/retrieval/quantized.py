"""Quantised serving: int8 or binary teacher vectors in memory, float rescoring of the top candidates.

The recipe sentence-transformers documents for embedding quantisation (``quantize_embeddings``,
``semantic_search_faiss``): search a small index of quantised document vectors for ``top_k * multiplier``
candidates, then rescore them with the float query against better document vectors that are read from disk
(memory-mapped), and keep the best ``top_k``.

- `Precision.BINARY`: sign bits (sentence-transformers' ``ubinary``: ``packbits(x > 0)``) in a FAISS
  ``IndexBinaryFlat`` searched by Hamming distance: ``dim / 8`` bytes a document in memory. Rescoring against the
  int8 vectors (default, ``dim`` bytes a document on disk) or the float32 ones (``4 * dim``).
- `Precision.INT8`: per-dimension 8-bit scalar quantisation (FAISS ``SQ8``, inner product): ``dim`` bytes a document in
  memory. Rescoring against the float32 vectors on disk (default).

int8 rescoring vectors use sentence-transformers' int8 codes (``floor`` into 256 buckets between each dimension's
minimum and maximum over the corpus) and are decoded at the bucket midpoints before the dot product with the float
query. `QuantizedIndex` quacks like the parts of a FAISS index that `leafkd.retrieval.index.DocIndex` uses
(``ntotal``, ``d``, ``add``, ``remove_ids``, ``search`` with an ``IDSelector``, ``reconstruct_batch``), so adds,
deletes, filters and compaction work as for any index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from leafkd.atomic import atomic_path, write_npy
from leafkd.choices import Choice
from leafkd.errors import LeafkdError

DEFAULT_MULTIPLIER = 4
SQ8_TRAIN_MAX = 100_000
CHUNK = 65536


class Precision(Choice):
    """What the in-memory search index holds."""

    INT8 = "int8"
    BINARY = "binary"


class Rescore(Choice):
    """Which document vectors (on disk) rescore the candidates."""

    NONE = "none"
    INT8 = "int8"
    FLOAT32 = "float32"


DEFAULT_RESCORE = {Precision.BINARY: Rescore.INT8, Precision.INT8: Rescore.FLOAT32}


def binary_codes(x: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 a byte (sentence-transformers' ``ubinary``)."""
    return np.packbits(np.asarray(x) > 0, axis=-1)


def int8_ranges(x: np.ndarray) -> np.ndarray:
    """Per-dimension (minimum, maximum), shape (2, dim): the calibration of sentence-transformers' int8 codes."""
    return np.vstack((x.min(axis=0), x.max(axis=0))).astype(np.float32)


def int8_codes(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    return np.asarray(quantize_embeddings(np.asarray(x, dtype=np.float32), "int8", ranges=ranges))


def int8_decode(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Float vectors from int8 codes, at the midpoint of each code's bucket."""
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    return (ranges[0] + (codes.astype(np.float32) + 128.5) * steps).astype(np.float32)


class QuantizedIndex:
    """A quantised search index plus rescoring vectors; labels are positions, as for a FAISS flat index."""

    def __init__(self, precision: Precision, codes: Any, rescore: Rescore, base: np.ndarray | None,
                 ranges: np.ndarray | None, multiplier: int = DEFAULT_MULTIPLIER, dim: int | None = None) -> None:
        self.precision, self.codes, self.rescore, self.ranges = precision, codes, rescore, ranges
        self.multiplier = max(1, int(multiplier))
        self.d = int(dim if dim is not None else codes.d)
        self.base = base  # rescoring rows of the base (memory-mapped), in position order
        width = self.d if rescore is not Rescore.NONE else 0
        self.extra = np.empty((0, width), dtype=np.float32 if rescore is Rescore.FLOAT32 else np.int8)
        self.rows: np.ndarray | None = None  # position -> rescoring row, once something was removed
        self.is_trained = True

    @classmethod
    def build(cls, vectors: np.ndarray, precision: Precision | str, rescore: Rescore | str | None = None,
              multiplier: int = DEFAULT_MULTIPLIER) -> QuantizedIndex:
        """Quantise normalised float vectors (calibrating int8 ranges on them)."""
        prec = Precision.parse(precision, "precision")
        resc = Rescore.parse(rescore if rescore is not None else DEFAULT_RESCORE[prec], "rescoring")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if prec is Precision.BINARY:
            if dim % 8:
                raise LeafkdError(f"binary quantisation needs a dimension that is a multiple of 8, not {dim}")
            codes: Any = faiss.IndexBinaryFlat(dim)
        else:
            codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            sample = vectors
            if len(vectors) > SQ8_TRAIN_MAX:
                sample = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), SQ8_TRAIN_MAX, replace=False))]
            codes.train(sample)
        ranges = int8_ranges(vectors) if resc is Rescore.INT8 else None
        index = cls(prec, codes, resc, None, ranges, multiplier, dim)
        index.add(vectors)
        return index

    # -- the FAISS-like surface
    @property
    def ntotal(self) -> int:
        return int(self.codes.ntotal)

    def encode_rescore(self, x: np.ndarray) -> np.ndarray:
        if self.rescore is Rescore.INT8:
            assert self.ranges is not None
            return int8_codes(x, self.ranges)
        return np.asarray(x, dtype=np.float32)

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.rescore is not Rescore.NONE:
            start = self.stored_rows()
            self.extra = np.concatenate([self.extra, self.encode_rescore(x)])
            if self.rows is not None:
                self.rows = np.concatenate([self.rows, np.arange(start, start + len(x), dtype=np.int64)])
        self.codes.add(binary_codes(x) if self.precision is Precision.BINARY else x)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        raise RuntimeError("a quantised index labels vectors by position")

    def stored_rows(self) -> int:
        return (len(self.base) if self.base is not None else 0) + len(self.extra)

    def remove_ids(self, ids: np.ndarray) -> int:
        """Remove vectors by position (their rescoring rows stay on disk until the next compaction)."""
        total = self.ntotal
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < total)]
        keep = np.ones(total, dtype=bool)
        keep[ids] = False
        removed = int(self.codes.remove_ids(ids))
        if self.rescore is not Rescore.NONE:
            rows = self.rows if self.rows is not None else np.arange(total, dtype=np.int64)
            self.rows = rows[keep]
        return removed

    def rescore_vectors(self, labels: np.ndarray) -> np.ndarray:
        """Float rescoring vectors of positions ``labels`` (int8 rows decoded)."""
        if self.rescore is Rescore.NONE:
            raise RuntimeError("this quantised index keeps no rescoring vectors")
        rows = self.raw_rows(np.asarray(labels, dtype=np.int64))
        if self.rescore is Rescore.INT8:
            assert self.ranges is not None
            return int8_decode(rows, self.ranges)
        return rows.astype(np.float32, copy=False)

    def reconstruct_batch(self, labels: np.ndarray) -> np.ndarray:
        return self.rescore_vectors(labels)

    def search(self, x: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by the float query's inner product with the rescoring vectors of the quantised top
        ``k * multiplier`` (without rescoring: the quantised scores, Hamming mapped to ``1 - 2 h / dim``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        fetch = min(self.ntotal, k * self.multiplier if self.rescore is not Rescore.NONE else k)
        if self.precision is Precision.BINARY:
            dist, labels = self.codes.search(binary_codes(x), fetch, params=params)
            approx = 1.0 - 2.0 * dist.astype(np.float32) / self.d
        else:
            approx, labels = self.codes.search(x, fetch, params=params)
        if self.rescore is Rescore.NONE:
            return approx[:, :k], labels[:, :k]
        scores = np.full(labels.shape, -np.inf, dtype=np.float32)
        valid = labels >= 0
        if valid.any():
            vecs = self.rescore_vectors(labels[valid])
            scores[valid] = np.einsum("nd,nd->n", np.repeat(x, valid.sum(1), axis=0), vecs)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, axis=1)
        out = np.where(np.isfinite(top), np.take_along_axis(labels, order, axis=1), -1)
        return top, out

    # -- memory and files
    def memory_bytes(self) -> int:
        """Bytes held in memory: the quantised codes, plus rescoring rows added since the base was written."""
        per = self.d // 8 if self.precision is Precision.BINARY else self.d
        rows = self.rows.nbytes if self.rows is not None else 0
        return self.ntotal * per + self.extra.nbytes + rows

    def save(self, folder: Path, gen: int) -> dict[str, str]:
        """Write generation ``gen``'s files (each atomically); returns {role: file name}."""
        files = {"index": f"index.{gen}.faiss"}
        with atomic_path(folder / files["index"]) as tmp:
            if self.precision is Precision.BINARY:
                faiss.write_index_binary(self.codes, str(tmp))
            else:
                faiss.write_index(self.codes, str(tmp))
        if self.rescore is not Rescore.NONE:
            files["rescore"] = f"rescore.{gen}.npy"
            with atomic_path(folder / files["rescore"], suffix=".npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.extra.dtype, shape=(self.ntotal, self.d))
                for start in range(0, self.ntotal, CHUNK):
                    labels = np.arange(start, min(start + CHUNK, self.ntotal), dtype=np.int64)
                    out[start : start + len(labels)] = self.raw_rows(labels)
                out.flush()
                del out
        if self.ranges is not None:
            files["ranges"] = f"ranges.{gen}.npy"
            write_npy(folder / files["ranges"], self.ranges)
        return files

    def raw_rows(self, labels: np.ndarray) -> np.ndarray:
        """The stored (int8 or float32) rescoring rows of positions ``labels``."""
        rows = self.rows[labels] if self.rows is not None else labels
        nbase = len(self.base) if self.base is not None else 0
        out = np.empty((len(rows), self.d), dtype=self.extra.dtype)
        in_base = rows < nbase
        if in_base.any():
            assert self.base is not None
            picked = rows[in_base]
            order = np.argsort(picked, kind="stable")  # sorted reads are kinder to a memory-mapped file
            got = np.empty((len(picked), self.d), dtype=out.dtype)
            got[order] = self.base[picked[order]]
            out[in_base] = got
        if not in_base.all():
            out[~in_base] = self.extra[rows[~in_base] - nbase]
        return out

    def settings(self) -> dict[str, Any]:
        """What the manifest records (``quantization``)."""
        return {"precision": self.precision.value, "rescore": self.rescore.value, "multiplier": self.multiplier}

    @classmethod
    def load(cls, folder: Path, manifest: dict) -> QuantizedIndex:
        q = manifest["quantization"]
        files = manifest["files"]
        precision, rescore = Precision(q["precision"]), Rescore(q["rescore"])
        path = str(folder / files["index"])
        codes = faiss.read_index_binary(path) if precision is Precision.BINARY else faiss.read_index(path)
        base = np.load(folder / files["rescore"], mmap_mode="r") if "rescore" in files else None
        ranges = np.load(folder / files["ranges"]) if "ranges" in files else None
        if base is not None and len(base) != codes.ntotal:
            raise LeafkdError(f"{folder}: {files['rescore']} has {len(base)} rows, the index {codes.ntotal} vectors")
        return cls(precision, codes, rescore, base, ranges, q.get("multiplier", DEFAULT_MULTIPLIER),
                   int(manifest["dim"]))
