"""Fast batch encoding with a SentenceTransformer model.

Compared with `SentenceTransformer.encode`: all texts are tokenised up front by the Rust tokenizer in one
parallel call, sorted by length and cut into batches by a token budget (so a batch of short texts is large and
almost free of padding), batches are padded and moved to the device by a background thread while the previous
one runs, and on CUDA the model runs in bf16 under `inference_mode`. The model's own modules (Transformer,
Pooling, Dense, Normalize) do the forward pass, so the vectors are the model's vectors.
"""

from __future__ import annotations

import queue
import threading
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
    pieces, lengths = [], []
    truncated = 0
    for start in range(0, len(texts), chunk):
        batch = list(texts[start : start + chunk])
        if prompt:
            batch = [prompt + t for t in batch]
        encodings = backend.encode_batch(batch, add_special_tokens=True)
        for enc in encodings:
            ids = enc.ids
            pieces.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
            if enc.overflowing:
                truncated += 1
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return Tokenized(ids, offsets), truncated


def plan_batches(lengths: np.ndarray, batch_tokens: int, max_batch: int = 4096) -> list[np.ndarray]:
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
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for k in range(count):
                if stop.is_set():
                    return
                q.put(make(k))
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        for _ in range(count):
            item = q.get()
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


def encode_tokens(model, tokens: Tokenized, *, batch_tokens: int | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, progress: Callable[[int], None] | None = None,
                  on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray | None:
    """Embed pre-tokenised texts; returns float32 [n, dim] in input order (or streams to `on_batch`)."""
    device = torch.device(device) if device is not None else model.device
    dt = inference_dtype(device, dtype)
    batch_tokens = batch_tokens or default_batch_tokens(device)
    batches = plan_batches(tokens.lengths, batch_tokens)
    pad_id = model.tokenizer.pad_token_id or 0
    pin = device.type == "cuda"

    def make(k: int) -> dict:
        index = batches[k]
        ids, mask = pad_batch(tokens, index, pad_id)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if pin:
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        return {"index": index, "ids": ids_t, "mask": mask_t}

    was_training = model.training
    model.eval()
    model.to(device)
    # Weights already in half precision run as they are; fp32 weights run under autocast, never cast in place.
    param_dtype = next(model.parameters()).dtype
    use_autocast = dt != torch.float32 and param_dtype == torch.float32
    out: np.ndarray | None = None
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dt, enabled=use_autocast):
            for item in _prefetch(make, len(batches)):
                ids = item["ids"].to(device, non_blocking=True)
                mask = item["mask"].to(device, non_blocking=True)
                emb = model(features(ids, mask))["sentence_embedding"].float().cpu().numpy()
                if on_batch is not None:
                    on_batch(item["index"], emb)
                else:
                    if out is None:
                        out = np.empty((len(tokens), emb.shape[1]), dtype=np.float32)
                    out[item["index"]] = emb
                if progress is not None:
                    progress(len(item["index"]))
    finally:
        model.train(was_training)
    if out is None and on_batch is None:
        dim = model.get_sentence_embedding_dimension() or 0
        out = np.zeros((0, dim), dtype=np.float32)
    return out


def encode(model, texts: Sequence[str], *, prompt: str | None = None, batch_tokens: int | None = None,
           device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
           show_progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Embed texts with a SentenceTransformer; float32 [len(texts), dim] in input order."""
    tokens, _ = tokenize(model, texts, prompt=prompt)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="text", smoothing=0.05)
    try:
        return encode_tokens(model, tokens, batch_tokens=batch_tokens, device=device, dtype=dtype,
                             progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
