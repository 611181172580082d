"""Searching an index among some of its vectors: the documents a filter allows, or all but deleted ones.

The selection happens inside the search, never by over-fetching blindly:

- a small allowed set (up to `EXACT_MAX` vectors, or for HNSW up to `GRAPH_EXACT_FRACTION` of the index: a graph
  walk restricted to a few percent of its nodes misses neighbours) is scored exactly: its vectors are reconstructed
  and multiplied by the queries (for Flat, HNSW-Flat and the rescoring vectors of quantised indexes this equals the
  index's own scores; for SQ/PQ codes it is the index's scoring of the decoded vectors);
- otherwise a FAISS ``IDSelector`` goes into the search through ``SearchParameters`` (IVF and HNSW parameters
  carry the index's own ``nprobe`` / ``efSearch``, which default search parameters would reset); a query that
  comes back with fewer than ``k`` results (IVF lists or a graph walk that met too few allowed vectors) is answered
  again exactly where the index can reconstruct;
- only where FAISS takes no selector (``IndexPQ``, GPU indexes) the search over-fetches, doubling ``k`` until every
  query has ``k`` allowed results or the whole index was searched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

EXACT_MAX = 4096
GRAPH_EXACT_FRACTION = 0.1
GPU_MAX_K = 2048  # FAISS GPU indexes cap k

Result = tuple[np.ndarray, np.ndarray]  # (scores [n, k] float32, labels [n, k] int64, -1 where none)


def empty_result(n: int, k: int) -> Result:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def search_parameters(index: Any, sel: Any, refs: list) -> Any:
    """SearchParameters that restrict a search of ``index`` to ``sel`` and keep its own search knobs; SWIG does
    not keep referenced objects alive, so everything made here is also appended to ``refs``."""
    idx = faiss.downcast_index(index) if isinstance(index, faiss.Index) else index
    params: Any
    if isinstance(idx, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        inner = search_parameters(idx.index, sel, refs)
        params.index_params = inner
    elif isinstance(idx, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = idx.nprobe
        params.max_codes = idx.max_codes
        params.sel = sel
    elif isinstance(idx, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = idx.hnsw.efSearch
        params.check_relative_distance = idx.hnsw.check_relative_distance  # type: ignore[attr-defined]
        params.bounded_queue = idx.hnsw.search_bounded_queue  # type: ignore[attr-defined]
        params.sel = sel
    else:
        params = faiss.SearchParameters()
        params.sel = sel
    refs.append(params)
    return params


def plain_search(cpu: Any, engine: Any, queries: np.ndarray, k: int) -> Result:
    """Top-k of the whole index (on the CPU copy when the GPU cannot search that deep)."""
    if k <= 0:
        return empty_result(len(queries), 0)
    use = engine if k <= GPU_MAX_K or engine is cpu else cpu
    scores, labels = use.search(queries, k)
    return np.asarray(scores, dtype=np.float32), np.asarray(labels, dtype=np.int64)


def exact_search(cpu: Any, queries: np.ndarray, allowed: np.ndarray, k: int) -> Result | None:
    """Exact top-k among ``allowed`` labels by their reconstructed vectors; None if the index cannot reconstruct."""
    try:
        vecs = np.asarray(cpu.reconstruct_batch(allowed), dtype=np.float32)
    except (RuntimeError, AttributeError):  # e.g. IVF without a direct map
        return None
    scores = queries @ vecs.T
    # best first; equal scores by label, as FAISS orders them
    order = np.lexsort((np.broadcast_to(allowed, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32), allowed[order]


def selector_search(cpu: Any, queries: np.ndarray, k: int, sel: Any, refs: list) -> Result | None:
    """A search restricted by an IDSelector; None where the index takes no search parameters."""
    params = search_parameters(cpu, sel, refs)
    try:
        scores, labels = cpu.search(queries, k, params=params)
    except RuntimeError:  # "invalid search params" (IndexPQ, refine indexes, ...)
        return None
    return np.asarray(scores, dtype=np.float32), np.asarray(labels, dtype=np.int64)


def overfetch(cpu: Any, engine: Any, queries: np.ndarray, k: int, keep: Callable[[np.ndarray], np.ndarray],
              first: int) -> Result:
    """Search deeper and deeper (doubling) until each query has ``k`` labels that ``keep`` accepts."""
    ntotal = int(cpu.ntotal)
    fetch = min(max(first, k), ntotal)
    while True:
        scores, labels = plain_search(cpu, engine, queries, fetch)
        ok = (labels >= 0) & keep(labels)
        if fetch >= ntotal or bool(np.all(ok.sum(1) >= k)):
            break
        fetch = min(fetch * 2, ntotal)
    out_s, out_l = empty_result(len(queries), k)
    for i in range(len(queries)):
        row = np.flatnonzero(ok[i])[:k]
        out_s[i, : len(row)] = scores[i, row]
        out_l[i, : len(row)] = labels[i, row]
    return out_s, out_l


def is_graph(index: Any) -> bool:
    return isinstance(index, faiss.Index) and isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def fill_short_rows(cpu: Any, queries: np.ndarray, allowed: np.ndarray, k: int, got: Result) -> Result:
    """Answer exactly the queries a restricted search left with fewer than ``k`` results (where possible)."""
    scores, labels = got
    short = np.flatnonzero((labels >= 0).sum(1) < k)
    if len(short):
        exact = exact_search(cpu, queries[short], allowed, k)
        if exact is not None:
            scores[short], labels[short] = exact
    return scores, labels


def search_among(cpu: Any, engine: Any, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
                 excluded: np.ndarray | None = None) -> Result:
    """Top-k of each query among ``allowed`` labels (sorted), or among all labels but ``excluded`` (sorted)."""
    ntotal = int(cpu.ntotal)
    refs: list = []
    if allowed is not None:
        k = min(k, len(allowed))
        if k <= 0:
            return empty_result(len(queries), 0)
        if len(allowed) <= EXACT_MAX or (is_graph(cpu) and len(allowed) <= GRAPH_EXACT_FRACTION * ntotal):
            got = exact_search(cpu, queries, allowed, k)
            if got is not None:
                return got
        sel = faiss.IDSelectorBatch(allowed)
        refs.append(sel)
        got = selector_search(cpu, queries, k, sel, refs)
        if got is not None:
            return fill_short_rows(cpu, queries, allowed, k, got)
        return overfetch(cpu, engine, queries, k, lambda labels: np.isin(labels, allowed), 2 * k)
    if excluded is None or not len(excluded):
        return plain_search(cpu, engine, queries, min(k, ntotal))
    k = min(k, ntotal - len(excluded))
    if k <= 0:
        return empty_result(len(queries), 0)
    if engine is cpu:
        inner = faiss.IDSelectorBatch(excluded)
        outer = faiss.IDSelectorNot(inner)
        refs.extend([inner, outer])
        got = selector_search(cpu, queries, k, outer, refs)
        if got is not None:
            return got
    return overfetch(cpu, engine, queries, k, lambda labels: ~np.isin(labels, excluded), k + len(excluded))
