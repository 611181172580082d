"""Fast batch encoding with a SentenceTransformer model.

Compared with `SentenceTransformer.encode`: all texts are tokenised up front by the Rust tokenizer in one
parallel call, sorted by length and cut into batches by a token budget (so a batch of short texts is large and
almost free of padding), batches are padded and moved to the device by a background thread while the previous
one runs, and on CUDA the model runs in bf16 under `inference_mode`. The model's own modules (Transformer,
Pooling, Dense, Normalize) do the forward pass, so the vectors are the model's vectors.
"""

from __future__ import annotations

import itertools
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


def tokenize(model, texts: Sequence[str], prompt: str | None = None, max_length: int | None = None,
             chunk: int = 65536) -> tuple[Tokenized, int]:
    """Tokenise with the model's fast tokenizer, truncating to its max length.

    Returns the tokens and how many texts were truncated.
    """
    tokenizer = model.tokenizer
    max_length = max_length or max_seq_length(model)
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length)
    backend.no_padding()
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no character offsets: faster
    ids_parts, length_parts = [], []
    truncated = 0
    for start in range(0, len(texts), chunk):
        batch = list(texts[start : start + chunk])
        if prompt:
            batch = [prompt + t for t in batch]
        encodings = encode_batch(batch, add_special_tokens=True)
        id_lists = [enc.ids for enc in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids_parts.append(np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum())))
        length_parts.append(lengths)
        # Only a text that fills max_length can have been cut; ask those alone for overflow (a costly call).
        truncated += sum(1 for i in np.flatnonzero(lengths >= max_length) if encodings[i].overflowing)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    return Tokenized(ids, offsets), truncated


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
           progress: Callable[[int], None] | None = None, compile: bool = False) -> np.ndarray:
    """Embed texts with a SentenceTransformer; float32 [len(texts), dim] in input order.

    Tokenisation is pipelined with the forward passes: a background thread tokenises `chunk_texts` texts at
    a time (the Rust tokenizer, in parallel, without the GIL), cuts each chunk into length-sorted batches
    and packs them while the device runs the previous ones. `stats`, when given, receives the truncation
    count and the real token count.
    """
    device = torch.device(device) if device is not None else model.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    packed = use_packed(model, packed)
    pad_id = model.tokenizer.pad_token_id or 0
    counts = {"truncated": 0, "tokens": 0}

    def items() -> Iterator[dict]:
        for start in range(0, len(texts), chunk_texts):
            tokens, truncated = tokenize(model, texts[start : start + chunk_texts], prompt=prompt)
            counts["truncated"] += truncated
            counts["tokens"] += int(tokens.lengths.sum())
            base = np.arange(start, start + len(tokens))
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
