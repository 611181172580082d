"""An index folder on disk: its manifest, generations of data files, checksums, the writer lock and names."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

from leafkd.atomic import recover_dir, sha256_file
from leafkd.errors import LeafkdError

logger = logging.getLogger(__name__)

FORMAT = "leafkd-index/1"


MANIFEST = "manifest.json"


DEFAULT_INDEXES_DIR = Path(os.environ.get("LEAFKD_INDEXES", "indexes"))


# A plain index name: never empty, never a path, never hidden (the writer keeps ``.NAME.*`` files beside it).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def check_index_name(name: str) -> str:
    """``name`` if it is a plain index name (letters, digits, '.', '_', '-'; starting with a letter or digit; at
    most 128 characters), else a one-line `LeafkdError`: a name is never empty and never a path."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LeafkdError(f"index name {name!r}: use a plain name of letters, digits, '.', '_' or '-' that starts "
                          "with a letter or digit (not a path; --indexes-dir says where indexes live)")
    return name


def check_indexes_dir(indexes_dir: str | Path) -> Path:
    """The folder named indexes live in; a one-line error if it (or a parent) exists and is not a folder."""
    d = Path(indexes_dir)
    for p in (d, *d.parents):
        if p.exists() and not p.is_dir():
            raise LeafkdError(f"indexes folder {d}: {p} exists and is not a folder")
    return d


def index_path(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> Path:
    """The folder of an index: a `Path` (or a string with a path separator) is the folder itself; any other string
    is a plain name under ``indexes_dir``, checked by `check_index_name` (so ``''``, ``'.'`` and ``'..'`` are
    refused rather than meaning the indexes folder or its parent)."""
    if isinstance(name_or_path, Path):
        return name_or_path
    text = str(name_or_path)
    if "/" in text or (os.sep in text) or (os.altsep and os.altsep in text):
        return Path(text)
    return check_indexes_dir(indexes_dir) / check_index_name(text)


class IndexBusyError(LeafkdError):
    """Another process holds the index's writer lock (a server answers 503: retry later)."""


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Exclusive writer lock on an index folder, so two updates never interleave. Once it is held, whatever a
    killed writer left (temporary files and folders, a half-done swap) is cleaned up (`leafkd.atomic.recover_dir`)."""
    check_indexes_dir(folder.parent)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.lock"
    with open(lock, "a+") as f:
        try:
            import fcntl

            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexBusyError(f"{folder}: another leafkd process is writing this index") from None
        except ImportError:  # not POSIX: no lock
            pass
        for p in recover_dir(folder):
            logger.info("removed %s, left by an interrupted run", p)
        yield


def finish_manifest(folder: Path, manifest: dict, files: dict[str, str]) -> dict:
    manifest = dict(manifest)
    manifest["files"] = files
    manifest["checksums"] = {f: sha256_file(folder / f) for f in files.values()}
    manifest["updated"] = utc_now()
    return manifest


# The manifest's keys and their types: (type, required). Values of the wrong type are a one-line error at load,
# never a traceback later (or a file path read from outside the folder).
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_TYPES: dict[str, tuple[str, bool]] = {
    "format": ("str", True), "teacher_fingerprint": ("str", True), "dim": ("positive", True),
    "factory": ("str", True), "labels": ("labels", True), "files": ("files", True), "checksums": ("checksums", True),
    "generation": ("positive", True), "count": ("count", False), "rows": ("count", False),
    "tombstones": ("count", False), "next_key": ("count", False), "search_params": ("params", False),
    "teacher_fingerprints": ("dict", False), "fp16": ("bool", False), "normalized": ("bool", False),
    "metric": ("str", False), "teacher": ("str?", False), "doc_prompt": ("str?", False),
    "query_prompt": ("str?", False), "name": ("str?", False),
    "store": ("file", False), "layout": ("positive", False), "base_seq": ("count", False),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_problem(kind: str, v) -> str | None:
    """What is wrong with a manifest value of the given kind (None: nothing)."""
    ok = {
        "str": lambda: isinstance(v, str) and bool(v),
        "str?": lambda: v is None or isinstance(v, str),
        "bool": lambda: isinstance(v, bool),
        "dict": lambda: isinstance(v, dict),
        "positive": lambda: _is_int(v) and v >= 1,
        "count": lambda: _is_int(v) and v >= 0,
        "labels": lambda: v in ("keys", "positions"),
        "files": lambda: isinstance(v, dict) and "index" in v
        and all(isinstance(x, str) and _FILE_RE.match(x) for x in v.values()),
        "file": lambda: isinstance(v, str) and bool(_FILE_RE.match(v)),
        "checksums": lambda: isinstance(v, dict)
        and all(isinstance(x, str) and _SHA256_RE.match(x) for x in v.values()),
        "params": lambda: isinstance(v, dict) and all(isinstance(k, str) and (_is_int(x) or isinstance(x, float))
                                                      and math.isfinite(x) for k, x in v.items()),
    }[kind]()
    if ok:
        return None
    want = {"str": "a non-empty string", "str?": "a string or null", "bool": "true or false", "dict": "an object",
            "positive": "an integer >= 1", "count": "an integer >= 0", "labels": "'keys' or 'positions'",
            "files": "an object with 'index' naming plain files in the folder",
            "file": "a plain file name in the folder",
            "checksums": "an object of sha256 hex digests", "params": "an object of finite numbers"}[kind]
    return f"must be {want}, not {json.dumps(v)[:60]}"


def check_manifest(manifest, where: str | Path) -> dict:
    """``manifest`` if it is a leafkd index manifest whose values have the right types, else a one-line error."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LeafkdError(f"{where}: not a {FORMAT} manifest")
    for key, (kind, required) in _MANIFEST_TYPES.items():
        if key not in manifest:
            if required:
                raise LeafkdError(f"{where}: manifest has no {key!r}")
            continue
        problem = _type_problem(kind, manifest[key])
        if problem:
            raise LeafkdError(f"{where}: manifest {key!r} {problem}")
    if not manifest.get("store") and "docs" not in manifest["files"]:  # a layout-1 index keeps docs.<gen>.jsonl
        raise LeafkdError(f"{where}: manifest names neither a document store ('store') nor a 'docs' file")
    return manifest


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
    return check_manifest(manifest, path)


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


