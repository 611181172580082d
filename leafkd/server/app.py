"""The search server: a FastAPI app over a `Retriever`, with a micro-batcher in front of the encoder and FAISS.

Concurrency model: request handlers only validate and enqueue; one worker thread owns the encoder and the index
(GPU streams and FAISS GPU indexes must not be driven from several threads) and serves whatever requests are
queued as one batch: one forward pass, one FAISS search. When the server is idle a query is served at once; once
requests overlap (the previous batch held more than one), the worker also waits up to ``max_wait_ms`` to gather a
larger batch, so throughput rises with load while single queries stay fast.

Endpoints: ``POST /search``, ``POST /embed``, ``GET /health``, ``GET /stats`` (and FastAPI's ``/openapi.json``,
``/docs``). Bad input always gets a 4xx JSON body ``{"error": ..., "detail": ...}``.
"""


import hmac
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np

from leafkd.errors import LeafkdError
from leafkd.retrieval.retriever import Retriever
from leafkd.server.batcher import MicroBatcher, Overloaded
from leafkd.server.limits import API_KEY_HEADER, Limits
from leafkd.server.stats import Guard, Stats


def create_app(retriever: Retriever, *, api_key: str | None = None, limits: Limits | None = None,
               max_batch: int = 256, max_wait_ms: float = 2.0, warmup: bool = True):
    """The FastAPI app: ``/search``, ``/embed``, ``/health``, ``/stats``; ``api_key`` protects all but /health."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import APIKeyHeader
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import leafkd

    limits = limits or Limits()
    stats = Stats()
    batcher = MicroBatcher(retriever, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=limits.max_queue)
    Text = Annotated[str, Field(min_length=1, max_length=limits.max_query_chars)]

    def _check_texts(texts: list[str], what: str) -> None:
        for t in texts:
            if not t.strip():
                raise ValueError(f"{what} must not be empty or only whitespace")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None

    class SearchRequest(BaseModel):
        """One query (``query``) or a batch (``queries``)."""

        model_config = ConfigDict(extra="forbid")
        query: Text | None = Field(None, description="a single query")
        queries: list[Text] | None = Field(None, min_length=1, max_length=limits.max_queries,
                                              description="a batch of queries")
        top_k: int = Field(10, ge=1, le=limits.max_top_k, strict=True, description="documents per query")
        include_text: bool = Field(True, strict=True, description="return titles and texts, not only ids")

        @model_validator(mode="after")
        def _one_of(self):
            if (self.query is None) == (self.queries is None):
                raise ValueError("give exactly one of 'query' or 'queries'")
            _check_texts(self.texts(), "queries")
            return self

        def texts(self) -> list[str]:
            return [self.query] if self.query is not None else list(self.queries or [])

    class EmbedRequest(BaseModel):
        """One text (``text``) or a batch (``texts``), embedded by the query encoder."""

        model_config = ConfigDict(extra="forbid")
        text: Text | None = None
        texts: list[Text] | None = Field(None, min_length=1, max_length=limits.max_queries)

        @model_validator(mode="after")
        def _one_of(self):
            if (self.text is None) == (self.texts is None):
                raise ValueError("give exactly one of 'text' or 'texts'")
            _check_texts(self.all(), "texts")
            return self

        def all(self) -> list[str]:
            return [self.text] if self.text is not None else list(self.texts or [])

    class HitOut(BaseModel):
        id: str
        score: float
        title: str | None = None
        text: str | None = None

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

    errors = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
              422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's API key")

    async def require_key(key: str | None = Depends(key_header)) -> None:
        if api_key is None:
            return
        if not key or not hmac.compare_digest(key.encode("utf-8", "replace"), api_key.encode("utf-8")):
            raise StarletteHTTPException(401, "missing or wrong API key (header X-API-Key)")

    protected = [Depends(require_key)] if api_key is not None else []

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if warmup:  # the first real request should not pay for lazy initialisation
            await batcher.submit("search", ["warm up"], 1)
        yield
        batcher.stop()

    app = FastAPI(title="leafkd search", version=leafkd.__version__, lifespan=lifespan,
                  description="Asymmetric retrieval: teacher-embedded documents, student-embedded queries.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        detail = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            msg = str(e.get("msg", "invalid"))
            detail.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
        summary = "; ".join(f"{d['loc']}: {d['msg']}" for d in detail[:5])
        return JSONResponse({"error": f"invalid request: {summary}", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = {"WWW-Authenticate": "ApiKey"} if exc.status_code == 401 else getattr(exc, "headers", None)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(LeafkdError)
    async def _user(request: Request, exc: LeafkdError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Overloaded)
    async def _busy(request: Request, exc: Overloaded):
        return JSONResponse({"error": "server overloaded, retry later"}, status_code=503, headers={"Retry-After": "1"})

    @app.post("/search", response_model=SearchResponse, responses=errors, dependencies=protected)
    async def search(req: SearchRequest):
        """Top-k documents of one query or a batch of queries."""
        t0 = time.perf_counter()
        texts = req.texts()
        hits = await batcher.submit("search", texts, req.top_k)
        results = [{"query": q, "hits": [h.to_dict(req.include_text) for h in hs]} for q, hs in zip(texts, hits)]
        return JSONResponse({"results": results, "mode": retriever.mode,
                             "took_ms": round((time.perf_counter() - t0) * 1000, 3)})

    @app.post("/embed", response_model=EmbedResponse, responses=errors, dependencies=protected)
    async def embed(req: EmbedRequest):
        """Query-encoder embeddings (normalised), in the index's vector space."""
        t0 = time.perf_counter()
        vecs = await batcher.submit("embed", req.all())
        return JSONResponse({"embeddings": np.round(vecs, 7).tolist(), "dim": int(vecs.shape[1]),
                             "model": retriever.encoder.name, "took_ms": round((time.perf_counter() - t0) * 1000, 3)})

    @app.get("/health")
    async def health():
        """Liveness and what is being served (no API key needed)."""
        alive = batcher._thread is not None and batcher._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "starting", "mode": retriever.mode,
                             "documents": retriever.index.count}, status_code=200 if alive else 503)

    @app.get("/stats", dependencies=protected, responses=errors)
    async def get_stats():
        """Requests, latency percentiles (ms), batching, index size and devices."""
        info = retriever.info()
        return {
            "uptime_s": round(time.time() - stats.started, 1),
            "requests": dict(stats.requests),
            "status_codes": {str(k): v for k, v in sorted(stats.statuses.items())},
            "latency_ms": {p: Stats.percentiles(list(v)) for p, v in stats.latency.items()},
            "batches": {"count": batcher.batches, "queries": batcher.batched_queries,
                        "mean_queries": round(batcher.batched_queries / max(batcher.batches, 1), 2),
                        "max_queries": batcher.max_seen, "queued": batcher.depth,
                        "max_wait_ms": batcher.max_wait * 1000},
            "index": {"documents": retriever.index.count, "dim": retriever.index.dim, "factory": info["factory"],
                      "bytes": retriever.index.nbytes(), "device": retriever.index.device, "path": info["index"]},
            "encoder": {"model": info["encoder"], "device": info["encoder_device"]},
            "mode": retriever.mode,
            "limits": limits.__dict__,
        }

    app.state.batcher = batcher
    app.state.stats = stats
    app.add_middleware(Guard, stats=stats, max_body=limits.max_body_bytes)
    return app


