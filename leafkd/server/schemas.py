"""Request and response bodies of the search server; the request models are made from the server's `Limits`."""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations as real types at runtime.

import unicodedata
from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from leafkd.retrieval.filters import Filter, FilterError
from leafkd.server.limits import Limits


def has_visible(text: str) -> bool:
    """Whether a text has a character that is neither whitespace nor a control/format character (NUL, ...)."""
    return any(not unicodedata.category(c).startswith(("C", "Z")) for c in text)


def one_or_batch(one: str | None, batch: list[str] | None, names: tuple[str, str]) -> list[str]:
    """The texts of a request that gives exactly one of a single text and a batch (``names``: their fields);
    blank texts (whitespace or control characters only) and texts that are not valid Unicode (lone surrogates
    from JSON escapes) are refused."""
    if (one is None) == (batch is None):
        raise ValueError(f"give exactly one of '{names[0]}' or '{names[1]}'")
    texts = [one] if one is not None else list(batch or [])
    what = names[1]
    for t in texts:
        if not has_visible(t):
            raise ValueError(f"{what} must not be empty or only whitespace or control characters")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None
    return texts


class HitOut(BaseModel):
    id: str
    score: float
    title: str | None = None
    text: str | None = None
    metadata: dict[str, Any] | None = None


class QueryResult(BaseModel):
    query: str
    hits: list[HitOut]


class SearchResponse(BaseModel):
    results: list[QueryResult]
    mode: str
    took_ms: float


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    model: str
    took_ms: float


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


# The error answers every protected endpoint documents in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                                    for code in (400, 401, 413, 422, 503)}


class RequestModels(NamedTuple):
    search: type[BaseModel]  # has .texts() -> list[str], .top_k, .include_text
    embed: type[BaseModel]  # has .all() -> list[str]


def request_models(limits: Limits) -> RequestModels:
    """The /search and /embed request bodies, with the limits in their fields (and so in the OpenAPI schema)."""
    Text = Annotated[str, Field(min_length=1, max_length=limits.max_query_chars)]

    class SearchRequest(BaseModel):
        """One query (``query``) or a batch (``queries``); queries x ``top_k`` is limited too."""

        model_config = ConfigDict(extra="forbid")
        query: Text | None = Field(None, description="a single query")
        queries: list[Text] | None = Field(None, min_length=1, max_length=limits.max_queries,
                                              description="a batch of queries")
        top_k: int = Field(10, ge=1, le=limits.max_top_k, strict=True, description="documents per query")
        include_text: bool = Field(True, strict=True, description="return titles and texts, not only ids")
        filter: dict[str, Any] | None = Field(None, description="metadata conditions, all of which a hit meets: "
                                              '{"lang": "de", "year": {"gte": 2000, "lt": 2010}, '
                                              '"tag": {"in": ["a", "b"]}}')

        @model_validator(mode="after")
        def _one_of(self):
            try:
                Filter.parse(self.filter)
            except FilterError as e:  # one 422 line
                raise ValueError(str(e)) from None
            n = len(one_or_batch(self.query, self.queries, ("query", "queries")))
            if n * self.top_k > limits.max_hits:
                raise ValueError(f"{n} queries x top_k {self.top_k} = {n * self.top_k} hits, over this server's "
                                 f"limit of {limits.max_hits} per request: send fewer queries or a smaller top_k")
            return self

        def texts(self) -> list[str]:
            return [self.query] if self.query is not None else list(self.queries or [])

        def parsed_filter(self) -> Filter | None:
            return Filter.parse(self.filter)

    class EmbedRequest(BaseModel):
        """One text (``text``) or a batch (``texts``), embedded by the query encoder."""

        model_config = ConfigDict(extra="forbid")
        text: Text | None = None
        texts: list[Text] | None = Field(None, min_length=1, max_length=limits.max_queries)

        @model_validator(mode="after")
        def _one_of(self):
            one_or_batch(self.text, self.texts, ("text", "texts"))
            return self

        def all(self) -> list[str]:
            return [self.text] if self.text is not None else list(self.texts or [])

    return RequestModels(SearchRequest, EmbedRequest)


class DocumentIn(BaseModel):
    """A document to add: id, title and text (embedded by the teacher), and an optional JSON object of metadata."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=512, description="unique in the index")
    title: str = ""
    text: str = ""
    metadata: dict[str, Any] | None = Field(None, description="filterable fields (a JSON object, up to 64 KiB)")


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict[str, Any] | None = None


class DocumentModels(NamedTuple):
    add: type[BaseModel]  # .documents: list[DocumentIn]
    delete: type[BaseModel]  # .ids: list[str], .missing_ok


def document_models(limits: Limits) -> DocumentModels:
    """The ``POST /documents`` and ``DELETE /documents`` bodies, with the server's limits in their fields."""

    class AddDocuments(BaseModel):
        """Documents to embed with the index's teacher and add, all or none."""

        model_config = ConfigDict(extra="forbid")
        documents: list[DocumentIn] = Field(min_length=1, max_length=limits.max_documents)

        @model_validator(mode="after")
        def _texts(self):
            for d in self.documents:
                if not has_visible(d.id) or any(unicodedata.category(c) == "Cc" for c in d.id):
                    raise ValueError(f"document id {d.id[:40]!r}: must be visible text without control characters")
                if not has_visible(d.title + d.text):
                    raise ValueError(f"document {d.id[:40]!r}: title and text are both empty")
                if len(d.title) + len(d.text) > limits.max_document_chars:
                    raise ValueError(f"document {d.id[:40]!r}: title + text over {limits.max_document_chars} "
                                     "characters")
            ids = [d.id for d in self.documents]
            if len(set(ids)) != len(ids):
                raise ValueError("document ids repeat within the request")
            return self

    class DeleteDocuments(BaseModel):
        """Ids of documents to delete, all or none (unknown ids are a 404 unless ``missing_ok``)."""

        model_config = ConfigDict(extra="forbid")
        ids: list[Annotated[str, Field(min_length=1, max_length=512)]] = Field(min_length=1,
                                                                               max_length=limits.max_documents)
        missing_ok: bool = Field(False, strict=True, description="skip unknown ids instead of refusing the request")

    return DocumentModels(AddDocuments, DeleteDocuments)
