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

import numpy as np
import torch

from leafkd.runtime.devices import inference_dtype
from leafkd.runtime.prefetch import prefetch_iter
from leafkd.runtime.tokens import Tokenized, pad_batch, plan_batches, tokenized_chunks


def default_batch_tokens(device: torch.device) -> int:
    return 262144 if device.type == "cuda" else 8192


def features(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": mask}


def use_packed(model, packed: bool | None) -> bool:
    """Whether to run `model` packed (see leafkd.packed): by default whenever it supports it."""
    from leafkd.runtime.packed import supported

    if packed is None:
        return supported(model)
    return bool(packed)


def batch_items(tokens: Tokenized, batch_tokens: int, packed: bool, pad_id: int, pin: bool,
                 base: np.ndarray | None = None) -> Iterator[dict]:
    """Device-ready batches of `tokens` (longest first), each with the output rows it fills."""
    from leafkd.runtime.packed import pack

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


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_forward(model, compile: bool):
    """The packed forward of `model`; compiled ones are kept per model, so later calls reuse the compilation."""
    from leafkd.runtime.packed import PackedForward

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
    forward = packed_forward(model, compile) if packed else None
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
    items = prefetch_iter(batch_items(tokens, batch_tokens, packed, model.tokenizer.pad_token_id or 0,
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
            yield from batch_items(tokens, batch_tokens, packed, pad_id, device.type == "cuda", base)

    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="text", smoothing=0.05)
    try:
        out = _run(model, prefetch_iter(items()), len(texts), device=device, dtype=dtype, packed=packed, compile=compile,
                   progress=bar.update if bar else progress, on_batch=None)
    finally:
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(counts)
    return out


