"""``POST /v1/embeddings``: OpenAI's embeddings API, so OpenAI clients (and tools built on them) can use the server.

Request: ``input`` (a string or a list of strings; OpenAI's token arrays are refused), ``model`` (accepted and
echoed as the served model's name, like text-embeddings-inference), ``dimensions`` (keep the first N dimensions
and renormalise: Matryoshka truncation), ``encoding_format`` (``float``, or ``base64``: little-endian float32, the
default of the openai Python client), ``user`` (ignored), and leafkd's ``input_type``: ``query`` (default: the
query encoder, usually the student) or ``document`` (the index's teacher, when the server loaded it).
"""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations as real types at runtime.

from enum import StrEnum
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from leafkd.data.documents import Document
from leafkd.retrieval.retriever import Retriever
from leafkd.server.batcher import MicroBatcher
from leafkd.server.limits import Limits
from leafkd.server.responses import openai_embeddings_response
from leafkd.server.schemas import ERROR_RESPONSES, has_visible
from leafkd.server.teacher import DocumentEncoder
from leafkd.vectors import normalize

NO_TEACHER = ("this server has no teacher loaded, so it cannot embed documents (start it with --with-teacher); "
              "input_type 'query' uses the query encoder")


class InputType(StrEnum):
    """Which encoder embeds the inputs."""

    QUERY = "query"  # the query encoder (the student, in asymmetric mode)
    DOCUMENT = "document"  # the index's teacher


class EncodingFormat(StrEnum):
    FLOAT = "float"
    BASE64 = "base64"


def input_texts(value: Any, limits: Limits, input_type: InputType) -> list[str]:
    """The texts of an ``input``, or a ValueError naming what is wrong with it."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise ValueError("input must be a string or a non-empty list of strings")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("input must be text: token arrays are not supported")
    most = limits.max_queries if input_type is InputType.QUERY else limits.max_documents
    longest = limits.max_query_chars if input_type is InputType.QUERY else limits.max_document_chars
    if len(texts) > most:
        raise ValueError(f"{len(texts)} inputs, over this server's limit of {most} per request")
    for i, t in enumerate(texts):
        if not has_visible(t):
            raise ValueError(f"input[{i}] must not be empty or only whitespace or control characters")
        if len(t) > longest:
            raise ValueError(f"input[{i}] is {len(t)} characters, over this server's limit of {longest}")
    return texts


def embeddings_request_model(limits: Limits, dim: int) -> type[BaseModel]:
    """The request body, with the server's limits and the index's dimension in its fields."""

    class EmbeddingsRequest(BaseModel):
        """OpenAI's embeddings request, plus ``input_type``."""

        model_config = ConfigDict(extra="forbid")
        input: Any = Field(description="a string or a list of strings")
        model: str | None = Field(None, max_length=256, description="accepted and echoed as the served model")
        dimensions: int | None = Field(None, ge=1, le=dim, strict=True,
                                       description="keep the first N dimensions, renormalised")
        encoding_format: EncodingFormat = EncodingFormat.FLOAT
        user: str | None = Field(None, max_length=256, description="ignored")
        input_type: InputType = Field(InputType.QUERY, description="query: the query encoder; document: the teacher")

        @model_validator(mode="after")
        def _texts(self):
            input_texts(self.input, limits, self.input_type)
            return self

        def texts(self) -> list[str]:
            return input_texts(self.input, limits, self.input_type)

    return EmbeddingsRequest


def truncated(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first ``dimensions`` of each vector, renormalised (all of them when None)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    return normalize(np.ascontiguousarray(vectors[:, :dimensions]))


def add_embeddings_route(app: FastAPI, retriever: Retriever, batcher: MicroBatcher, teacher: DocumentEncoder | None,
                         protected: list[Any], limits: Limits) -> None:
    """``POST /v1/embeddings``."""
    request = embeddings_request_model(limits, retriever.index.dim)

    @app.post("/v1/embeddings", responses={**ERROR_RESPONSES, 403: ERROR_RESPONSES[401]}, dependencies=protected)
    async def embeddings(body: request):  # type: ignore[valid-type]  # made per app from its Limits
        req: Any = body
        """Embeddings in OpenAI's format: queries by the query encoder, documents by the index's teacher."""
        texts = req.texts()
        if req.input_type is InputType.QUERY:
            vecs = await batcher.submit("embed", texts)
            tokens = await run_in_threadpool(lambda: sum(len(ids) for ids in retriever.encoder.tokenize(texts)))
            model = retriever.encoder.name
        else:
            if teacher is None:
                raise StarletteHTTPException(403, NO_TEACHER)
            vecs = await run_in_threadpool(teacher.embed, [Document("", "", t) for t in texts])
            tokens = await run_in_threadpool(teacher.count_tokens, texts)
            model = teacher.name
        return await openai_embeddings_response(truncated(vecs, req.dimensions), model,
                                                req.encoding_format is EncodingFormat.BASE64, tokens,
                                                limits.max_response_bytes)
