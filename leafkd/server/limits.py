"""Request limits of the search server and the API key header."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_HEADER = "X-API-Key"


@dataclass
class Limits:
    """Request limits; anything beyond them is a 4xx."""

    max_query_chars: int = 2048
    max_queries: int = 256  # per request
    max_top_k: int = 1000
    # queries x top_k per request: 256 queries x top_k 1000 with texts made a 231 MB answer
    max_hits: int = 10_000
    max_response_bytes: int = 64 << 20
    max_body_bytes: int = 4 << 20  # counted as the body arrives, chunked or not
    max_queue: int = 20_000  # queued queries before new requests get 503
    max_documents: int = 256  # per POST /documents, DELETE /documents or /v1/embeddings of documents
    max_document_chars: int = 100_000  # title + text of one document (or one input_type=document text)
