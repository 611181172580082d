"""Teacher capture: embed a corpus with the teacher once and keep the vectors on disk.

Resumable by construction: texts are deduplicated and taken in a fixed order, cut into shards of
`shard_size`, and each shard is committed whole (see leafkd.store). A rerun after a kill skips every text
whose hash is already stored and recomputes only the shard that was in flight, with the same batches, so it
produces the same vectors as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from leafkd.data import Corpus, text_hash
from leafkd.encode import encode_tokens, max_seq_length, tokenize
from leafkd.errors import LeafkdError
from leafkd.models import blackbox_fingerprint, fingerprint, load_model, resolve_model
from leafkd.store import VectorStore


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LeafkdError(f"device {device!r} asked for, but no CUDA GPU is available")
    return torch.device(device)


def _hash_matrix(texts: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(text_hash(t) for t in texts), dtype=np.uint8).reshape(-1, 16)


def _open_or_create(out: Path, fp: str, dim: int, meta: dict) -> VectorStore:
    if (out / "manifest.json").exists():
        store = VectorStore.open(out)
        if store.fingerprint != fp:
            raise LeafkdError(f"{out}: stored vectors come from teacher {store.fingerprint[:12]}, not {fp[:12]}; "
                              "use another output folder")
        if store.dim != dim:
            raise LeafkdError(f"{out}: stored vectors are {store.dim}-d, the teacher emits {dim}-d")
        return store
    return VectorStore.create(out, fp, dim, **meta)


def _remaining(store: VectorStore, corpus_texts: list[str]) -> list[str]:
    done = {bytes(h) for h in store.hashes()}
    return [t for t in corpus_texts if text_hash(t) not in done] if done else list(corpus_texts)


def capture(teacher: str | Path, corpus: Corpus, out: str | Path, *, prompt: str | None = None,
            normalize: bool = False, shard_size: int = 65536, batch_tokens: int | None = None,
            device: str | None = None, dtype: str | None = None, show_progress: bool = True,
            model=None) -> VectorStore:
    """Embed `corpus` with the teacher into a vector store at `out` (resuming one that is there)."""
    out = Path(out)
    teacher_path = resolve_model(teacher)
    fp = fingerprint(teacher_path, prompt=prompt, normalize=normalize)
    dev = pick_device(device)
    if model is None:
        model = load_model(teacher_path, device=str(dev))
        if dev.type == "cuda":
            model.to(torch.bfloat16)  # a capture-only copy: half-precision weights, no autocast overhead
    dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    store = _open_or_create(out, fp, dim, {"teacher": str(teacher_path), "prompt": prompt, "normalize": normalize,
                                           "max_seq_length": max_seq_length(model), "truncated": 0})
    todo = _remaining(store, corpus.texts)
    if not todo:
        store.update(complete=True)
        return store
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(corpus.texts), initial=len(corpus.texts) - len(todo), desc="capture", unit="text",
                   smoothing=0.05)
    truncated = int(store.manifest.get("truncated", 0))
    try:
        for start in range(0, len(todo), shard_size):
            texts = todo[start : start + shard_size]
            tokens, n_trunc = tokenize(model, texts, prompt=prompt)
            vecs = encode_tokens(model, tokens, batch_tokens=batch_tokens, device=dev, dtype=dtype,
                                 progress=bar.update if bar else None)
            if normalize:
                vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            if not np.isfinite(vecs).all():
                raise LeafkdError("the teacher produced non-finite vectors; check the model and precision")
            truncated += n_trunc
            store.append(vecs.astype(np.float16), texts, _hash_matrix(texts))
            store.update(truncated=truncated)
    finally:
        if bar is not None:
            bar.close()
    store.update(complete=True)
    return store


def capture_blackbox(corpus_texts: list[str], vectors_path: str | Path, out: str | Path, *,
                     normalize: bool = False, shard_size: int = 65536) -> VectorStore:
    """Store precomputed teacher vectors (a black-box teacher): row i of the .npy embeds text i."""
    vectors_path = Path(vectors_path)
    if not vectors_path.exists():
        raise LeafkdError(f"{vectors_path}: no such file")
    try:
        vecs = np.load(vectors_path, mmap_mode="r")
    except ValueError as e:
        raise LeafkdError(f"{vectors_path}: not a .npy array ({e})") from None
    if vecs.ndim != 2:
        raise LeafkdError(f"{vectors_path}: expected a 2-d array, got shape {vecs.shape}")
    if len(vecs) != len(corpus_texts):
        raise LeafkdError(f"{vectors_path}: {len(vecs)} vectors for {len(corpus_texts)} texts")
    fp = blackbox_fingerprint(vectors_path)
    store = _open_or_create(Path(out), fp, vecs.shape[1], {"teacher": f"blackbox:{vectors_path.name}",
                                                            "prompt": None, "normalize": normalize, "truncated": 0})
    seen: set[bytes] = {bytes(h) for h in store.hashes()}
    rows: list[int] = []
    for i, t in enumerate(corpus_texts):
        h = text_hash(t)
        if h not in seen:
            seen.add(h)
            rows.append(i)
    for start in range(0, len(rows), shard_size):
        idx = np.asarray(rows[start : start + shard_size])
        block = np.asarray(vecs[idx], dtype=np.float32)
        if not np.isfinite(block).all():
            raise LeafkdError(f"{vectors_path}: non-finite values among rows {idx[0]}..{idx[-1]}")
        if normalize:
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        texts = [corpus_texts[i] for i in idx]
        store.append(block.astype(np.float16), texts, _hash_matrix(texts))
    store.update(complete=True)
    return store


def check_store_for_teacher(store: VectorStore, teacher: str | Path, prompt: str | None = None,
                            normalize: bool = False, dim: int | None = None) -> None:
    """Refuse stored vectors that another teacher (or another prompt/normalisation) produced."""
    fp = fingerprint(resolve_model(teacher), prompt=prompt, normalize=normalize)
    if store.fingerprint != fp:
        raise LeafkdError(f"{store.path}: vectors from teacher {store.fingerprint[:12]}, but the teacher given is {fp[:12]}")
    if dim is not None and store.dim != dim:
        raise LeafkdError(f"{store.path}: vectors are {store.dim}-d, the teacher emits {dim}-d")

