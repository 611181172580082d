"""Fast batch encoding with a SentenceTransformer model.

Compared with `SentenceTransformer.encode`: texts are tokenised ahead of the device in chunks (for large inputs
by a pool of tokenizer processes, see leafkd.runtime.tokens), sorted by length within a chunk and cut into
batches by a token budget (so a batch of short texts is large), packed without padding (leafkd.runtime.packed)
and moved to the device by a background thread while the previous batch runs; on CUDA the model runs in bf16
under `inference_mode` and vectors come back asynchronously. The model's own modules and weights do the forward
pass, so the vectors are the model's.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from leafkd.models import embedding_dimension
from leafkd.runtime.devices import DType, inference_dtype
from leafkd.runtime.packed import Packed, PackedForward, pack, supported
from leafkd.runtime.prefetch import prefetch_iter
from leafkd.runtime.tokens import Tokenized, pad_batch, plan_batches, tokenized_chunks

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# A batch's inputs: packed, or padded as the model's own features (input_ids, attention_mask).
BatchInputs = Packed | dict[str, torch.Tensor]

# Compiled packed forwards, one per model, so later calls reuse the compilation.
_COMPILED: weakref.WeakKeyDictionary[SentenceTransformer, Callable[[Packed], torch.Tensor]]
_COMPILED = weakref.WeakKeyDictionary()


def default_batch_tokens(device: torch.device) -> int:
    """Default token budget of one batch on `device`."""
    return 262144 if device.type == "cuda" else 8192


def use_packed(model: SentenceTransformer, packed: bool | None) -> bool:
    """Whether to run `model` packed (see leafkd.runtime.packed): by default whenever it supports it."""
    if packed is None:
        return supported(model)
    return bool(packed)


def batch_items(tokens: Tokenized, batch_tokens: int, packed: bool, pad_id: int, pin: bool,
                base: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, BatchInputs]]:
    """Device-ready batches of `tokens` (longest first): the output rows each fills, and its inputs."""
    for index in plan_batches(tokens.lengths, batch_tokens):
        rows = index if base is None else base[index]
        if packed:
            batch = pack(tokens, index)
            yield rows, (batch.pin_memory() if pin else batch)
        else:
            ids, mask = pad_batch(tokens, index, pad_id)
            features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
            yield rows, ({k: v.pin_memory() for k, v in features.items()} if pin else features)


def packed_forward(model: SentenceTransformer, compile: bool) -> Callable[[Packed], torch.Tensor]:
    """The packed forward of `model`; compiled ones are kept per model, so later calls reuse the compilation."""
    if not compile:
        return PackedForward(model)
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(PackedForward(model), dynamic=True)
    return _COMPILED[model]


def _forward(model: SentenceTransformer, packed: bool, compile: bool,
             device: torch.device) -> Callable[[Any], torch.Tensor]:
    """Sentence embeddings of one batch's inputs (as `batch_items` makes them), on `device`."""
    if packed:
        forward = packed_forward(model, compile)
        return lambda batch: forward(batch.to(device))

    def padded(features: dict[str, torch.Tensor]) -> torch.Tensor:
        on_device = {k: v.to(device, non_blocking=True) for k, v in features.items()}
        return model(on_device)["sentence_embedding"]

    return padded


