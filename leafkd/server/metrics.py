"""Prometheus metrics of one app (``GET /metrics``), in a registry of its own so that several apps in one process
(tests, several indexes) never share or clash over collectors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from leafkd.retrieval.retriever import Retriever
from leafkd.server.batcher import MicroBatcher

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: a CPU query takes milliseconds, a large add of documents seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    """Request counts and latencies per route, micro-batch sizes, queue depth, index size, encoder device."""

    def __init__(self, retriever: Retriever, batcher: MicroBatcher) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("leafkd_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.latency = Histogram("leafkd_request_duration_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("leafkd_batch_size", "texts per micro-batch slice (one encoder call)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.documents_added = Counter("leafkd_documents_added", "documents added over HTTP", registry=r)
        self.documents_deleted = Counter("leafkd_documents_deleted", "documents deleted over HTTP", registry=r)
        Gauge("leafkd_queue_depth", "texts queued for the encoder", registry=r).set_function(lambda: batcher.depth)
        index = retriever.index
        Gauge("leafkd_index_documents", "documents in the index", registry=r).set_function(lambda: index.count)
        Gauge("leafkd_index_bytes", "memory of the index's vectors and keys", registry=r).set_function(index.nbytes)
        info = retriever.info()
        Info("leafkd_encoder", "the query encoder", registry=r).info(
            {"model": str(info["encoder"]), "device": str(info["encoder_device"]), "mode": str(info["mode"])})
        Info("leafkd_index", "the index served", registry=r).info(
            {"backend": str(info["backend"]), "factory": str(info["factory"]), "device": str(info["index_device"]),
             "dim": str(info["dim"])})
        batcher.on_slice = self.batch_size.observe

    def request(self, route: str, status: int, seconds: float) -> None:
        """Record one answered request (called by `leafkd.server.stats.Stats.record`)."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
