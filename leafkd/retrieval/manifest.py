"""An index folder on disk: its manifest, generations of data files, checksums, the writer lock and names."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from leafkd.atomic import atomic_path, sha256_file, write_npy
from leafkd.errors import LeafkdError
from leafkd.retrieval.docstore import write_docs

FORMAT = "leafkd-index/1"


MANIFEST = "manifest.json"


DEFAULT_INDEXES_DIR = Path(os.environ.get("LEAFKD_INDEXES", "indexes"))


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def index_path(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> Path:
    """An index folder from a path (holding manifest.json) or a name under ``indexes_dir``."""
    p = Path(name_or_path)
    if (p / MANIFEST).exists() or p.is_absolute() or len(p.parts) > 1 or str(name_or_path).startswith("."):
        return p
    return Path(indexes_dir) / p


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Exclusive writer lock on an index folder, so two updates never interleave."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.lock"
    with open(lock, "a+") as f:
        try:
            import fcntl

            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LeafkdError(f"{folder}: another leafkd process is writing this index") from None
        except ImportError:  # not POSIX: no lock
            pass
        yield


def save_generation(folder: Path, gen: int, index, ids, titles, texts, keys: np.ndarray | None) -> dict[str, str]:
    """Write the data files of generation ``gen`` (each atomically) and return {role: filename}."""
    files = {"index": f"index.{gen}.faiss", "docs": f"docs.{gen}.jsonl"}
    with atomic_path(folder / files["index"]) as tmp:
        faiss.write_index(index, str(tmp))
    write_docs(folder / files["docs"], ids, titles, texts)
    if keys is not None:
        files["keys"] = f"keys.{gen}.npy"
        write_npy(folder / files["keys"], keys.astype(np.int64))
    return files


def finish_manifest(folder: Path, manifest: dict, files: dict[str, str]) -> dict:
    manifest = dict(manifest)
    manifest["files"] = files
    manifest["checksums"] = {f: sha256_file(folder / f) for f in files.values()}
    manifest["updated"] = utc_now()
    return manifest


def remove_stale(folder: Path, manifest: dict) -> None:
    """Drop data files of other generations (left by a completed swap or an interrupted update)."""
    keep = set(manifest["files"].values()) | {MANIFEST}
    for f in folder.iterdir():
        if f.is_file() and f.name not in keep and re.match(r"^(index|docs|keys)\.\d+\.", f.name):
            with contextlib.suppress(OSError):
                f.unlink()


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise LeafkdError(f"{folder}: no such index folder")
    path = folder / MANIFEST
    if not path.exists():
        raise LeafkdError(f"{folder}: not an index folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise LeafkdError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LeafkdError(f"{path}: not a {FORMAT} manifest")
    for key in ("teacher_fingerprint", "dim", "factory", "labels", "files", "checksums", "generation"):
        if key not in manifest:
            raise LeafkdError(f"{path}: manifest has no {key!r}")
    return manifest


def verify_index(folder: str | Path, manifest: dict | None = None) -> dict:
    """Check every data file exists and matches its checksum; returns the manifest."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for role, name in manifest["files"].items():
        f = folder / name
        if not f.exists():
            raise LeafkdError(f"{folder}: the {role} file {name} is missing; the index is incomplete (rebuild it)")
        want = manifest["checksums"].get(name)
        if want is None:
            raise LeafkdError(f"{folder}: the manifest has no checksum for {name}")
        got = sha256_file(f)
        if got != want:
            raise LeafkdError(f"{folder}: checksum mismatch for {name} (sha256 {got[:12]}, manifest {want[:12]}): "
                              "the file is corrupted or was changed outside leafkd")
    return manifest


