"""Snapshots: a consistent copy of an index folder, taken under its writer lock while searches go on.

The base and segment files never change once written (updates write new files and rename them into place), so
they are hard-linked where the filesystem allows (copied otherwise); the document store is copied with SQLite's
online backup API. The copy is built in a temporary folder renamed into place, and loads like any index.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from leafkd.atomic import atomic_dir, write_json
from leafkd.errors import LeafkdError
from leafkd.retrieval.docstore import STORE
from leafkd.retrieval.index import DocIndex
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR, MANIFEST, index_path, utc_now
from leafkd.retrieval.updates import updating


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links
        shutil.copy2(src, dst)


def snapshot_index(index: str | Path | DocIndex, dest: str | Path, *, indexes_dir: str | Path = DEFAULT_INDEXES_DIR,
                   overwrite: bool = False) -> Path:
    """Copy the index to the folder ``dest`` (which must not exist unless ``overwrite``); returns ``dest``."""
    dest = Path(dest)
    source = index.path if isinstance(index, DocIndex) else index_path(index, indexes_dir)
    if source is not None and dest.resolve() == Path(source).resolve():
        raise LeafkdError(f"{dest}: a snapshot cannot replace the index it copies")
    if dest.exists() and not overwrite:
        raise LeafkdError(f"{dest}: already exists (choose a new folder, or overwrite=True to replace it)")
    with updating(index, indexes_dir) as (folder, manifest, store, _loaded):
        changes = store.changes(segments_after=int(manifest.get("base_seq", 0)), removed_after=-1)
        with atomic_dir(dest) as tmp:
            for name in [*manifest["files"].values(), *(s.file for s in changes.segments)]:
                link_or_copy(folder / name, tmp / name)
            store.backup(tmp / STORE)
            write_json(tmp / MANIFEST, {**manifest, "name": dest.name, "store": STORE, "snapshot_of": str(folder),
                                        "snapshot_seq": changes.state.seq, "snapshot_time": utc_now()})
    return dest
