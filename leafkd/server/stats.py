"""Request statistics and the ASGI guard that enforces the body limit and records every request."""

from __future__ import annotations

import collections
import json
import time

import numpy as np


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


class Guard:
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


