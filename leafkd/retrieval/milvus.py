"""The Milvus backend: teacher document vectors in a Milvus collection, for indexes beyond one machine.

The same `leafkd.retrieval.backend.SearchIndex` surface as the FAISS `DocIndex`: the teacher fills it
(`build_milvus_index`, `leafkd.retrieval.updates.add_documents`), a `Retriever` queries it with the student, and
metadata filters (`leafkd.retrieval.filters`) become Milvus boolean expressions. One client (pymilvus
``MilvusClient``) serves both deployments; only the ``uri`` changes:

- a local path ending in ``.db``: Milvus Lite, embedded in this process (for tests and small indexes);
- ``http://host:19530`` (or ``https://...``): a Milvus server or cluster; ``token`` is ``"user:password"`` on a
  server with authentication, or the API key of a managed (Zilliz Cloud) endpoint; ``db_name`` picks a database.

Collection schema: ``id`` VARCHAR(512) primary key, ``vector`` FLOAT_VECTOR(dim), ``title`` and ``text``
VARCHAR(65535 bytes), ``metadata`` JSON (nullable). The default index is ``FLAT`` with inner product (exact: the
same top-k as a FAISS ``Flat`` index); a large cluster wants ``index_type="HNSW"`` (``index_params={"M": 16,
"efConstruction": 200}``) or an IVF type. The leafkd manifest (teacher fingerprint, dim, prompts) is stored in
the collection's properties. The collection uses Strong consistency, so a search sees every committed insert and
delete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.extras import require

require(["pymilvus"], "milvus", "leafkd.retrieval.milvus")

from pymilvus import DataType, MilvusClient  # noqa: E402

from leafkd.data.documents import Document, check_unique_ids, read_documents  # noqa: E402
from leafkd.errors import LeafkdError  # noqa: E402
from leafkd.retrieval.backend import DuplicateIdError, Hit, InvalidDocumentError, UnknownIdError, accepts  # noqa: E402
from leafkd.retrieval.build import precomputed_vectors, teacher_vectors  # noqa: E402
from leafkd.retrieval.docstore import encode_metadata  # noqa: E402
from leafkd.retrieval.filters import Filter  # noqa: E402
from leafkd.retrieval.manifest import utc_now  # noqa: E402
from leafkd.vectors import normalize  # noqa: E402

logger = logging.getLogger(__name__)

FORMAT = "leafkd-milvus/1"
MANIFEST_PROPERTY = "leafkd.manifest"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
ID_MAX_CHARS = 512
TEXT_MAX_BYTES = 65535
INSERT_BATCH = 1000  # rows per insert call (Milvus Lite 2.x stalled on much larger ones)
LOOKUP_BATCH = 500
FIELDS = ["id", "title", "text", "metadata"]


def one_line(e: BaseException) -> str:
    text = str(getattr(e, "message", "") or e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def is_local(uri: str) -> bool:
    return not re.match(r"^[a-z]+://", uri)


# Open clients per Milvus Lite file: its embedded server is released when the last one closes.
LITE_CLIENTS: dict[str, int] = {}
LITE_LOCK = threading.Lock()


def connect(uri: str, token: str | None = None, db_name: str | None = None) -> MilvusClient:
    """A client for a Milvus Lite file (a path ending in ``.db``) or a server/cluster URI."""
    if is_local(uri):
        require(["milvus_lite"], "milvus", "Milvus Lite (a local .db path)")
        if not uri.endswith(".db"):
            raise LeafkdError(f"{uri}: a Milvus Lite path must end in .db (or give http://host:19530)")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MilvusClient(uri=uri, token=token or "", db_name=db_name or "")
    except Exception as e:
        raise LeafkdError(f"cannot connect to Milvus at {uri} ({one_line(e)})") from None
    if is_local(uri):
        with LITE_LOCK:
            LITE_CLIENTS[os.path.abspath(uri)] = LITE_CLIENTS.get(os.path.abspath(uri), 0) + 1
    return client


def literal_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


def check_rows(docs: Sequence[Document]) -> None:
    """Milvus' limits on ids and texts, as one-line errors before anything is embedded or inserted."""
    for d in docs:
        if not d.id or len(d.id) > ID_MAX_CHARS:
            raise InvalidDocumentError(f"document id {d.id[:40]!r}: Milvus ids are 1 to {ID_MAX_CHARS} characters")
        for name, value in (("title", d.title), ("text", d.text)):
            if len((value or "").encode("utf-8")) > TEXT_MAX_BYTES:
                raise InvalidDocumentError(f"document {d.id!r}: its {name} is over Milvus' {TEXT_MAX_BYTES} bytes")
        encode_metadata(d.id, d.metadata)


