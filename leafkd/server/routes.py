"""The endpoints of the search server: ``POST /search``, ``POST /embed``, ``GET /health``, ``GET /stats``,
``GET /metrics`` (documents: `leafkd.server.documents`; OpenAI embeddings: `leafkd.server.embeddings`)."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations as real types at runtime.

import time
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from leafkd.retrieval.retriever import Retriever
from leafkd.server.batcher import MicroBatcher
from leafkd.server.limits import Limits
from leafkd.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from leafkd.server.metrics import Metrics
from leafkd.server.responses import embed_response, search_response
from leafkd.server.schemas import ERROR_RESPONSES, EmbedResponse, RequestModels, SearchResponse
from leafkd.server.stats import Stats


def add_query_routes(app: FastAPI, retriever: Retriever, batcher: MicroBatcher, models: RequestModels,
                     protected: list[Any], limits: Limits) -> None:
    """``/search`` and ``/embed``: validated requests go to the micro-batcher; answers are size-bounded."""
    # The request classes are made per app from its Limits, so mypy cannot take them as annotations.

    @app.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES, dependencies=protected)
    async def search(req: models.search):  # type: ignore[name-defined]
        """Top-k documents of one query or a batch of queries, among those whose metadata passes ``filter``."""
        t0 = time.perf_counter()
        texts = req.texts()
        hits = await batcher.submit("search", texts, req.top_k, req.parsed_filter())
        return await search_response(texts, hits, req.include_text, retriever.mode, t0, limits.max_response_bytes)

    @app.post("/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES, dependencies=protected)
    async def embed(req: models.embed):  # type: ignore[name-defined]
        """Query-encoder embeddings (normalised), in the index's vector space."""
        t0 = time.perf_counter()
        vecs = await batcher.submit("embed", req.all())
        return await embed_response(vecs, retriever.encoder.name, t0, limits.max_response_bytes)


def stats_report(retriever: Retriever, batcher: MicroBatcher, stats: Stats, limits: Limits) -> dict[str, Any]:
    """The body of ``GET /stats``."""
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
        "encoder": {"model": info["encoder"], "device": info["encoder_device"], "threads": torch.get_num_threads()},
        "mode": retriever.mode,
        "limits": limits.__dict__,
    }


def add_status_routes(app: FastAPI, retriever: Retriever, batcher: MicroBatcher, stats: Stats, limits: Limits,
                      protected: list[Any], metrics: Metrics) -> None:
    """``/health`` (open), ``/stats`` and ``/metrics``."""

    @app.get("/health")
    async def health():
        """Liveness and what is being served (no API key needed)."""
        alive = batcher.alive
        return JSONResponse({"status": "ok" if alive else "starting", "mode": retriever.mode,
                             "documents": retriever.index.count}, status_code=200 if alive else 503)

    @app.get("/stats", dependencies=protected, responses=ERROR_RESPONSES)
    async def get_stats():
        """Requests, latency percentiles (ms), batching, index size and devices."""
        return stats_report(retriever, batcher, stats, limits)

    @app.get("/metrics", dependencies=protected, responses=ERROR_RESPONSES, response_class=Response)
    async def get_metrics():
        """Prometheus text format: requests and latency per route, batch sizes, queue depth, index size, devices."""
        return Response(await run_in_threadpool(metrics.render), media_type=METRICS_CONTENT_TYPE)
