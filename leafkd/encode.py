"""Fast batch encoding with a SentenceTransformer model.

Compared with `SentenceTransformer.encode`: texts are tokenised ahead of the device in chunks (for large inputs
by a pool of tokenizer processes), sorted by length within a chunk and cut into batches by a token budget (so a
batch of short texts is large), packed without padding (leafkd.packed) and moved to the device by a background
thread while the previous batch runs; on CUDA the model runs in bf16 under `inference_mode` and vectors come
back asynchronously. The model's own modules and weights do the forward pass, so the vectors are the model's.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


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

    def take(self, index: np.ndarray) -> "Tokenized":
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([self.ids[self.offsets[i] : self.offsets[i + 1]] for i in index]) if len(index) else self.ids[:0]
        return Tokenized(ids, offsets)


def max_seq_length(model) -> int:
    length = getattr(model, "max_seq_length", None) or 512
    return int(length)


def _encode_flat(backend, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of `texts`, flat int32, their lengths, and how many texts were truncated."""
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no character offsets: faster
    encodings = encode_batch(texts, add_special_tokens=True)
    id_lists = [enc.ids for enc in encodings]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    # Only a text that fills max_length can have been cut; ask those alone for overflow (a costly call).
    truncated = sum(1 for i in np.flatnonzero(lengths >= max_length) if encodings[i].overflowing)
    return ids, lengths, truncated


def _join(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[Tokenized, int]:
    lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int32)
    return Tokenized(ids, offsets), sum(p[2] for p in parts)


# -- tokenisation in worker processes ------------------------------------------------------------------------
# The Rust tokenizer runs in parallel, but turning its output into arrays (a Python list of ids per text) holds
# the GIL: one process tops out near 50k short texts/s, below what a GPU encodes. Worker processes, each with
# its own single-threaded copy of the tokenizer, do that part in parallel.

_WORKER: dict = {}
_POOLS: dict = {}
POOL_TASK_TEXTS = 2048  # texts per worker task
POOL_FIRST_TASK_TEXTS = 256