class MilvusIndex:
    """A Milvus collection built by leafkd, searched and updated like a FAISS index folder."""

    device = "milvus"

    def __init__(self, client: MilvusClient, collection: str, manifest: dict, uri: str) -> None:
        self.client, self.collection, self.manifest, self.uri = client, collection, manifest, uri

    # -- opening
    @classmethod
    def open(cls, uri: str, collection: str, *, token: str | None = None, db_name: str | None = None) -> MilvusIndex:
        """The collection ``collection`` at ``uri``; it must have been built by leafkd."""
        client = connect(uri, token, db_name)
        with closed_on_error(client, uri, f"open {collection!r}"):
            if not client.has_collection(collection):
                raise LeafkdError(f"Milvus at {uri}: no collection {collection!r} (build it with build_milvus_index)")
            props = client.describe_collection(collection).get("properties", {})
            if MANIFEST_PROPERTY not in props:
                raise LeafkdError(f"Milvus at {uri}: collection {collection!r} was not built by leafkd")
            manifest = json.loads(props[MANIFEST_PROPERTY])
            client.load_collection(collection)  # a reopened collection starts released
        return cls(client, collection, manifest, uri)

    @classmethod
    def create(cls, uri: str, collection: str, manifest: dict, *, token: str | None = None,
               db_name: str | None = None, index_type: str = "FLAT", index_params: dict | None = None,
               overwrite: bool = False) -> MilvusIndex:
        """A new, empty collection for vectors of ``manifest["dim"]`` dimensions."""
        if not NAME_RE.match(collection):
            raise LeafkdError(f"collection name {collection!r}: use letters, digits and '_' (not first a digit)")
        client = connect(uri, token, db_name)
        with closed_on_error(client, uri, f"create {collection!r}"):
            if client.has_collection(collection):
                if not overwrite:
                    raise LeafkdError(f"Milvus at {uri}: collection {collection!r} exists (overwrite=True replaces it)")
                client.drop_collection(collection)
            new_collection(client, collection, manifest, index_type, index_params or {})
        return cls(client, collection, manifest, uri)

    def close(self) -> None:
        """Close the client (and release an embedded Milvus Lite server, so another process may open the file)."""
        close_client(self.client, self.uri)

    # -- facts
    @property
    def path(self) -> str:
        return f"{self.uri}#{self.collection}"

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        rows = self.call("count", self.client.query, self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.manifest["teacher_fingerprint"])

    def accepts_fingerprint(self, fp: str | None) -> bool:
        return accepts(self.manifest, fp)

    def nbytes(self) -> int:
        return 0  # the vectors live in Milvus

    def call(self, what: str, fn, *args, **kwargs) -> Any:
        """A Milvus call whose failure is a one-line LeafkdError."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise LeafkdError(f"Milvus {what} on {self.collection!r} failed ({one_line(e)})") from None

    # -- search
    def raw_search(self, queries: np.ndarray, top_k: int, filter: Filter | dict | None, fields: list[str]) -> list:
        queries = normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.dim:
            raise LeafkdError(f"query vectors are {queries.shape[1]}-d, the index is {self.dim}-d")
        flt = Filter.parse(filter)
        if top_k <= 0 or not len(queries):
            return [[] for _ in range(len(queries))]
        return self.call("search", self.client.search, self.collection, data=list(queries), limit=top_k,
                         filter=flt.to_milvus() if flt is not None else "", output_fields=fields,
                         search_params={"metric_type": "IP"}, anns_field="vector")

    def search(self, queries: np.ndarray, top_k: int, filter: Filter | dict | None = None
               ) -> tuple[list[list[str]], list[list[float]]]:
        """Ids and inner-product scores of the ``top_k`` nearest documents of each query that pass ``filter``."""
        res = self.raw_search(queries, top_k, filter, ["id"])
        return [[h["id"] for h in row] for row in res], [[float(h["distance"]) for h in row] for row in res]

    def hits(self, queries: np.ndarray, top_k: int, filter: Filter | dict | None = None) -> list[list[Hit]]:
        res = self.raw_search(queries, top_k, filter, FIELDS)
        return [[Hit.of(entity_document(h["entity"]), h["distance"]) for h in row] for row in res]

    # -- documents
    def existing(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), LOOKUP_BATCH):
            part = list(ids[start : start + LOOKUP_BATCH])
            rows = self.call("query", self.client.query, self.collection, filter=f"id in {literal_list(part)}",
                             output_fields=["id"])
            found.update(r["id"] for r in rows)
        return found

    def __contains__(self, doc_id: object) -> bool:
        return bool(self.existing([str(doc_id)]))

    def get_document(self, doc_id: str) -> Document | None:
        rows = self.call("get", self.client.get, self.collection, ids=[str(doc_id)], output_fields=FIELDS)
        return entity_document(rows[0]) if rows else None

    def insert_documents(self, docs: Sequence[Document], vectors: np.ndarray) -> dict:
        """Insert documents and their (teacher) vectors; an id already there is an error. Returns the manifest with
        the new count."""
        check_rows(docs)
        taken = sorted(self.existing([d.id for d in docs]))
        if taken:
            raise DuplicateIdError(taken)
        vectors = normalize(np.asarray(vectors, dtype=np.float32))
        for start in range(0, len(docs), INSERT_BATCH):
            rows = [{"id": d.id, "vector": vectors[start + i], "title": d.title or "", "text": d.text or "",
                     "metadata": d.metadata} for i, d in enumerate(docs[start : start + INSERT_BATCH])]
            self.call("insert", self.client.insert, self.collection, rows)
        self.call("flush", self.client.flush, self.collection)  # sealed segments search fast (Milvus Lite)
        return {**self.manifest, "count": self.count}

    def delete_ids(self, doc_ids: Sequence[str], missing_ok: bool = False) -> dict:
        """Delete documents by id (unknown ids are an error unless ``missing_ok``); returns the manifest."""
        wanted = list(dict.fromkeys(str(d) for d in doc_ids))
        found = self.existing(wanted)
        unknown = [d for d in wanted if d not in found]
        if unknown and not missing_ok:
            raise UnknownIdError(unknown)
        ids = [d for d in wanted if d in found]
        for start in range(0, len(ids), LOOKUP_BATCH):
            self.call("delete", self.client.delete, self.collection, ids=ids[start : start + LOOKUP_BATCH])
        if ids:
            self.call("flush", self.client.flush, self.collection)
        return {**self.manifest, "count": self.count}


@contextlib.contextmanager
def closed_on_error(client: MilvusClient, uri: str, what: str) -> Iterator[None]:
    """Close the client if the block fails; Milvus' own exceptions become one-line LeafkdErrors."""
    try:
        yield
    except LeafkdError:
        close_client(client, uri)
        raise
    except Exception as e:
        close_client(client, uri)
        raise LeafkdError(f"Milvus at {uri}: cannot {what} ({one_line(e)})") from None


