"""Building a quantised index (`leafkd.retrieval.quantized`) from a float index, as sentence-transformers quantises
existing embeddings: the float vectors of a ``Flat`` index are quantised (and kept on disk for rescoring), the
document store is copied, and the result is a new index folder that loads, searches, filters and updates like any.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from leafkd.atomic import atomic_dir, write_json
from leafkd.errors import LeafkdError
from leafkd.retrieval.docstore import STORE, DocStore
from leafkd.retrieval.index import load_index
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR, MANIFEST, finish_manifest, index_path, utc_now, writer_lock
from leafkd.retrieval.quantized import DEFAULT_MULTIPLIER, Precision, QuantizedIndex, Rescore
from leafkd.retrieval.segments import write_base
from leafkd.retrieval.updates import updating


def quantize_index(source: str | Path, dest: str | Path, *, precision: str | Precision = Precision.BINARY,
                   rescore: str | Rescore | None = None, multiplier: int = DEFAULT_MULTIPLIER,
                   indexes_dir: str | Path = DEFAULT_INDEXES_DIR, overwrite: bool = False) -> Path:
    """Write ``dest``: the live documents of the ``Flat`` index ``source`` as a quantised index (binary or int8
    codes in memory; rescoring vectors, int8 or float32, on disk). Returns the new folder."""
    target = index_path(dest, indexes_dir)
    if (target / MANIFEST).exists() and not overwrite:
        raise LeafkdError(f"{target}: an index already exists (overwrite=True replaces it)")
    if multiplier < 1:
        raise LeafkdError(f"the rescoring multiplier must be at least 1, got {multiplier}")
    with updating(source, indexes_dir) as (folder, _manifest, store, _loaded):
        if target.resolve() == folder.resolve():
            raise LeafkdError(f"{target}: the quantised index must go to another folder than its source")
        src = load_index(folder, verify=False, gpu=False)
        try:
            if not isinstance(faiss.downcast_index(src.index), faiss.IndexFlat):
                raise LeafkdError(f"quantising needs the exact float vectors of a Flat index, {folder} is "
                                  f"{src.static['factory']!r}")
            live = np.setdiff1d(np.arange(src.index.ntotal, dtype=np.int64), src.dead)
            q = QuantizedIndex.build(src.index.reconstruct_batch(live), precision, rescore, multiplier)
            manifest = {**src.static, "name": target.name, "factory": "BFlat" if q.precision is Precision.BINARY
                        else "SQ8", "labels": "positions", "quantization": q.settings(), "generation": 1,
                        "base_seq": src.state.seq, "search_params": {}, "fp16": False, "quantized_from": str(folder),
                        "created": utc_now(), "count": len(live), "rows": len(live), "tombstones": 0}
            with writer_lock(target), atomic_dir(target) as tmp:
                files = write_base(tmp, 1, q, src.keys[live])
                store.backup(tmp / STORE)
                copy = DocStore(tmp / STORE, wal=False)
                copy.forget(src.state.seq)  # everything up to here is in the new base
                copy.close()
                write_json(tmp / MANIFEST, finish_manifest(tmp, manifest, files))
        finally:
            src.close()
    return target
