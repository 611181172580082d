"""Retrieval: teacher-built FAISS indexes on disk, the query encoder and the `Retriever` that joins them."""

from leafkd.extras import MissingExtraError, require

try:
    require(["faiss"], "cpu", "leafkd.retrieval")
except MissingExtraError as e:  # the other way to get FAISS
    raise MissingExtraError(f"{e} (or 'leafkd[gpu]' for faiss-gpu)") from None

from leafkd.retrieval.build import build_index  # noqa: E402
from leafkd.retrieval.index import DocIndex, Hit, index_info, load_index  # noqa: E402
from leafkd.retrieval.query_encoder import QueryEncoder  # noqa: E402
from leafkd.retrieval.retriever import Mode, Retriever  # noqa: E402
from leafkd.retrieval.updates import add_documents, delete_documents  # noqa: E402

__all__ = ["DocIndex", "Hit", "Mode", "QueryEncoder", "Retriever", "add_documents", "build_index", "delete_documents",
           "index_info", "load_index"]
