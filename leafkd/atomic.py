"""Atomic writes: outputs appear complete or not at all (write to a temporary path, fsync, rename)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# tempfile's random part of mkstemp/mkdtemp names: 8 characters of this set.
_RANDOM = "[a-z0-9_]{8}"


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask."""
    try:  # Linux reports it without changing it (thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def _mode(directory: bool) -> int:
    """Permissions of a new file or folder under the process umask (mkstemp/mkdtemp create them 0600/0700,
    which would make an index or a model unreadable to the user a server runs as)."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _mode(directory=False))
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as a .npy file to `path` atomically."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _remove(path: Path) -> None:
    """Remove a file, a symbolic link (never its target) or a folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _old(path: Path) -> Path:
    """Where `atomic_dir` parks the folder it replaces during the swap."""
    return path.with_name(f".{path.name}.old")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` whole (a symbolic link at `path` is
    replaced itself, never its target). A run killed mid-swap is repaired by `recover_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _mode(directory=True))
    try:
        yield tmp
        if os.path.lexists(path):
            old = _old(path)
            if os.path.lexists(old):
                _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | Path) -> list[Path]:
    """Repair what killed `atomic_dir` / `atomic_path` runs left at and in `path`; returns what was removed.

    Call it only while holding the writer lock of `path` (no writer is running then): a run killed between the two
    renames of the swap left the previous folder parked as ``.NAME.old`` (moved back); its temporary folders
    ``.NAME.XXXXXXXX.tmp`` beside `path` and temporary files ``.FILE.XXXXXXXX.tmp*`` inside it are removed.
    """
    path = Path(path)
    removed: list[Path] = []
    old = _old(path)
    if os.path.lexists(old):
        if os.path.lexists(path):  # the swap had finished: only the parked copy is left over
            _remove(old)
            removed.append(old)
        else:  # killed between the renames: the previous folder is the complete one
            os.replace(old, path)
            logger.warning("%s: restored from an interrupted replacement", path)
    beside = re.compile(rf"^\.{re.escape(path.name)}\.{_RANDOM}\.tmp$")
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if beside.match(p.name):
                _remove(p)
                removed.append(p)
    inside = re.compile(rf"^\..+\.{_RANDOM}\.tmp(\.[A-Za-z0-9]+)?$")
    if path.is_dir() and not path.is_symlink():
        for p in path.iterdir():
            if inside.match(p.name) and (p.is_file() or p.is_symlink()):
                _remove(p)
                removed.append(p)
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
