"""Tokenisation: token ids of many texts stored flat (`Tokenized`), a pool of tokenizer processes for large
inputs, and length-sorted, token-budget batches (`plan_batches`, `pad_batch`).

The Rust tokenizer runs in parallel, but turning its output into arrays (a Python list of ids per text) holds
the GIL: one process tops out near 50k short texts/s, below what a GPU encodes. Worker processes, each with its
own single-threaded copy of the tokenizer, do that part in parallel.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import itertools
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

POOL_TASK_TEXTS = 2048  # texts per worker task
POOL_FIRST_TASK_TEXTS = 256  # texts of the first task (see tokenized_chunks)

# (token ids, lengths, truncated count) of a run of texts, as `_encode_flat` returns them
FlatTokens = tuple[np.ndarray, np.ndarray, int]


@dataclass
class Tokenized:
    """Token ids of many texts, stored flat: ids[offsets[i]:offsets[i+1]] is text i."""

    ids: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, index: np.ndarray) -> Tokenized:
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not len(index):
            return Tokenized(self.ids[:0], offsets)
        ids = np.concatenate([self.ids[self.offsets[i] : self.offsets[i + 1]] for i in index])
        return Tokenized(ids, offsets)


def max_seq_length(model: SentenceTransformer) -> int:
    """The model's maximum input length in tokens (512 where it states none)."""
    length = getattr(model, "max_seq_length", None) or 512
    return int(length)


def _encode_flat(tokenizer: Tokenizer, texts: list[str], max_length: int) -> FlatTokens:
    """Token ids of `texts`, flat int32, their lengths, and how many texts were truncated."""
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no character offsets: faster
    encodings = encode_batch(texts, add_special_tokens=True)
    id_lists = [enc.ids for enc in encodings]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    # Only a text that fills max_length can have been cut; ask those alone for overflow (a costly call).
    truncated = sum(1 for i in np.flatnonzero(lengths >= max_length) if encodings[i].overflowing)
    return ids, lengths, truncated


def _join(parts: list[FlatTokens]) -> tuple[Tokenized, int]:
    lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int32)
    return Tokenized(ids, offsets), sum(p[2] for p in parts)


# A tokenizer process's own tokenizer and max length, set up once by `_worker_init`.
_WORKER: dict[str, Any] = {}

# Pools of tokenizer processes by (tokenizer digest, max length, processes), kept for later calls.
_POOLS: dict[tuple[str, int, int], Pool] = {}


def _worker_init(tokenizer_json: str, max_length: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the pool is the parallelism
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    _WORKER.update(tokenizer=tokenizer, max_length=max_length)


def _worker_encode(texts: list[str]) -> FlatTokens:
    return _encode_flat(_WORKER["tokenizer"], texts, _WORKER["max_length"])


def default_workers(n_texts: int) -> int:
    """Tokenizer processes for `n_texts` texts: none for small inputs or small machines, else up to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_texts < 4 * POOL_TASK_TEXTS or cpus < 4:
        return 0
    return min(8, cpus - 2)


def _pool(tokenizer: Tokenizer, max_length: int, workers: int) -> Pool:
    """A pool of tokenizer processes, started once per (tokenizer, max length, size) and kept for later calls."""
    tokenizer_json = tokenizer.to_str()
    key = (hashlib.sha1(tokenizer_json.encode()).hexdigest(), max_length, workers)
    if key not in _POOLS:
        # fork starts in milliseconds and the workers touch no CUDA state (as DataLoader workers do); where
        # fork is unavailable, spawn.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # Set before forking so the children's tokenizers do not warn that parallelism was used before a fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        _POOLS[key] = context.Pool(workers, initializer=_worker_init, initargs=(tokenizer_json, max_length))
    return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.terminate()
    _POOLS.clear()


def _truncating_tokenizer(model: SentenceTransformer, max_length: int) -> Tokenizer:
    """The model's fast (Rust) tokenizer, set to truncate at `max_length` and not to pad."""
    tokenizer: Tokenizer = model.tokenizer.backend_tokenizer
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def tokenized_chunks(model: SentenceTransformer, texts: Sequence[str], prompt: str | None = None,
                     max_length: int | None = None, chunk: int = 16384,
                     workers: int | None = None) -> Iterator[tuple[Tokenized, int]]:
    """Tokenise `texts` in order, `chunk` texts at a time: (tokens, truncated count) per chunk.

    With `workers` > 0 (default: by input size and CPU count, see `default_workers`) worker processes tokenise
    ahead of the consumer, a bounded number of tasks in flight. Call from the main thread first (the pool
    starts there); iterating from another thread is fine.
    """
    max_length = max_length or max_seq_length(model)
    tokenizer = _truncating_tokenizer(model, max_length)
    workers = default_workers(len(texts)) if workers is None else workers

    def prompted(start: int, stop: int) -> list[str]:
        batch = list(texts[start:stop])
        return [prompt + t for t in batch] if prompt else batch

    if workers <= 0:
        for start in range(0, len(texts), chunk):
            yield _join([_encode_flat(tokenizer, prompted(start, start + chunk), max_length)])
        return
    pool = _pool(tokenizer, max_length, workers)
    # A small first task, so the device gets its first batch within milliseconds; then full-size tasks.
    first = min(POOL_FIRST_TASK_TEXTS, len(texts))
    edges = sorted({0, *range(first, len(texts), POOL_TASK_TEXTS), len(texts)})
    tasks = iter(zip(edges[:-1], edges[1:]))
    in_flight: collections.deque[AsyncResult[FlatTokens]] = collections.deque()

    def submit() -> None:
        task = next(tasks, None)
        if task is not None:
            in_flight.append(pool.apply_async(_worker_encode, (prompted(*task),)))

    for _ in range(4 * workers):
        submit()
    parts: list[FlatTokens] = []
    count, target = 0, first  # the first chunk is the first task alone
    while in_flight:
        part = in_flight.popleft().get()
        submit()
        parts.append(part)
        count += len(part[1])
        if count >= target or not in_flight:
            yield _join(parts)
            parts, count, target = [], 0, chunk


def tokenize(model: SentenceTransformer, texts: Sequence[str], prompt: str | None = None,
             max_length: int | None = None, chunk: int = 65536, workers: int | None = None) -> tuple[Tokenized, int]:
    """Tokenise with the model's fast tokenizer, truncating to its max length.

    Returns the tokens and how many texts were truncated.
    """
    parts = [(t.ids, t.lengths, n) for t, n in tokenized_chunks(model, texts, prompt, max_length, chunk, workers)]
    return _join(parts)


def plan_batches(lengths: np.ndarray, batch_tokens: int, max_batch: int = 8192) -> list[np.ndarray]:
    """Cut text indices, longest first, into batches whose padded size stays under `batch_tokens`."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    i = 0
    n = len(order)
    while i < n:
        longest = max(int(lengths[order[i]]), 1)
        size = max(1, min(max_batch, batch_tokens // longest))
        batches.append(order[i : i + size])
        i += size
    return batches


def pad_batch(tokens: Tokenized, index: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and attention mask for the texts in `index` (vectorised gather, no Python loop)."""
    lengths = tokens.lengths[index]
    width = int(lengths.max()) if len(index) else 0
    cols = np.arange(width)
    mask = cols[None, :] < lengths[:, None]
    pos = np.minimum(tokens.offsets[index][:, None] + cols[None, :], max(len(tokens.ids) - 1, 0))
    ids = np.where(mask, tokens.ids[pos] if len(tokens.ids) else pad_id, pad_id).astype(np.int64)
    return ids, mask.astype(np.int64)
