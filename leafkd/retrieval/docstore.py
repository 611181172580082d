"""The document store of an index: an embedded SQLite database (``docs.sqlite``) of documents, their metadata, their
keys, and the record of updates since the base FAISS index was written.

Tables:

- ``docs(key, id, title, text, metadata)``: the live documents. ``key`` is a unique, increasing int64 given to a
  document when it is added and never reused; it orders the vectors in FAISS and is the FAISS label of IVF indexes.
- ``segments(seq, file, sha256, first_key, count)``: the vector files of the adds since the base index was written.
- ``removed(key, seq)``: deleted documents whose vectors are still in the base index or a segment.
- ``state(name, value)``: ``count`` (live documents), ``next_key`` and ``seq`` (the number of the last update).

Every update is one SQLite transaction (WAL journal, ``synchronous=FULL``): it commits whole or not at all, and costs
O(batch). Texts stay on disk: a search reads the hits' rows only.

The legacy store of ``leafkd-index/1`` folders (``docs.<gen>.jsonl``, one ``[id, title, text]`` row a line) is read
by `read_docs` when such an index is migrated.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leafkd.atomic import atomic_path
from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval.backend import DuplicateIdError, InvalidDocumentError
from leafkd.retrieval.filters import Filter

STORE = "docs.sqlite"
SCHEMA_VERSION = 1
MAX_METADATA_BYTES = 65536
CHUNK = 500  # ids or keys per `IN (...)` query

SCHEMA = """
CREATE TABLE docs (key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL, text TEXT NOT NULL,
                   metadata TEXT);
CREATE TABLE segments (seq INTEGER PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL, first_key INTEGER NOT NULL,
                       count INTEGER NOT NULL);
