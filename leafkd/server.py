"""The search server: a FastAPI app over a `Retriever`, with a micro-batcher in front of the encoder and FAISS.

Concurrency model: request handlers only validate and enqueue; one worker thread owns the encoder and the index
(GPU streams and FAISS GPU indexes must not be driven from several threads) and serves whatever requests are
queued as one batch: one forward pass, one FAISS search. When the server is idle a query is served at once; once
requests overlap (the previous batch held more than one), the worker also waits up to ``max_wait_ms`` to gather a
larger batch, so throughput rises with load while single queries stay fast.

Endpoints: ``POST /search``, ``POST /embed``, ``GET /health``, ``GET /stats`` (and FastAPI's ``/openapi.json``,
``/docs``). Bad input always gets a 4xx JSON body ``{"error": ..., "detail": ...}``.
"""


# No `from __future__ import annotations`: FastAPI must see the request models (defined in create_app) as
# real classes, not strings it cannot resolve.
import asyncio
import collections
import hmac
import json
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import numpy as np

from leafkd.errors import LeafkdError
from leafkd.retriever import Retriever

API_KEY_HEADER = "X-API-Key"


@dataclass
class Limits:
    """Request limits; anything beyond them is a 4xx."""

    max_query_chars: int = 2048
    max_queries: int = 256  # per request
    max_top_k: int = 1000
    max_body_bytes: int = 4 << 20
    max_queue: int = 20_000  # queued queries before new requests get 503


# ----------------------------------------------------------------------------------------------- micro-batcher


@dataclass
class _Job:
    kind: str  # "search" or "embed"
    texts: list[str]
    top_k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    include_text: bool = True


def _resolve(fut: asyncio.Future, value: Any, error: bool = False) -> None:
    if fut.done():  # the client went away and the handler was cancelled
        return
    if error:
        fut.set_exception(value)
    else:
        fut.set_result(value)


class Overloaded(Exception):
    pass


class MicroBatcher:
    """Gathers concurrent requests into batches for one worker thread that runs the encoder and the index."""

    def __init__(self, retriever: Retriever, max_batch: int = 256, max_wait_ms: float = 2.0, max_queue: int = 20_000):
        self.retriever = retriever
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = max_queue
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0  # queued queries, for back-pressure
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded = False  # the last batch held several requests: wait for more next time
        self.batches = 0
        self.batched_queries = 0
        self.max_seen = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="leafkd-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Serve what is queued, then stop the worker."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        return self._pending

    async def submit(self, kind: str, texts: list[str], top_k: int = 10, include_text: bool = True) -> Any:
        with self._pending_lock:
            if self._pending + len(texts) > self.max_queue:
                raise Overloaded()
            self._pending += len(texts)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put(_Job(kind, texts, top_k, loop, fut, include_text))
        return await fut

    def _run(self) -> None:
        stop = False
        while not stop:
            job = self._q.get()
            if job is None:
                break
            batch = [job]
            n = len(job.texts)
            deadline = time.perf_counter() + (self.max_wait if self._loaded else 0.0)
            while n < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt.texts)
            self._loaded = len(batch) > 1
            self._serve(batch)
            with self._pending_lock:
                self._pending -= n
        # Anything still queued after the stop sentinel is served too: nothing accepted is dropped.
        rest = []
        while True:
            try:
                j = self._q.get_nowait()
            except queue.Empty:
                break
            if j is not None:
                rest.append(j)
        if rest:
            self._serve(rest)

    def _serve(self, batch: list[_Job]) -> None:
        try:
            texts = [t for j in batch for t in j.texts]
            vectors = self.retriever.embed(texts)
            search_jobs = [i for i, j in enumerate(batch) if j.kind == "search"]
            starts = np.cumsum([0] + [len(j.texts) for j in batch])
            results: dict[int, Any] = {}
            if search_jobs:
                rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in search_jobs])
                k = max(batch[i].top_k for i in search_jobs)
                hits = self.retriever.search_vectors(vectors[rows], k)
                pos = 0
                for i in search_jobs:
                    m = len(batch[i].texts)
                    results[i] = [h[: batch[i].top_k] for h in hits[pos : pos + m]]
                    pos += m
            for i, j in enumerate(batch):
                if j.kind == "embed":
                    results[i] = vectors[starts[i] : starts[i + 1]]
            self.batches += 1
            self.batched_queries += len(texts)
            self.max_seen = max(self.max_seen, len(texts))
            for i, j in enumerate(batch):
                j.loop.call_soon_threadsafe(_resolve, j.future, results[i])
        except BaseException as e:  # report to every waiting request; the worker keeps running
            for j in batch:
                j.loop.call_soon_threadsafe(_resolve, j.future, e, True)


# ----------------------------------------------------------------------------------------------- stats


class Stats:
    """Request counts and a window of recent latencies."""

    def __init__(self, window: int = 20_000) -> None:
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self.queries = 0

    def record(self, path: str, status: int, seconds: float) -> None:
        self.requests[path] += 1
        self.statuses[status] += 1
        if path in ("/search", "/embed") and status == 200:
            self.latency[path].append(seconds * 1000.0)

    @staticmethod
    def percentiles(values) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
        a = np.fromiter(values, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
                "mean": round(float(a.mean()), 3), "n": int(len(a))}


class _Guard:
    """Pure-ASGI middleware (cheaper than BaseHTTPMiddleware): body-size limit, status counts and latencies."""

    def __init__(self, app, stats: Stats, max_body: int) -> None:
        self.app = app
        self.stats = stats
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]
        path = scope.get("path", "")
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                if not v.isdigit() or int(v) > self.max_body:
                    body = json.dumps({"error": f"request body over {self.max_body} bytes"}).encode()
                    await send({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    self.stats.record(path, 413, time.perf_counter() - t0)
                    return

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.stats.record(path, status[0], time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- app


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
        query: Optional[Text] = Field(None, description="a single query")
        queries: Optional[list[Text]] = Field(None, min_length=1, max_length=limits.max_queries,
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
        text: Optional[Text] = None
        texts: Optional[list[Text]] = Field(None, min_length=1, max_length=limits.max_queries)

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
        title: Optional[str] = None
        text: Optional[str] = None

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

    async def require_key(key: Optional[str] = Depends(key_header)) -> None:
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
    app.add_middleware(_Guard, stats=stats, max_body=limits.max_body_bytes)
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", sock=None,
          graceful_timeout: float = 30.0) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM, then shut down gracefully and return normally.

    On the first signal the server stops accepting connections, in-flight requests finish (up to
    ``graceful_timeout`` s), the micro-batcher serves what it had queued, and the call returns; a second SIGINT
    forces the exit. (Stock uvicorn re-raises the signal afterwards, which would turn a clean stop into a
    "killed" exit status.)
    """
    import contextlib
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn >= 0.29 calls this around serving
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM]
            previous = {s: signal.signal(s, self._leafkd_signal) for s in sigs}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        def _leafkd_signal(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    import gc
    import os
    import sys

    # The batcher thread and the event loop share the GIL; with the default 5 ms switch interval a busy batcher
    # (tokenising, launching kernels) delays every socket event by up to 5 ms. 1 ms keeps the loop responsive.
    sys.setswitchinterval(float(os.environ.get("LEAFKD_SWITCH_INTERVAL", "0.001")))
    # Everything alive now (models, index, document store) is long-lived: keep it out of the GC's scans so a
    # generation-2 collection never stalls a request for tens of ms.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                            access_log=False)
    server = _Server(config)
    server.run(sockets=[sock] if sock is not None else None)
