"""``POST /documents``, ``DELETE /documents`` and ``GET /documents/{id}``: live updates of the served index.

Adds are embedded by the index's teacher (loaded with ``--with-teacher``; without it a 403 says so) before the
index is touched, then go through `leafkd.retrieval.add_documents` / `delete_documents`: one segment file and
one SQLite transaction under the index's writer lock, so a crash leaves the old or the new state, never a mix, and
the served index sees the change at once. Updates run one at a time, off the event loop; searches go on meanwhile.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations as real types at runtime.

import threading
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from leafkd.data.documents import Document
from leafkd.retrieval.backend import DuplicateIdError, SearchIndex
from leafkd.retrieval.updates import add_documents, delete_documents
from leafkd.server.embeddings import NO_TEACHER
from leafkd.server.limits import Limits
from leafkd.server.metrics import Metrics
from leafkd.server.schemas import ERROR_RESPONSES, DocumentOut, document_models
from leafkd.server.teacher import DocumentEncoder

DOCUMENT_ERRORS: dict[int | str, dict[str, Any]] = {**ERROR_RESPONSES, 403: ERROR_RESPONSES[401],
                                                    404: ERROR_RESPONSES[401], 409: ERROR_RESPONSES[401]}


class DocumentUpdates:
    """The server's updates of its index: one at a time, counted in the metrics."""

    def __init__(self, index: SearchIndex, teacher: DocumentEncoder | None, metrics: Metrics) -> None:
        self.index = index
        self.teacher = teacher
        self.metrics = metrics
        self.lock = threading.Lock()

    def add(self, docs: list[Document]) -> dict[str, Any]:
        if self.teacher is None:
            raise StarletteHTTPException(403, NO_TEACHER.replace("embed documents", "add documents"))
        taken = [d.id for d in docs if self.index.get_document(d.id) is not None]
        if taken:  # before the (slow) embedding; add_documents checks again under the writer lock
            raise DuplicateIdError(taken)
        vectors = self.teacher.embed(docs)
        with self.lock:
            manifest = add_documents(self.index, docs, vectors=vectors, teacher_fingerprint=self.teacher.fingerprint)
        self.metrics.documents_added.inc(len(docs))
        return {"added": len(docs), "ids": [d.id for d in docs], "documents": int(manifest["count"])}

    def delete(self, ids: list[str], missing_ok: bool) -> dict[str, Any]:
        with self.lock:
            before = self.index.count
            manifest = delete_documents(self.index, ids, missing_ok=missing_ok)
        deleted = before - int(manifest["count"])
        self.metrics.documents_deleted.inc(deleted)
        return {"deleted": deleted, "documents": int(manifest["count"])}


def add_document_routes(app: FastAPI, updates: DocumentUpdates, protected: list[Any], limits: Limits) -> None:
    models = document_models(limits)

    @app.post("/documents", status_code=201, responses=DOCUMENT_ERRORS, dependencies=protected)
    async def post_documents(req: models.add):  # type: ignore[name-defined]
        """Embed documents with the index's teacher and add them (all or none; an id already there is a 409)."""
        docs = [Document(d.id, d.title, d.text, d.metadata) for d in req.documents]
        return await run_in_threadpool(updates.add, docs)

    @app.delete("/documents", responses=DOCUMENT_ERRORS, dependencies=protected)
    async def delete_docs(req: models.delete):  # type: ignore[name-defined]
        """Delete documents by id (all or none; an unknown id is a 404 unless ``missing_ok``)."""
        return await run_in_threadpool(updates.delete, list(dict.fromkeys(req.ids)), req.missing_ok)

    @app.get("/documents/{doc_id:path}", response_model=DocumentOut, responses=DOCUMENT_ERRORS,
             dependencies=protected)
    async def get_doc(doc_id: str):
        """One document: id, title, text and metadata."""
        doc = await run_in_threadpool(updates.index.get_document, doc_id)
        if doc is None:
            raise StarletteHTTPException(404, f"no document {doc_id[:80]!r} in the index")
        return {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata}