def _worker_init(tokenizer_json: str, max_length: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the pool is the parallelism
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    _WORKER.update(tokenizer=tokenizer, max_length=max_length)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    return _encode_flat(_WORKER["tokenizer"], texts, _WORKER["max_length"])


def default_workers(n_texts: int) -> int:
    """Tokenizer processes for `n_texts` texts: none for small inputs or small machines, else up to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_texts < 4 * POOL_TASK_TEXTS or cpus < 4:
        return 0
    return min(8, cpus - 2)


def _pool(backend, max_length: int, workers: int):
    """A pool of tokenizer processes, started once per (tokenizer, max length, size) and kept for later calls."""
    import hashlib
    import multiprocessing

    tokenizer_json = backend.to_str()
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


def _backend(model, max_length: int):
    backend = model.tokenizer.backend_tokenizer
    backend.enable_truncation(max_length)
    backend.no_padding()
    return backend


def tokenized_chunks(model, texts: Sequence[str], prompt: str | None = None, max_length: int | None = None,
                     chunk: int = 16384, workers: int | None = None) -> Iterator[tuple[Tokenized, int]]:
    """Tokenise `texts` in order, `chunk` texts at a time: (tokens, truncated count) per chunk.

    With `workers` > 0 (default: by input size and CPU count, see `default_workers`) worker processes tokenise
    ahead of the consumer, a bounded number of tasks in flight. Call from the main thread first (the pool
    starts there); iterating from another thread is fine.
    """
    max_length = max_length or max_seq_length(model)
    backend = _backend(model, max_length)
    workers = default_workers(len(texts)) if workers is None else workers

    def prompted(start: int, stop: int) -> list[str]:
        batch = list(texts[start:stop])
        return [prompt + t for t in batch] if prompt else batch

    if workers <= 0:
        for start in range(0, len(texts), chunk):
            yield _join([_encode_flat(backend, prompted(start, start + chunk), max_length)])
        return
    pool = _pool(backend, max_length, workers)
    # A small first task, so the device gets its first batch within milliseconds; then full-size tasks.
    first = min(POOL_FIRST_TASK_TEXTS, len(texts))
    edges = sorted({0, *range(first, len(texts), POOL_TASK_TEXTS), len(texts)})
    tasks = iter(zip(edges[:-1], edges[1:]))
    in_flight: collections.deque = collections.deque()

    def submit() -> None:
        task = next(tasks, None)
        if task is not None:
            in_flight.append(pool.apply_async(_worker_encode, (prompted(*task),)))

    for _ in range(4 * workers):
        submit()
    parts, count, target = [], 0, first  # the first chunk is the first task alone
    while in_flight:
        part = in_flight.popleft().get()
        submit()
        parts.append(part)
        count += len(part[1])
        if count >= target or not in_flight:
            yield _join(parts)
            parts, count, target = [], 0, chunk


def tokenize(model, texts: Sequence[str], prompt: str | None = None, max_length: int | None = None,
             chunk: int = 65536, workers: int | None = None) -> tuple[Tokenized, int]:
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


def _prefetch(make: Callable[[int], dict], count: int, depth: int = 4) -> Iterator[dict]:
    """Build items 0..count-1 in a background thread, `depth` ahead of the consumer."""
    return _prefetch_iter((make(k) for k in range(count)), depth)


def _prefetch_iter(items: Iterator, depth: int = 4) -> Iterator:
    """Run the iterator `items` in a background thread, `depth` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def default_batch_tokens(device: torch.device) -> int:
    return 262144 if device.type == "cuda" else 8192


def inference_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[str(dtype)]


def features(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": mask}


def use_packed(model, packed: bool | None) -> bool:
    """Whether to run `model` packed (see leafkd.packed): by default whenever it supports it."""
    from leafkd.packed import supported

    if packed is None:
        return supported(model)
    return bool(packed)


def _batch_items(tokens: Tokenized, batch_tokens: int, packed: bool, pad_id: int, pin: bool,
                 base: np.ndarray | None = None) -> Iterator[dict]:
    """Device-ready batches of `tokens` (longest first), each with the output rows it fills."""
    from leafkd.packed import pack

    for index in plan_batches(tokens.lengths, batch_tokens):
        rows = index if base is None else base[index]
        if packed:
            batch = pack(tokens, index)
            yield {"index": rows, "packed": batch.pin_memory() if pin else batch}
        else:
            ids, mask = pad_batch(tokens, index, pad_id)
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            if pin:
                ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
            yield {"index": rows, "ids": ids_t, "mask": mask_t}


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _packed_forward(model, compile: bool):
    """The packed forward of `model`; compiled ones are kept per model, so later calls reuse the compilation."""
    from leafkd.packed import PackedForward

    if not compile:
        return PackedForward(model)
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(PackedForward(model), dynamic=True)
    return _COMPILED[model]


def _run(model, items: Iterator[dict], n: int, *, device: torch.device, dtype, packed: bool, compile: bool = False,
         progress: Callable[[int], None] | None, on_batch: Callable[[np.ndarray, np.ndarray], None] | None) -> np.ndarray | None:
    """Forward every batch of `items`; float32 rows in place of `index` (or streamed to `on_batch`).

    On CUDA each batch's vectors go back to pinned host memory asynchronously and are stored one batch
    later, so the GPU is already running the next batch while the host copies this one out.
    """
    dt = inference_dtype(device, dtype)
    was_training = model.training
    model.eval()
    model.to(device)
    forward = _packed_forward(model, compile) if packed else None
    # Weights already in half precision run as they are; fp32 weights run under autocast, never cast in place.
    param_dtype = next(model.parameters()).dtype
    use_autocast = dt != torch.float32 and param_dtype == torch.float32
    cuda = device.type == "cuda"
    out: np.ndarray | None = None
    pending: list = []

    def finish() -> None:
        nonlocal out
        index, host, event = pending.pop()
        if event is not None:
            event.synchronize()
        emb = host.numpy()
        if on_batch is not None:
            on_batch(index, emb)
        else:
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[index] = emb
        if progress is not None:
            progress(len(index))

    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dt, enabled=use_autocast):
            for item in items:
                if packed:
                    emb = forward(item["packed"].to(device))
                else:
                    ids = item["ids"].to(device, non_blocking=True)
                    mask = item["mask"].to(device, non_blocking=True)
                    emb = model(features(ids, mask))["sentence_embedding"]
                event = None
                if cuda:
                    host = torch.empty(emb.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(emb.float(), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host = emb.float()
                if pending:
                    finish()
                pending.append((item["index"], host, event))
            if pending:
                finish()
    finally:
        model.train(was_training)
    if out is None and on_batch is None:  # no texts
        out = np.zeros((n, model.get_sentence_embedding_dimension() or 0), dtype=np.float32)
    return out


def encode_tokens(model, tokens: Tokenized, *, batch_tokens: int | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, progress: Callable[[int], None] | None = None,
                  on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
                  packed: bool | None = None) -> np.ndarray | None:
    """Embed pre-tokenised texts; returns float32 [n, dim] in input order (or streams to `on_batch`)."""
    device = torch.device(device) if device is not None else model.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    packed = use_packed(model, packed)
    items = _prefetch_iter(_batch_items(tokens, batch_tokens, packed, model.tokenizer.pad_token_id or 0,
                                        device.type == "cuda"))
    return _run(model, items, len(tokens), device=device, dtype=dtype, packed=packed, progress=progress,
                on_batch=on_batch)


def encode(model, texts: Sequence[str], *, prompt: str | None = None, batch_tokens: int | None = None,
           device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
           show_progress: bool = False, desc: str = "encode", chunk_texts: int = 16384,
           packed: bool | None = None, stats: dict | None = None,
           progress: Callable[[int], None] | None = None, compile: bool = False,
           workers: int | None = None) -> np.ndarray:
    """Embed texts with a SentenceTransformer; float32 [len(texts), dim] in input order.

    Tokenisation is pipelined with the forward passes: `chunk_texts` texts at a time are tokenised (for large
    inputs by `workers` tokenizer processes, see `tokenized_chunks`), cut into length-sorted batches and packed
    by a background thread while the device runs the previous ones. `stats`, when given, receives the
    truncation count and the real token count.
    """
    device = torch.device(device) if device is not None else model.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    packed = use_packed(model, packed)
    pad_id = model.tokenizer.pad_token_id or 0
    counts = {"truncated": 0, "tokens": 0}

    # Started here, in the calling thread (a pool of tokenizer processes, when the input is large).
    chunks = tokenized_chunks(model, texts, prompt=prompt, chunk=chunk_texts, workers=workers)
    first = next(chunks, None)

    def items() -> Iterator[dict]:
        start = 0
        for tokens, truncated in itertools.chain([first] if first is not None else [], chunks):
            counts["truncated"] += truncated
            counts["tokens"] += int(tokens.lengths.sum())
            base = np.arange(start, start + len(tokens))
            start += len(tokens)
            yield from _batch_items(tokens, batch_tokens, packed, pad_id, device.type == "cuda", base)

    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="text", smoothing=0.05)
    try:
        out = _run(model, _prefetch_iter(items()), len(texts), device=device, dtype=dtype, packed=packed, compile=compile,
                   progress=bar.update if bar else progress, on_batch=None)
    finally:
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(counts)
    return out