def new_collection(client: MilvusClient, collection: str, manifest: dict, index_type: str, index_params: dict) -> None:
    """Create the leafkd schema, its vector index and the manifest property."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_CHARS * 4)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(manifest["dim"]))
    schema.add_field("title", DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
    schema.add_field("metadata", DataType.JSON, nullable=True)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=index_params)
    client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")
    client.alter_collection_properties(collection, properties={MANIFEST_PROPERTY: json.dumps(manifest)})


def entity_document(entity: dict) -> Document:
    return Document(entity["id"], entity.get("title") or "", entity.get("text") or "", entity.get("metadata"))


def close_client(client: MilvusClient, uri: str) -> None:
    try:
        client.close()
    except Exception:  # closing is best effort
        pass
    if not is_local(uri):
        return
    path = os.path.abspath(uri)
    with LITE_LOCK:
        LITE_CLIENTS[path] = LITE_CLIENTS.get(path, 1) - 1
        last = LITE_CLIENTS[path] <= 0
        if last:
            del LITE_CLIENTS[path]
    if last:
        from milvus_lite.server_manager import server_manager_instance

        # MilvusClient.close() keeps the embedded server (and its file lock) alive until the process exits
        server_manager_instance.release_server(path)


def milvus_manifest(collection: str, teacher: str, fingerprint: str, variants: dict, dim: int, *, index_type: str,
                    doc_prompt: str | None, query_prompt: str | None) -> dict:
    import pymilvus

    return {"format": FORMAT, "backend": "milvus", "name": collection, "teacher": teacher,
            "teacher_fingerprint": fingerprint, "teacher_fingerprints": variants or {fingerprint: {}}, "dim": dim,
            "metric": "inner_product", "normalized": True, "factory": index_type, "labels": "ids",
            "doc_prompt": doc_prompt, "query_prompt": query_prompt, "built_with": f"pymilvus {pymilvus.__version__}",
            "created": utc_now()}


def build_milvus_index(uri: str, collection: str, corpus: str | Path | Sequence[Document], *,
                       teacher: str | Path | None = None, model=None, vectors: np.ndarray | str | Path | None = None,
                       teacher_fingerprint: str | None = None, token: str | None = None, db_name: str | None = None,
                       index_type: str = "FLAT", index_params: dict | None = None, doc_prompt: str | None = None,
                       query_prompt: str | None = None, overwrite: bool = False, device: str | None = None,
                       work_dir: str | Path | None = None, show_progress: bool = False) -> MilvusIndex:
    """Embed a corpus with the teacher (or take precomputed ``vectors``) and fill a new Milvus collection."""
    docs = list(corpus) if not isinstance(corpus, (str, Path)) else read_documents(corpus)
    check_unique_ids(docs, corpus if isinstance(corpus, (str, Path)) else "documents")
    if not docs:
        raise LeafkdError("no documents to index")
    check_rows(docs)
    if vectors is not None:
        embedded = precomputed_vectors(vectors, docs, "Flat", teacher, teacher_fingerprint)
    else:
        work = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir()) / "leafkd-milvus"
        embedded = teacher_vectors(docs, work / collection, "Flat", teacher=teacher, model=model,
                                   teacher_fingerprint=teacher_fingerprint, doc_prompt=doc_prompt,
                                   query_prompt=query_prompt, device=device, show_progress=show_progress)
    manifest = milvus_manifest(collection, embedded.teacher, embedded.fingerprint, embedded.variants,
                               int(embedded.vectors.shape[1]), index_type=index_type, doc_prompt=doc_prompt,
                               query_prompt=query_prompt)
    index = MilvusIndex.create(uri, collection, manifest, token=token, db_name=db_name, index_type=index_type,
                               index_params=index_params, overwrite=overwrite)
    try:
        index.insert_documents(docs, embedded.vectors)
    except BaseException:
        index.close()
        raise
    if embedded.work_dir is not None:
        shutil.rmtree(embedded.work_dir, ignore_errors=True)
    logger.info("filled Milvus collection %r at %s with %d documents", collection, uri, len(docs))
    return index
