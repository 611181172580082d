"""Compaction: fold the segments and deletions recorded since the base into a new base index.

Adds and deletes stay O(batch) by leaving the base index file alone; the price is work at load time (adding the
segments, removing deleted vectors) and, for HNSW, tombstones that still take memory. `compact_index` pays it once:
it loads the index, rebuilds an HNSW without its tombstones (from its reconstructed vectors), writes generation
``gen+1`` of the base and commits by swapping the manifest; the folded records and the old files go afterwards. A
kill at any moment leaves the old or the new generation loadable. It costs O(corpus): run it when loading gets slow
(`leafkd index info` shows the pending segments and deletions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leafkd.atomic import write_json
from leafkd.retrieval.faiss_utils import add_vectors, apply_search_params, make_index, train_index
from leafkd.retrieval.index import DocIndex, load_index
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR, MANIFEST, utc_now
from leafkd.retrieval.segments import checksums, tidy, write_base
from leafkd.retrieval.updates import updating, with_counts


def without_tombstones(loaded: DocIndex) -> tuple[Any, np.ndarray]:
    """A new index of the same factory holding only the live vectors (for indexes that cannot remove vectors)."""
    live = np.setdiff1d(np.arange(loaded.index.ntotal, dtype=np.int64), loaded.dead)
    vectors = np.asarray(loaded.index.reconstruct_batch(live), dtype=np.float32)
    index = make_index(loaded.static["factory"], loaded.dim)
    if not index.is_trained:
        train_index(index, vectors, use_gpu=False)
    add_vectors(index, vectors, None)
    apply_search_params(index, loaded.static.get("search_params"))
    return index, loaded.keys[live]


def compact_index(index: str | Path | DocIndex, *, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> dict:
    """Write a new base index that includes every committed add and delete; returns the new manifest. A loaded
    ``index`` reloads itself from the new files afterwards (so memory holds two copies for a moment)."""
    with updating(index, indexes_dir) as (folder, manifest, store, loaded):
        segments, removed = store.pending(int(manifest.get("base_seq", 0)))
        if segments == 0 and removed == 0:
            return with_counts(manifest, store.state())
        fresh = load_index(folder, verify=False, gpu=False)
        try:
            base, keys = (fresh.index, fresh.keys) if not len(fresh.dead) else without_tombstones(fresh)
            gen = int(manifest["generation"]) + 1
            files = write_base(folder, gen, base, keys)
            new = {**manifest, "generation": gen, "base_seq": fresh.state.seq, "files": files,
                   "checksums": checksums(folder, files), "count": fresh.count, "rows": len(keys), "tombstones": 0,
                   "next_key": fresh.state.next_key, "updated": utc_now()}
            write_json(folder / MANIFEST, new)  # the commit
        finally:
            fresh.close()
        tidy(folder, new, store)
    if loaded is not None:
        loaded.refresh()
    return new
