"""Request statistics: counts per route and status, and a window of recent latencies."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import numpy as np

# Where requests to paths the app does not serve are counted (one entry, whatever the paths were).
OTHER_ROUTE = "other"


class Stats:
    """Request counts and a window of recent latencies, keyed by route (a fixed set: see `leafkd.server.guard`)."""

    def __init__(self, window: int = 20_000) -> None:
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self.queries = 0
        self.observers: list[Callable[[str, int, float], None]] = []  # e.g. `leafkd.server.metrics.Metrics.request`

    def record(self, path: str, status: int, seconds: float) -> None:
        self.requests[path] += 1
        self.statuses[status] += 1
        for observe in self.observers:
            observe(path, status, seconds)
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
