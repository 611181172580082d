"""The micro-batcher: concurrent requests gathered into batches for one worker thread (encoder + index)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from leafkd.retrieval.retriever import Retriever


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
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

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


