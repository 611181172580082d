"""Retrieval: teacher-built FAISS indexes on disk, the query encoder and the `Retriever` that joins them."""

from leafkd.retrieval.build import build_index
from leafkd.retrieval.index import DocIndex, Hit, index_info, load_index
from leafkd.retrieval.query_encoder import QueryEncoder
from leafkd.retrieval.retriever import Retriever
from leafkd.retrieval.updates import add_documents, delete_documents

__all__ = ["DocIndex", "Hit", "QueryEncoder", "Retriever", "add_documents", "build_index", "delete_documents",
           "index_info", "load_index"]
