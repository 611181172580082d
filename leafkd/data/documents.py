"""Documents: the one reader of corpus files (a BEIR folder, ``corpus.jsonl``, any ``.jsonl`` or a ``.txt``).

A document is an id, a title and a text; its text as the encoders see it is BEIR's rule, title and body joined by
a space (`join_title`). Training sources, index builds, adaptation text and BEIR retrieval sets all read
documents through `read_documents`, so a corpus means the same texts everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leafkd.errors import LeafkdError


@dataclass
class Document:
    """One document of a corpus; ``metadata`` is an optional JSON object (filterable in an index)."""

    id: str
    title: str
    text: str
    metadata: dict[str, Any] | None = None

    @property
    def full_text(self) -> str:
        """Title and text joined, as the encoders see the document."""
        return join_title(self.title, self.text)


def join_title(title: str | None, text: str) -> str:
    """BEIR's document text: title and body joined by a space."""
    title = (title or "").strip()
    text = (text or "").strip()
    return f"{title} {text}".strip() if title else text


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-blank line; a malformed line is a one-line error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise LeafkdError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def jsonl_records(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """JSON objects of a file (BEIR's queries.jsonl), each with the `required` keys; ``_id`` becomes a string."""
    if not path.exists():
        raise LeafkdError(f"{path}: no such file")
    out = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise LeafkdError(f"{path}:{lineno}: not a JSON object")
        for key in required:
            if key not in obj:
                raise LeafkdError(f"{path}:{lineno}: no {key!r} field")
        if "_id" in obj:
            obj["_id"] = str(obj["_id"])
        out.append(obj)
    return out


def corpus_file(path: str | Path) -> Path:
    """The file to read for a corpus path: a BEIR folder means its corpus.jsonl; missing paths are errors."""
    path = Path(path)
    if path.is_dir():
        if not (path / "corpus.jsonl").exists():
            raise LeafkdError(f"{path}: a folder, but not a BEIR corpus (no corpus.jsonl)")
        path = path / "corpus.jsonl"
    if not path.exists():
        raise LeafkdError(f"{path}: no such file")
    return path


class _Ids:
    """Ids for documents that have none: the next free number from `start`, skipping `taken`."""

    def __init__(self, start: int, taken: Container[str]) -> None:
        self.next, self.taken = start, taken

    def __call__(self) -> str:
        while str(self.next) in self.taken:
            self.next += 1
        self.next += 1
        return str(self.next - 1)


def _jsonl_documents(path: Path, field: str, require_ids: bool, new_id: _Ids) -> Iterator[Document]:
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise LeafkdError(f"{path}:{lineno}: not a JSON object")
        if require_ids and "_id" not in obj:
            raise LeafkdError(f"{path}:{lineno}: no '_id' field")
        if field not in obj:
            raise LeafkdError(f"{path}:{lineno}: no {field!r} field")
        if not isinstance(obj[field], str):
            raise LeafkdError(f"{path}:{lineno}: field {field!r} is not a string")
        raw_id = obj.get("_id", obj.get("id"))
        title = obj.get("title")
        metadata = obj.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise LeafkdError(f"{path}:{lineno}: field 'metadata' is not a JSON object")
        yield Document(str(raw_id) if raw_id is not None else new_id(), title if isinstance(title, str) else "",
                       obj[field], metadata)


def read_documents(path: str | Path, *, field: str = "text", require_ids: bool = False, keep_empty: bool = False,
                   id_start: int = 0, taken: Container[str] = frozenset()) -> list[Document]:
    """Documents of a BEIR folder / ``corpus.jsonl``, a ``.jsonl`` (``_id``/``id``, ``title``, `field`, an optional
    ``metadata`` object) or a ``.txt`` (a document a line), in file order.

    Documents without an id get the next free number from `id_start` (skipping `taken` ids); ``require_ids``
    makes a missing ``_id`` an error (BEIR). Empty documents (blank title and text) are dropped unless
    ``keep_empty``. Any problem is a one-line error naming the file (and line).
    """
    path = corpus_file(path)
    new_id = _Ids(id_start, taken)
    try:
        if path.suffix == ".jsonl":
            docs = list(_jsonl_documents(path, field, require_ids, new_id))
        elif path.suffix in (".txt", ""):
            lines = path.read_text(encoding="utf-8").splitlines()
            docs = [Document(new_id(), "", line.strip()) for line in lines if keep_empty or line.strip()]
        else:
            raise LeafkdError(f"{path}: unknown corpus format {path.suffix!r} (use a BEIR folder, .jsonl or .txt)")
    except UnicodeDecodeError as e:
        raise LeafkdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LeafkdError(f"{path}: cannot read ({e.strerror})") from None
    if not keep_empty:
        docs = [d for d in docs if d.title.strip() or d.text.strip()]
    return docs


def check_unique_ids(docs: list[Document], where: str | Path) -> None:
    """A one-line error when two documents share an id (an index maps each id to one row)."""
    seen: set[str] = set()
    dups: list[str] = []
    for d in docs:
        if d.id in seen:
            dups.append(d.id)
        seen.add(d.id)
    if dups:
        raise LeafkdError(f"{where}: duplicate document ids ({', '.join(dups[:5])}{', ...' if len(dups) > 5 else ''})")
