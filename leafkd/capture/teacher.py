"""Teacher capture: embed a corpus with the teacher once and keep the vectors on disk.

Resumable by construction: texts are deduplicated and taken in a fixed order, cut into shards of
`shard_size`, and each shard is committed whole (see leafkd.capture.store). A rerun after a kill skips every
text whose hash is already stored and recomputes only the shard that was in flight, with the same batches, so
it produces the same vectors as an uninterrupted run.

Under torchrun the shards are split over the ranks (see `_capture_distributed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from leafkd import atomic
from leafkd.capture.store import VectorStore
from leafkd.data.sources import Corpus, text_hash
from leafkd.errors import LeafkdError
from leafkd.models import blackbox_fingerprint, embedding_dimension, fingerprint, load_model, resolve_model
from leafkd.runtime import distributed
from leafkd.runtime.devices import DType, pick_device
from leafkd.runtime.encode import encode
from leafkd.runtime.tokens import max_seq_length
from leafkd.vectors import normalize as l2_normalize

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tqdm import tqdm

logger = logging.getLogger(__name__)

# Texts to capture from which compiling the teacher's forward pays for itself (on CUDA, auto). From one H200 run
# with all-mpnet-base-v2 (eval/BENCHMARKS.md, H200): a cold compile costs ~25 s (by difference of two measured
# command timings), and it saves 5.9 us per short text (46.8k -> 64.4k texts/s) and 17 us per passage (8.1k ->
# 9.5k/s): break-even at ~4.3M short texts or ~1.4M passages.
AUTO_COMPILE_TEXTS = 2_000_000
PENDING = ".pending"  # per-shard completion records of a distributed capture, merged into the manifest at the end


@dataclass
class _ShardEncoder:
    """The teacher and how it embeds: texts -> float16 vectors (checked finite) and a truncation count."""

    model: SentenceTransformer
    prompt: str | None
    normalize: bool
    batch_tokens: int | None
    device: torch.device
    dtype: DType | str | None
    compile: bool = False

    def __call__(self, texts: list[str], progress: Callable[[int], None] | None,
                 on_rows: Callable[[np.ndarray], None] | None = None, out: np.ndarray | None = None,
                 segment: int | None = None) -> tuple[np.ndarray, int]:
        """float16 [len(texts), dim] (into `out` when given), cast and normalised on the device; `on_rows` as in
        `encode`."""
        stats: dict[str, int] = {}
        vecs = out if out is not None else np.empty((len(texts), embedding_dimension(self.model)), dtype=np.float16)
        encode(self.model, texts, prompt=self.prompt, batch_tokens=self.batch_tokens, device=self.device,
               dtype=self.dtype, progress=progress, stats=stats, compile=self.compile, out=vecs,
               normalize=self.normalize, on_rows=on_rows, segment=segment)
        return vecs, stats["truncated"]


def _check_finite(vecs: np.ndarray) -> None:
    # float16 rows (every shard): a value is inf or NaN exactly when its five exponent bits are all set; the bit
    # test takes half the time of np.isfinite, which widens each float16 (52k x 768: 49 vs 96 ms on a 2-core VM).
    if vecs.dtype == np.float16:
        bad = bool(((np.ascontiguousarray(vecs).view(np.uint16) & 0x7C00) == 0x7C00).any())
    else:
        bad = not np.isfinite(vecs).all()
    if bad:
        raise LeafkdError("the teacher produced non-finite vectors (or values beyond float16); check the model "
                          "and precision")


class _ShardWriter:
    """Commits shards of a streaming capture in order, in a background thread, while the device keeps encoding.

    The encoder fills `vecs` (rows of `texts`) batch by batch; `rows_done` counts each shard's filled rows and
    hands a complete shard to the thread, which checks it and appends it to the store (files first, then the
    manifest), so a kill at any point leaves only whole shards listed.
    """

    def __init__(self, store: VectorStore, texts: list[str], vecs: np.ndarray, shard_size: int) -> None:
        import queue
        import threading

        self.store, self.texts, self.vecs, self.shard_size = store, texts, vecs, shard_size
        self.n_shards = -(-len(texts) // shard_size)
        self.filled = np.zeros(self.n_shards, dtype=np.int64)
        self.sizes = np.minimum(shard_size, len(texts) - np.arange(self.n_shards) * shard_size)
        self.queue: queue.Queue[int | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="leafkd-shard-writer", daemon=True)
        self.thread.start()

    def rows_done(self, rows: np.ndarray) -> None:
        counts = np.bincount(np.asarray(rows) // self.shard_size, minlength=self.n_shards)
        before = self.filled.copy()
        self.filled += counts
        for k in np.flatnonzero((before < self.sizes) & (self.filled >= self.sizes)):
            self.queue.put(int(k))
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        done: set[int] = set()
        next_k = 0
        while next_k < self.n_shards:
            k = self.queue.get()
            if k is None:
                return
            done.add(k)
            while next_k in done:  # shards are listed in order, whatever order they complete in
                try:
                    s = slice(next_k * self.shard_size, next_k * self.shard_size + int(self.sizes[next_k]))
                    _check_finite(self.vecs[s])
                    self.store.append(self.vecs[s], self.texts[s], _hash_matrix(self.texts[s]))
                except BaseException as e:  # re-raised in the encoding thread
                    self.error = e
                    return
                next_k += 1

    def close(self) -> None:
        """Wait for the shards handed over so far to be written (all of them after a whole run); re-raise a
        writer error."""
        self.queue.put(None)  # after every complete shard: the thread writes those, then stops
        self.thread.join()
        if self.error is not None:
            raise self.error


def _hash_matrix(texts: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(text_hash(t) for t in texts), dtype=np.uint8).reshape(-1, 16)


def _open_or_create(out: Path, fp: str, dim: int, meta: dict[str, Any]) -> VectorStore:
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


def _progress_bar(show: bool, total: int, initial: int = 0, desc: str = "capture") -> tqdm | None:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="text", smoothing=0.05)


def capture(teacher: str | Path, corpus: Corpus, out: str | Path, *, prompt: str | None = None,
            normalize: bool = False, shard_size: int = 65536, batch_tokens: int | None = None,
            device: str | None = None, dtype: DType | str | None = None, show_progress: bool = True,
            model: SentenceTransformer | None = None, compile: bool | None = None) -> VectorStore:
    """Embed `corpus` with the teacher into a vector store at `out` (resuming one that is there).

    ``compile``: torch.compile the teacher's packed forward; None (auto) compiles on CUDA when there are at
    least `AUTO_COMPILE_TEXTS` texts (2M), where the ~25 s of a cold compilation pays for itself.

    Under `torchrun` (WORLD_SIZE > 1) the shards are split over the ranks; see `_capture_distributed`.
    """
    out = Path(out)
    distributed.init_from_env(device)
    teacher_path = resolve_model(teacher)
    fp = fingerprint(teacher_path, prompt=prompt, normalize=normalize)
    dev = pick_device(device)
    if model is None:
        model = load_model(teacher_path, device=str(dev))
        if dev.type == "cuda":
            model.to(torch.bfloat16)  # a capture-only copy: half-precision weights, no autocast overhead
    dim = embedding_dimension(model)
    if not dim:
        raise LeafkdError(f"{teacher_path}: the model does not state its embedding dimension")
    meta = {"teacher": str(teacher_path), "prompt": prompt, "normalize": normalize,
            "max_seq_length": max_seq_length(model), "truncated": 0}
    if compile is None:
        compile = dev.type == "cuda" and len(corpus.texts) >= AUTO_COMPILE_TEXTS
    embed = _ShardEncoder(model, prompt, normalize, batch_tokens, dev, dtype, compile)
    if distributed.world_size() > 1:
        return _capture_distributed(embed, corpus, out, fp, dim, meta, shard_size=shard_size,
                                    show_progress=show_progress)
    store = _open_or_create(out, fp, dim, meta)
    todo = _remaining(store, corpus.texts)
    if not todo:
        store.update(complete=True)
        return store
    if store.count:
        logger.info("%s: resuming a capture of %d texts; %d left to embed", out, len(corpus.texts), len(todo))
    bar = _progress_bar(show_progress, len(corpus.texts), initial=len(corpus.texts) - len(todo))
    truncated = int(store.manifest.get("truncated", 0))
    pending = (out / PENDING).is_dir()  # a killed distributed run left finished shards: adopt them, embed the rest
    try:
        pos = 0
        while pos < len(todo):
            k = len(store.manifest["shards"])
            rec = _adoptable(out, k, todo[pos : pos + shard_size]) if pending else None
            if rec is not None:
                truncated += int(rec["truncated"])
                store.add_shards([rec["entry"]], truncated=truncated)
                if bar is not None:
                    bar.update(len(todo[pos : pos + shard_size]))
                pos += shard_size
                continue
            end = pos + shard_size  # the run of shards up to the next adoptable one goes through one pipeline
            while end < len(todo) and not (pending and _adoptable(out, k + (end - pos) // shard_size,
                                                                  todo[end : end + shard_size])):
                end += shard_size
            truncated += _embed_run(embed, store, todo[pos:end], dim, shard_size, bar)
            store.update(truncated=truncated)
            pos = end
    finally:
        if bar is not None:
            bar.close()
    store.update(truncated=truncated, complete=True)
    return store


def _embed_run(embed: _ShardEncoder, store: VectorStore, texts: list[str], dim: int, shard_size: int,
               bar: tqdm | None) -> int:
    """Embed consecutive shards through one pipeline, each batched as if alone (resuming recomputes a shard bit
    for bit), committing them in order from a background writer; the number of truncated texts."""
    vecs = np.empty((len(texts), dim), dtype=np.float16)
    writer = _ShardWriter(store, texts, vecs, shard_size)
    try:
        _, n_trunc = embed(texts, bar.update if bar is not None else None, writer.rows_done, out=vecs,
                           segment=shard_size)
    finally:
        writer.close()
    return int(n_trunc)


def _adoptable(out: Path, k: int, texts: list[str]) -> dict[str, Any] | None:
    """The record of shard k left by a killed distributed capture if it holds exactly these texts; a stale
    record is removed (shard k gets rewritten)."""
    rec = _pending(out, k, _chunk_digest(_hash_matrix(texts)))
    if rec is None:
        (out / PENDING / f"shard-{k:05d}.json").unlink(missing_ok=True)
    return rec


# -- distributed capture -------------------------------------------------------------------------------------
def _chunk_digest(hashes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(hashes).tobytes()).hexdigest()


def _pending(out: Path, k: int, digest: str) -> dict[str, Any] | None:
    """The completion record of shard k if a rank finished exactly this chunk of texts (files present)."""
    path = out / PENDING / f"shard-{k:05d}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files = [out / rec["entry"][key] for key in ("vectors", "texts", "hashes")]
    if rec.get("digest") != digest or not all(f.exists() for f in files):
        return None
    return rec


def _capture_distributed(embed: _ShardEncoder, corpus: Corpus, out: Path, fp: str, dim: int, meta: dict[str, Any], *,
                         shard_size: int, show_progress: bool) -> VectorStore:
    """Capture with every torchrun rank: the same shards as one process, shard k embedded by rank k % world.

    All ranks cut the remaining texts into the same `shard_size` chunks (corpus order minus stored hashes).
    A rank writes each of its shards' files under their final names, then a record in OUT/.pending/ (its
    progress: a killed run, restarted with any number of ranks, skips every recorded shard). When all ranks
    are done, rank 0 lists the new shards in shard order with one atomic manifest write, so the store is the
    one a single process writes (same texts order; same vectors where the math is deterministic).
    """
    world, r = distributed.world_size(), distributed.rank()
    if r == 0:
        store = _open_or_create(out, fp, dim, meta)
    distributed.barrier()
    if r != 0:
        store = _open_or_create(out, fp, dim, meta)
    todo = _remaining(store, corpus.texts)
    k0 = len(store.manifest["shards"])
    starts = list(range(0, len(todo), shard_size))
    mine = [(k0 + j, start) for j, start in enumerate(starts) if (k0 + j) % world == r]
    bar = _progress_bar(show_progress and r == 0, sum(len(todo[s : s + shard_size]) for _, s in mine),
                        desc=f"capture (rank 0 of {world})")
    try:
        for k, start in mine:
            texts = todo[start : start + shard_size]
            hashes = _hash_matrix(texts)
            digest = _chunk_digest(hashes)
            if _pending(out, k, digest) is not None:
                if bar is not None:
                    bar.update(len(texts))
                continue
            vecs, n_trunc = embed(texts, bar.update if bar is not None else None)
            _check_finite(vecs)
            entry = store.write_shard(k, vecs, texts, hashes)
            atomic.write_json(out / PENDING / f"shard-{k:05d}.json",
                              {"entry": entry, "digest": digest, "truncated": int(n_trunc), "rank": r})
    finally:
        if bar is not None:
            bar.close()
    distributed.barrier()
    if r == 0:
        entries, truncated = [], int(store.manifest.get("truncated", 0))
        for j, start in enumerate(starts):
            rec = _pending(out, k0 + j, _chunk_digest(_hash_matrix(todo[start : start + shard_size])))
            if rec is None:
                raise LeafkdError(f"{out}: shard {k0 + j} is missing after all ranks finished")
            entries.append(rec["entry"])
            truncated += int(rec["truncated"])
        store.add_shards(entries, truncated=truncated, complete=True)
        shutil.rmtree(out / PENDING, ignore_errors=True)
    distributed.barrier()
    return VectorStore.open(out)


# -- black-box teachers --------------------------------------------------------------------------------------
def capture_blackbox(corpus_texts: list[str], vectors_path: str | Path, out: str | Path, *,
                     normalize: bool = False, shard_size: int = 65536) -> VectorStore:
    """Store precomputed teacher vectors (a black-box teacher): row i of the .npy embeds text i.

    Under torchrun rank 0 writes the store (no model runs: it is I/O) while the others wait, then open it.
    """
    if distributed.world_size() == 1:
        return _store_blackbox(corpus_texts, vectors_path, out, normalize=normalize, shard_size=shard_size)
    store = None
    if distributed.is_main():
        store = _store_blackbox(corpus_texts, vectors_path, out, normalize=normalize, shard_size=shard_size)
    distributed.barrier()
    return store if store is not None else VectorStore.open(out)


def _store_blackbox(corpus_texts: list[str], vectors_path: str | Path, out: str | Path, *,
                    normalize: bool = False, shard_size: int = 65536) -> VectorStore:
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
            block = l2_normalize(block, copy=False)
        texts = [corpus_texts[i] for i in idx]
        store.append(block.astype(np.float16), texts, _hash_matrix(texts))
    store.update(complete=True)
    return store


def check_store_for_teacher(store: VectorStore, teacher: str | Path, prompt: str | None = None,
                            normalize: bool = False, dim: int | None = None) -> None:
    """Refuse stored vectors that another teacher (or another prompt/normalisation) produced."""
    fp = fingerprint(resolve_model(teacher), prompt=prompt, normalize=normalize)
    if store.fingerprint != fp:
        raise LeafkdError(f"{store.path}: vectors from teacher {store.fingerprint[:12]}, "
                          f"but the teacher given is {fp[:12]}")
    if dim is not None and store.dim != dim:
        raise LeafkdError(f"{store.path}: vectors are {store.dim}-d, the teacher emits {dim}-d")
