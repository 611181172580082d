"""The search server: a FastAPI app over a `Retriever`, with a micro-batcher in front of the encoder and FAISS.

Concurrency model: request handlers only validate and enqueue; one worker thread owns the encoder and the index
(GPU streams and FAISS GPU indexes must not be driven from several threads) and serves the queued requests in
slices (`leafkd.server.batcher`): one forward pass, one FAISS search per slice. When the server is idle a query is
served at once; once requests overlap, the worker also waits up to ``max_wait_ms`` to gather a fuller slice, so
throughput rises with load while single queries stay fast. Large answers are built off the event loop.

Endpoints: ``POST /search``, ``POST /embed``, ``POST /v1/embeddings`` (OpenAI's API), ``POST``/``DELETE
/documents``, ``GET /documents/{id}``, ``GET /health``, ``GET /stats``, ``GET /metrics`` (Prometheus),
``GET /openapi.json`` (and with
``docs=True`` the ``/docs`` and ``/redoc`` pages, whose scripts the browser loads from a CDN). Bad input always
gets a 4xx JSON body ``{"error": ..., "detail": ...}``; no path redirects (``/search/`` is a 404, not a 307).
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from leafkd import __version__
from leafkd.retrieval.retriever import Retriever
from leafkd.server.auth import api_key_dependencies
from leafkd.server.batcher import MicroBatcher
from leafkd.server.documents import DocumentUpdates, add_document_routes
from leafkd.server.embeddings import add_embeddings_route
from leafkd.server.errors import add_error_handlers
from leafkd.server.guard import Guard
from leafkd.server.limits import Limits
from leafkd.server.metrics import Metrics
from leafkd.server.routes import add_query_routes, add_status_routes
from leafkd.server.schemas import request_models
from leafkd.server.stats import Stats
from leafkd.server.teacher import DocumentEncoder


def create_app(retriever: Retriever, *, api_key: str | None = None, limits: Limits | None = None,
               max_batch: int = 256, max_wait_ms: float = 2.0, warmup: bool = True, docs: bool = False,
               slice_tokens: int | None = None, teacher: DocumentEncoder | None = None) -> FastAPI:
    """The FastAPI app: ``/search``, ``/embed``, ``/v1/embeddings``, ``/documents``, ``/health``, ``/stats``,
    ``/metrics``; ``api_key`` protects all but /health (and /openapi.json). ``slice_tokens``: see `MicroBatcher`
    (None: by the encoder's device). ``teacher``: the index's teacher, for adding documents and embedding them
    (without it those requests are refused with a 403)."""
    limits = limits or Limits()
    stats = Stats()
    batcher = MicroBatcher(retriever, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=limits.max_queue,
                           slice_tokens=slice_tokens)
    metrics = Metrics(retriever, batcher)
    stats.observers.append(metrics.request)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if warmup:  # the first real request should not pay for lazy initialisation
            await batcher.submit("search", ["warm up"], 1)
        yield
        batcher.stop()

    app = FastAPI(title="leafkd search", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  description="Asymmetric retrieval: teacher-embedded documents, student-embedded queries.")
    add_error_handlers(app)
    protected = api_key_dependencies(api_key)
    add_query_routes(app, retriever, batcher, request_models(limits), protected, limits)
    add_embeddings_route(app, retriever, batcher, teacher, protected, limits)
    add_document_routes(app, DocumentUpdates(retriever.index, teacher, metrics), protected, limits)
    add_status_routes(app, retriever, batcher, stats, limits, protected, metrics)
    app.state.batcher = batcher
    app.state.stats = stats
    app.state.metrics = metrics
    routes = {getattr(r, "path", "") for r in app.routes}
    templates = [(r.path, r.path_regex) for r in app.routes if isinstance(r, APIRoute) and "{" in r.path]
    app.add_middleware(Guard, stats=stats, max_body=limits.max_body_bytes, routes=routes, templates=templates)
    return app
