"""The micro-batcher: concurrent requests gathered into slices for one worker thread (encoder + index).

One worker thread owns the encoder and the index. Each step it takes a *slice* of the queued texts -- at most
``max_batch`` texts and `SLICE_HITS` hits, and on the CPU at most ``slice_tokens`` (estimated) tokens -- embeds
the slice in one call
(the CPU encoder groups it by length, `leafkd.retrieval.query_encoder.length_groups`) and searches it, one FAISS
call per distinct ``top_k``. A request is answered once all its texts have been through a slice.

Who goes into a slice: the oldest request gets up to half of it (so a large request always progresses), then
requests with the fewest texts left fill the rest. So a lone short query that arrives while a 256-query request
is being served waits for one slice, not for the whole request; and under load, slices are full.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leafkd.retrieval.filters import Filter
from leafkd.retrieval.retriever import Retriever

# CPU: estimated tokens per slice (about 100-250 typical queries): one slice takes tens of milliseconds on two
# cores, which is also the most a short query waits behind a large request.
CPU_SLICE_TOKENS = 4096

# Hits (queries x top_k) per slice, on any device: turning FAISS results into hits is Python work per hit, so a
# request of 256 queries x top_k 1000 goes through in slices of 16 queries instead of holding the worker.
SLICE_HITS = 16384


def estimated_tokens(text: str) -> int:
    """A cheap token count for slicing (English word pieces average about four characters)."""
    return min(len(text), 4096) // 4 + 2


@dataclass(eq=False)
class _Job:
    kind: str  # "search" or "embed"
    texts: list[str]
    top_k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    seq: int
    filter: Filter | None = None  # searches: the metadata filter, applied inside the index search
    done: int = 0  # texts served so far
    parts: list[Any] = field(default_factory=list)  # results of the slices served so far, in order

    @property
    def remaining(self) -> int:
        return len(self.texts) - self.done

    @property
    def abandoned(self) -> bool:
        """The client went away (its handler was cancelled): its remaining texts need not be served."""
        return self.future.cancelled()


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
    """Gathers concurrent requests into slices for one worker thread that runs the encoder and the index."""

    def __init__(self, retriever: Retriever, max_batch: int = 256, max_wait_ms: float = 2.0, max_queue: int = 20_000,
                 slice_tokens: int | None = None):
        self.retriever = retriever
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = max_queue
        if slice_tokens is None:  # on an accelerator, larger slices only raise throughput
            on_cpu = str(getattr(retriever.encoder, "device", "cpu")).startswith("cpu")
            slice_tokens = CPU_SLICE_TOKENS if on_cpu else 0
        self.slice_tokens = slice_tokens or math.inf
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._seq = itertools.count()
        self._pending = 0  # queued texts, for back-pressure
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded = False  # the last slice served several requests: wait for more next time
        self.batches = 0
        self.batched_queries = 0
        self.max_seen = 0
        self.on_slice: Callable[[int], None] | None = None  # called with the size of each slice served

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

    async def submit(self, kind: str, texts: list[str], top_k: int = 10, filter: Filter | None = None) -> Any:
        """Embed (``kind`` "embed": a float32 array) or search (``"search"``: hits per text, among the documents
        that pass ``filter``) ``texts``."""
        with self._pending_lock:
            if self._pending + len(texts) > self.max_queue:
                raise Overloaded()
            self._pending += len(texts)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put(_Job(kind, texts, top_k, loop, fut, next(self._seq), filter))
        return await fut

    # -- the worker
    def _run(self) -> None:
        pending: list[_Job] = []
        stopping = False
        while not (stopping and not pending):
            if not pending:
                job = self._q.get()
                if job is None:
                    stopping = True
                    continue
                pending.append(job)
            stopping = self._gather(pending) or stopping
            live = [j for j in pending if not j.abandoned]
            self._forget([j for j in pending if j.abandoned])
            if live:
                self._serve(self._take(live))
            pending = [j for j in live if j.remaining > 0]
        for job in self._drain():  # anything queued after the stop sentinel is served too
            while job.remaining > 0:
                self._serve(self._take([job]))

    def _drain(self) -> list[_Job]:
        out: list[_Job] = []
        while True:
            try:
                j = self._q.get_nowait()
            except queue.Empty:
                return out
            if j is not None:
                out.append(j)

    def _gather(self, pending: list[_Job]) -> bool:
        """Move queued requests into ``pending``: all that are queued now, and while the server is loaded and the
        slice is not full, whatever arrives within ``max_wait``. Returns whether the stop sentinel came."""
        deadline = time.perf_counter() + (self.max_wait if self._loaded else 0.0)
        while True:
            n = sum(j.remaining for j in pending)
            remaining = deadline - time.perf_counter()
            try:
                if n < self.max_batch and remaining > 0:
                    nxt = self._q.get(timeout=remaining)
                else:
                    nxt = self._q.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            pending.append(nxt)

    def _take(self, pending: list[_Job]) -> list[tuple[_Job, int, int]]:
        """The next slice: (request, first text, end) ranges -- the oldest request up to half the slice, then the
        requests with the fewest texts left. A slice holds at least one text."""
        budget = [self.max_batch, self.slice_tokens, SLICE_HITS]  # texts, tokens, hits
        plan: dict[_Job, int] = {}

        def grab(job: _Job, most: float) -> None:
            start = job.done + plan.get(job, 0)
            hits = job.top_k if job.kind == "search" else 0
            n = 0
            while start + n < len(job.texts) and n < most and budget[0] > 0:
                tokens = estimated_tokens(job.texts[start + n])
                if (tokens > budget[1] or hits > budget[2]) and (plan or n):
                    break
                budget[0] -= 1
                budget[1] -= tokens
                budget[2] -= hits
                n += 1
            if n:
                plan[job] = plan.get(job, 0) + n

        oldest = min(pending, key=lambda j: j.seq)
        grab(oldest, max(1, self.max_batch // 2))
        for job in sorted(pending, key=lambda j: (j.remaining, j.seq)):
            grab(job, math.inf)
        self._loaded = len(pending) > 1
        return [(job, job.done, job.done + n) for job, n in plan.items()]

    def _forget(self, jobs: list[_Job]) -> None:
        for job in jobs:
            with self._pending_lock:
                self._pending -= job.remaining
            job.done = len(job.texts)

    def _search(self, plan: list[tuple[_Job, int, int]], vectors: np.ndarray, starts: np.ndarray) -> dict[int, Any]:
        """Hits of each search range of the slice: one FAISS search per distinct (``top_k``, filter)."""
        results: dict[int, Any] = {}
        search = [i for i, (job, _, _) in enumerate(plan) if job.kind == "search"]
        # keyed by repr: equal Filters may differ in JSON type (1 == True in Python, not in a filter)
        groups: dict[tuple[int, str], list[int]] = {}
        for i in search:
            groups.setdefault((plan[i][0].top_k, repr(plan[i][0].filter)), []).append(i)
        for (k, _), members in groups.items():
            flt = plan[members[0]][0].filter
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
            hits = self.retriever.search_vectors(vectors[rows], k, flt)
            pos = 0
            for i in members:
                m = int(starts[i + 1] - starts[i])
                results[i] = hits[pos : pos + m]
                pos += m
        return results

    def _serve(self, plan: list[tuple[_Job, int, int]]) -> None:
        texts = [t for job, a, b in plan for t in job.texts[a:b]]
        try:
            vectors = self.retriever.embed(texts)
            starts = np.cumsum([0] + [b - a for _, a, b in plan])
            results = self._search(plan, vectors, starts)
            self.batches += 1
            self.batched_queries += len(texts)
            self.max_seen = max(self.max_seen, len(texts))
            if self.on_slice is not None:
                self.on_slice(len(texts))
            for i, (job, _, b) in enumerate(plan):
                job.parts.append(results[i] if job.kind == "search" else vectors[starts[i] : starts[i + 1]])
                job.done = b
                if job.remaining == 0:
                    value = ([h for part in job.parts for h in part] if job.kind == "search"
                             else np.concatenate(job.parts))
                    job.loop.call_soon_threadsafe(_resolve, job.future, value)
        except BaseException as e:  # report to every request of the slice; the worker keeps running
            for job, _, b in plan:
                with self._pending_lock:
                    self._pending -= len(job.texts) - b  # its texts after this slice will not be served
                job.done = len(job.texts)
                job.loop.call_soon_threadsafe(_resolve, job.future, e, True)
        finally:
            with self._pending_lock:
                self._pending -= len(texts)