def _run(model: SentenceTransformer, items: Iterator[tuple[np.ndarray, BatchInputs]], n: int, *,
         device: torch.device, dtype: DType | str | torch.dtype | None, packed: bool, compile: bool = False,
         progress: Callable[[int], None] | None, out: np.ndarray | None = None, normalize: bool = False,
         on_rows: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Forward every batch of `items`; each batch's vectors land in its rows of `out` (float32 [n, dim] when not
    given; a given array keeps its dtype: a float16 one receives float16 straight from the device).

    On CUDA each batch's vectors go back to pinned host memory asynchronously and are stored one batch
    later, so the GPU is already running the next batch while the host copies this one out. ``normalize``
    L2-normalises on the device; `on_rows` is called with the rows of each batch once they are in `out`.
    """
    dt = inference_dtype(device, dtype)
    was_training = model.training
    model.eval()
    model.to(device)
    forward = _forward(model, packed, compile, device)
    # Weights already in half precision run as they are; fp32 weights run under autocast, never cast in place.
    param_dtype = next(model.parameters()).dtype
    use_autocast = dt != torch.float32 and param_dtype == torch.float32
    cuda = device.type == "cuda"
    host_dtype = torch.from_numpy(np.zeros(0, dtype=out.dtype)).dtype if out is not None else torch.float32
    pending: list[tuple[np.ndarray, torch.Tensor, torch.cuda.Event | None]] = []

    def finish() -> None:
        nonlocal out
        rows, host, event = pending.pop()
        if event is not None:
            event.synchronize()
        emb = host.numpy()
        if out is None:
            out = np.empty((n, emb.shape[1]), dtype=np.float32)
        out[rows] = emb
        if on_rows is not None:
            on_rows(rows)
        if progress is not None:
            progress(len(rows))

    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dt, enabled=use_autocast):
            for rows, inputs in items:
                emb = forward(inputs).float()
                if normalize:
                    emb = torch.nn.functional.normalize(emb, dim=-1, eps=1e-12)
                event = None
                if cuda:
                    host = torch.empty(emb.shape, dtype=host_dtype, pin_memory=True)
                    host.copy_(emb.to(host_dtype), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host = emb.to(host_dtype)
                if pending:
                    finish()
                pending.append((rows, host, event))
            if pending:
                finish()
    finally:
        model.train(was_training)
    if out is None:  # no texts
        out = np.zeros((n, embedding_dimension(model)), dtype=np.float32)
    return out


def encode_tokens(model: SentenceTransformer, tokens: Tokenized, *, batch_tokens: int | None = None,
                  device: str | torch.device | None = None, dtype: DType | str | torch.dtype | None = None,
                  progress: Callable[[int], None] | None = None, packed: bool | None = None) -> np.ndarray:
    """Embed pre-tokenised texts; returns float32 [n, dim] in input order."""
    device = torch.device(device) if device is not None else model.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    packed = use_packed(model, packed)
    items = prefetch_iter(batch_items(tokens, batch_tokens, packed, model.tokenizer.pad_token_id or 0,
                                      device.type == "cuda"))
    return _run(model, items, len(tokens), device=device, dtype=dtype, packed=packed, progress=progress)


def encode(model: SentenceTransformer, texts: Sequence[str], *, prompt: str | None = None,
           batch_tokens: int | None = None, device: str | torch.device | None = None,
           dtype: DType | str | torch.dtype | None = None, show_progress: bool = False, desc: str = "encode",
           chunk_texts: int = 16384, packed: bool | None = None, stats: dict[str, int] | None = None,
           progress: Callable[[int], None] | None = None, compile: bool = False,
           workers: int | None = None, out: np.ndarray | None = None, normalize: bool = False,
           on_rows: Callable[[np.ndarray], None] | None = None, segment: int | None = None) -> np.ndarray:
    """Embed texts with a SentenceTransformer; float32 [len(texts), dim] in input order (or into `out`).

    Tokenisation is pipelined with the forward passes: `chunk_texts` texts at a time are tokenised (for large
    inputs by `workers` tokenizer processes, see `tokenized_chunks`), cut into length-sorted batches and packed
    by a background thread while the device runs the previous ones. Chunks finish in input order, so a
    consumer of `on_rows` (called with each batch's rows once they are in `out`) sees complete prefixes grow.
    With `segment`, texts are taken `segment` at a time, each tokenised and batched exactly as its own call
    would (so a segment's vectors do not depend on what came before it: a resumed capture recomputes a shard
    bit for bit), in one device pipeline that never drains between segments. `stats`, when given, receives the
    truncation count and the real token count.
    """
    device = torch.device(device) if device is not None else model.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    packed = use_packed(model, packed)
    pad_id = model.tokenizer.pad_token_id or 0
    counts = {"truncated": 0, "tokens": 0}

    step = segment or max(len(texts), 1)

    def segment_chunks(start: int) -> Iterator[tuple[Tokenized, int]]:
        return tokenized_chunks(model, texts[start : start + step], prompt=prompt, chunk=chunk_texts, workers=workers)

    # Started here, in the calling thread (a pool of tokenizer processes, when the input is large); later
    # segments reuse that pool from the prefetch thread.
    chunks = segment_chunks(0)
    first = next(chunks, None)

    def items() -> Iterator[tuple[np.ndarray, BatchInputs]]:
        start = 0
        for seg in range(0, len(texts), step):
            head = [first] if first is not None else []
            seg_chunks = itertools.chain(head, chunks) if seg == 0 else segment_chunks(seg)
            for tokens, truncated in seg_chunks:
                counts["truncated"] += truncated
                counts["tokens"] += int(tokens.lengths.sum())
                base = np.arange(start, start + len(tokens))
                start += len(tokens)
                yield from batch_items(tokens, batch_tokens, packed, pad_id, device.type == "cuda", base)

    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="text", smoothing=0.05)
    try:
        out = _run(model, prefetch_iter(items()), len(texts), device=device, dtype=dtype, packed=packed,
                   compile=compile, progress=bar.update if bar else progress, out=out, normalize=normalize,
                   on_rows=on_rows)
    finally:
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(counts)
    return out
