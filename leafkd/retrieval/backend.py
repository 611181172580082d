"""What a `leafkd.retrieval.Retriever` searches: the `SearchIndex` protocol, its `Hit`s and the `Backend` names.

Two backends implement it: `leafkd.retrieval.index.DocIndex` (FAISS + the SQLite document store, one machine) and
`leafkd.retrieval.milvus.MilvusIndex` (a Milvus collection: Milvus Lite in a local file, or a cluster by URI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from leafkd.choices import Choice
from leafkd.data.documents import Document
from leafkd.errors import LeafkdError


class DocumentError(LeafkdError):
    """An update or lookup that the documents refuse (a server answers it with a 4xx)."""


class DuplicateIdError(DocumentError):
    """Document ids that are already in the index (HTTP 409)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        super().__init__(f"{len(ids)} document id(s) already in the index ({', '.join(ids[:5])}"
                         f"{', ...' if len(ids) > 5 else ''}); delete them first to replace them")


class UnknownIdError(DocumentError):
    """Document ids that are not in the index (HTTP 404)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        super().__init__(f"{len(ids)} id(s) not in the index: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}")


class InvalidDocumentError(DocumentError):
    """A document the index cannot take (metadata that is not a JSON object, a text over a backend's limit; 422)."""


class Backend(Choice):
    """Where the teacher's document vectors live."""

    FAISS = "faiss"  # an index folder: FAISS + SQLite on this machine
    MILVUS = "milvus"  # a Milvus collection (Milvus Lite file, or a cluster)


@dataclass
class Hit:
    """One search result; ``metadata`` is the document's JSON object (None when it has none)."""

    id: str
    score: float
    title: str
    text: str
    metadata: dict[str, Any] | None = None

    def to_dict(self, include_text: bool = True, include_metadata: bool = True) -> dict:
        d: dict[str, Any] = {"id": self.id, "score": self.score}
        if include_text:
            d["title"] = self.title
            d["text"] = self.text
        if include_metadata and self.metadata is not None:
            d["metadata"] = self.metadata
        return d

    @classmethod
    def of(cls, doc: Document, score: float) -> Hit:
        return cls(doc.id, float(score), doc.title, doc.text, doc.metadata)


@runtime_checkable
class SearchIndex(Protocol):
    """The surface the Retriever (and the server) use, whatever stores the vectors."""

    manifest: dict
    device: str

    @property
    def path(self) -> Path | str | None: ...

    @property
    def dim(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def teacher_fingerprint(self) -> str: ...

    def accepts_fingerprint(self, fp: str | None) -> bool: ...

    def nbytes(self) -> int: ...

    def hits(self, queries: np.ndarray, top_k: int, filter: Any = None) -> list[list[Hit]]: ...

    def get_document(self, doc_id: str) -> Document | None: ...

    def close(self) -> None: ...


def accepts(manifest: dict, fp: str | None) -> bool:
    """Whether vectors of a teacher with fingerprint ``fp`` (any capture prompt/normalisation) share the space of an
    index with this manifest."""
    known = manifest.get("teacher_fingerprints", {})
    return fp is not None and (fp == manifest["teacher_fingerprint"] or fp in known)
