"""Retrieval: teacher-built FAISS indexes on disk, the query encoder and the `Retriever` that joins them."""

from leafkd.extras import MissingExtraError, require

try:
    require(["faiss"], "cpu", "leafkd.retrieval")
except MissingExtraError as e:  # the other way to get FAISS
    raise MissingExtraError(f"{e} (or 'leafkd[gpu]' for faiss-gpu)") from None

from leafkd.retrieval.backend import (  # noqa: E402
    Backend,
    DocumentError,
    DuplicateIdError,
    Hit,
    InvalidDocumentError,
    SearchIndex,
    UnknownIdError,
)
from leafkd.retrieval.build import build_index  # noqa: E402
from leafkd.retrieval.compaction import compact_index  # noqa: E402
from leafkd.retrieval.filters import Filter, FilterError  # noqa: E402
from leafkd.retrieval.index import DocIndex, index_info, load_index  # noqa: E402
from leafkd.retrieval.quantize import quantize_index  # noqa: E402
from leafkd.retrieval.quantized import Precision, Rescore  # noqa: E402
from leafkd.retrieval.query_encoder import QueryEncoder  # noqa: E402
from leafkd.retrieval.retriever import Mode, Retriever, open_index  # noqa: E402
from leafkd.retrieval.snapshot import snapshot_index  # noqa: E402
from leafkd.retrieval.updates import add_documents, delete_documents, get_document  # noqa: E402

__all__ = ["Backend", "DocIndex", "DocumentError", "DuplicateIdError", "Filter", "FilterError", "Hit",
           "InvalidDocumentError", "Mode", "Precision", "QueryEncoder", "Rescore", "Retriever", "SearchIndex",
           "UnknownIdError", "add_documents", "build_index", "compact_index", "delete_documents", "get_document",
           "index_info", "load_index", "open_index", "quantize_index", "snapshot_index"]