CREATE TABLE removed (key INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Segment:
    """The vectors of one add: ``count`` rows for keys ``first_key ..``, in ``file``."""

    seq: int
    file: str
    sha256: str
    first_key: int
    count: int

    def keys(self) -> np.ndarray:
        return np.arange(self.first_key, self.first_key + self.count, dtype=np.int64)


@dataclass(frozen=True)
class StoreState:
    count: int
    next_key: int
    seq: int


@dataclass(frozen=True)
class Changes:
    """What the store holds beyond a given update: its state, newer segments and removed keys."""

    state: StoreState
    segments: list[Segment]
    removed: np.ndarray


def encode_metadata(doc_id: str, metadata: object) -> str | None:
    """A document's metadata as compact JSON text (``None`` stays ``None``); it must be a JSON object."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidDocumentError(f"document {doc_id!r}: metadata must be a JSON object, got "
                                   f"{type(metadata).__name__}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidDocumentError(f"document {doc_id!r}: metadata is not JSON ({e})") from None
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InvalidDocumentError(f"document {doc_id!r}: metadata over {MAX_METADATA_BYTES} bytes")
    return text


def document_rows(docs: Sequence[Document], keys: Iterable[int]) -> list[tuple]:
    return [(int(k), d.id, d.title or "", d.text or "", encode_metadata(d.id, d.metadata)) for d, k in zip(docs, keys)]


def row_document(row: Sequence) -> Document:
    """A Document from ``(id, title, text, metadata)`` columns."""
    return Document(row[0], row[1], row[2], json.loads(row[3]) if row[3] is not None else None)


def chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DocStore:
    """One index's SQLite store. Thread-safe: one connection, used under a lock."""

    def __init__(self, path: str | Path, *, readonly: bool = False, wal: bool = True) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        try:
            if readonly:
                self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                            check_same_thread=False)
            else:
                self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA busy_timeout = 10000")
            if self.path != ":memory:" and not readonly and wal:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as e:
            raise LeafkdError(f"{path}: cannot open the document store ({e})") from None
        if version == 0:
            self._create_schema()
        elif version != SCHEMA_VERSION:
            raise LeafkdError(f"{path}: document store schema {version}, this leafkd reads {SCHEMA_VERSION}")

    def _create_schema(self) -> None:
        with self._lock:  # one script, one transaction: a new store has all of its tables or none
            self.conn.executescript(f"""BEGIN IMMEDIATE;
                {SCHEMA}
                INSERT INTO state VALUES ('count', 0), ('next_key', 0), ('seq', 0);
                PRAGMA user_version = {SCHEMA_VERSION};
                COMMIT;""")

    @classmethod
    def create(cls, path: str | Path, docs: Sequence[Document], keys: Sequence[int] | np.ndarray, *,
               removed: Sequence[int] = (), next_key: int | None = None) -> None:
        """Write a new store file atomically: ``docs`` under ``keys``, and ``removed`` keys (vectors in the base)."""
        with atomic_path(path) as tmp:
            store = cls(tmp, wal=False)  # one self-contained file to rename into place
            try:
                store.fill(docs, keys, removed=removed, next_key=next_key)
            finally:
                store.close()

    def fill(self, docs: Sequence[Document], keys: Sequence[int] | np.ndarray, *, removed: Sequence[int] = (),
             next_key: int | None = None) -> None:
        """Load the documents of a new (empty) store in one transaction. ``removed`` keys (vectors in the base that
        are deleted) are recorded as update 1, which a base with ``base_seq`` 0 has not folded in yet."""
        keys = np.asarray(keys, dtype=np.int64)
        rows = document_rows(docs, keys.tolist())
        top = max([int(keys.max()) + 1 if len(keys) else 0, *(int(k) + 1 for k in removed)])
        seq = 1 if len(removed) else 0
        try:
            with self.transaction() as conn:
                conn.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?)", rows)
                conn.executemany("INSERT INTO removed VALUES (?, ?)", [(int(k), seq) for k in removed])
                self.set_state(conn, count=len(rows), next_key=max(top, next_key or 0), seq=seq)
        except sqlite3.IntegrityError as e:
            raise LeafkdError(f"duplicate document ids ({e})") from None

    # -- plumbing
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``with store.transaction() as conn:`` one write transaction (rolled back on any exception)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @staticmethod
    def set_state(conn: sqlite3.Connection, **values: int) -> None:
        conn.executemany("UPDATE state SET value = ? WHERE name = ?", [(int(v), k) for k, v in values.items()])

    def rows(self, sql: str, params: Sequence = ()) -> list:
        """The rows of one read query (an SQLite error is a one-line LeafkdError)."""
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise LeafkdError(f"{self.path}: {e}") from None

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # -- reads
    def state(self) -> StoreState:
        values = dict(self.rows("SELECT name, value FROM state"))
        return StoreState(values["count"], values["next_key"], values["seq"])

    def changes(self, segments_after: int, removed_after: int) -> Changes:
        """State, segments with ``seq > segments_after`` and keys removed with ``seq > removed_after``, read as one
        consistent snapshot."""
        with self._lock:
            self.conn.execute("BEGIN")
            try:
                state = self.state()
                segs = [Segment(*r) for r in self.rows(
                    "SELECT seq, file, sha256, first_key, count FROM segments WHERE seq > ? ORDER BY seq",
                    (segments_after,))]
                removed = np.array([r[0] for r in self.rows("SELECT key FROM removed WHERE seq > ? ORDER BY key",
                                                              (removed_after,))], dtype=np.int64)
            finally:
                self.conn.execute("COMMIT")
        return Changes(state, segs, removed)

    def __contains__(self, doc_id: object) -> bool:
        return bool(self.rows("SELECT 1 FROM docs WHERE id = ?", (str(doc_id),)))

    def keys_of(self, ids: Sequence[str]) -> dict[str, int]:
        """{id: key} of the given ids that are in the store."""
        out: dict[str, int] = {}
        for part in chunks(list(ids)):
            marks = ",".join("?" * len(part))
            out.update(self.rows(f"SELECT id, key FROM docs WHERE id IN ({marks})", list(part)))
        return out

    def get(self, doc_id: str) -> Document | None:
        rows = self.rows("SELECT id, title, text, metadata FROM docs WHERE id = ?", (str(doc_id),))
        return row_document(rows[0]) if rows else None

    def fetch(self, keys: Iterable[int]) -> dict[int, Document]:
        """{key: Document} of the given keys that are in the store."""
        out: dict[int, Document] = {}
        for part in chunks(sorted({int(k) for k in keys})):
            marks = ",".join("?" * len(part))
            for row in self.rows(f"SELECT key, id, title, text, metadata FROM docs WHERE key IN ({marks})",
                                   list(part)):
                out[row[0]] = row_document(row[1:])
        return out

    def match(self, flt: Filter) -> np.ndarray:
        """Sorted keys of the live documents whose metadata satisfies ``flt``."""
        where, params = flt.to_sql()
        rows = self.rows(f"SELECT key FROM docs WHERE metadata IS NOT NULL AND {where} ORDER BY key", params)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def ids(self) -> Iterator[str]:
        """Every live id, in key order (O(corpus): for exports and tests)."""
        for (doc_id,) in self.rows("SELECT id FROM docs ORDER BY key"):
            yield doc_id

    def segment_files(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT file FROM segments")}

    def pending(self, base_seq: int) -> tuple[int, int]:
        """(segments, removed keys) recorded after update ``base_seq``: the work a compaction would fold in."""
        segs = self.rows("SELECT count(*) FROM segments WHERE seq > ?", (base_seq,))[0][0]
        removed = self.rows("SELECT count(*) FROM removed")[0][0]
        return int(segs), int(removed)

    # -- writes (one transaction each)
    def add(self, docs: Sequence[Document], segment: Segment) -> StoreState:
        """Insert ``docs`` under the segment's keys and record the segment; raises on a duplicate id."""
        with self.transaction() as conn:
            state = self.state()
            taken = list(self.keys_of([d.id for d in docs]))
            if taken:
                raise DuplicateIdError(taken)
            if segment.first_key != state.next_key or segment.seq != state.seq + 1 or segment.count != len(docs):
                raise LeafkdError(f"{self.path}: the store changed during the add (next key {state.next_key})")
            try:
                conn.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?)",
                                 document_rows(docs, segment.keys().tolist()))
            except sqlite3.IntegrityError as e:
                raise InvalidDocumentError(f"duplicate document ids in the batch ({e})") from None
            conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?)",
                         (segment.seq, segment.file, segment.sha256, segment.first_key, segment.count))
            new = StoreState(state.count + len(docs), state.next_key + len(docs), segment.seq)
            self.set_state(conn, count=new.count, next_key=new.next_key, seq=new.seq)
        return new

    def delete(self, ids: Sequence[str]) -> tuple[np.ndarray, StoreState]:
        """Delete the documents with these ids (unknown ids are skipped); returns their keys and the new state."""
        with self.transaction() as conn:
            state = self.state()
            keys = np.array(sorted(self.keys_of(ids).values()), dtype=np.int64)
            if not len(keys):
                return keys, state
            seq = state.seq + 1
            for part in chunks(keys.tolist()):
                conn.execute(f"DELETE FROM docs WHERE key IN ({','.join('?' * len(part))})", part)
            conn.executemany("INSERT OR REPLACE INTO removed VALUES (?, ?)", [(k, seq) for k in keys.tolist()])
            new = StoreState(state.count - len(keys), state.next_key, seq)
            self.set_state(conn, count=new.count, seq=seq)
        return keys, new

    def forget(self, upto_seq: int) -> None:
        """After a compaction folded updates up to ``upto_seq`` into a new base: drop their records."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM segments WHERE seq <= ?", (upto_seq,))
            conn.execute("DELETE FROM removed WHERE seq <= ?", (upto_seq,))

    def backup(self, dest: str | Path) -> None:
        """A consistent copy of the whole store (the sqlite3 online backup API)."""
        with self._lock:
            target = sqlite3.connect(str(dest))
            try:
                self.conn.backup(target)
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()


# -- the leafkd-index/1 JSONL store
def write_docs(path: Path, ids: Sequence[str | None], titles: Sequence[str], texts: Sequence[str]) -> None:
    """Write a legacy ``docs.<gen>.jsonl`` store (still used by `leafkd.retrieval.manifest.save_generation`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in zip(ids, titles, texts):
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")


def read_docs(path: Path) -> tuple[list[str | None], list[str], list[str]]:
    """The rows of a legacy ``docs.<gen>.jsonl`` store: ids (``None`` for tombstones), titles, texts."""
    ids: list[str | None] = []
    titles: list[str] = []
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                i, t, x = json.loads(line)
            except (ValueError, TypeError):
                raise LeafkdError(f"{path}:{lineno}: not a document row") from None
            ids.append(i)
            titles.append(t)
            texts.append(x)
    return ids, titles, texts
