"""Training data: the corpus, its teacher vectors (captured, stored or black-box), the held-out split and the bank."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leafkd.capture.store import VectorStore
from leafkd.capture.teacher import capture, capture_blackbox, check_store_for_teacher
from leafkd.data.sources import load_corpus, text_hash
from leafkd.errors import LeafkdError
from leafkd.training.config import TrainConfig
from leafkd.training.corpus import bank_sources, training_corpus

logger = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The run's texts and teacher vectors, their weights and the held-out split."""

    texts: list[str]
    teacher: np.ndarray  # float16 [n, D], row-aligned with texts
    weights: np.ndarray  # expected visits per epoch
    train_idx: np.ndarray
    heldout_idx: np.ndarray
    fingerprint: str
    teacher_meta: dict
    bank_texts: list[str] | None = None  # the texts the bank loss names (--bank-data, --bank-from-adapt)
    capture_seconds: float = 0.0  # the teacher's capture (or the black-box import) of this run


def prepare_data(cfg: TrainConfig, out: Path) -> TrainData:
    """Read the corpus, get its teacher vectors (captured into the store, or black-box) and split off the held-out
    texts; a store given without data is trained on as it is."""
    corpus = training_corpus(cfg)
    banked = bank_sources(cfg)
    bank_texts = load_corpus(banked, None, cfg.seed).texts if cfg.bank > 0 and banked else None
    if bank_texts is not None and corpus is not None:  # fail before the capture, not after it
        check_bank_texts(bank_texts, set(corpus.texts))
    store_path = Path(cfg.vectors) if cfg.vectors else out / "teacher-vectors"
    started = time.perf_counter()
    if cfg.teacher_vectors:
        if corpus is None:
            raise LeafkdError("--teacher-vectors needs --data: the texts the vectors embed")
        if cfg.max_texts is not None:
            raise LeafkdError("--max-texts cannot be combined with --teacher-vectors (rows must match the texts)")
        store = capture_blackbox(corpus.texts, cfg.teacher_vectors, store_path)
    elif corpus is not None and cfg.teacher is not None:
        logger.info(f"capturing teacher vectors into {store_path}")
        store = capture(cfg.teacher, corpus, store_path, prompt=None, batch_tokens=cfg.capture_batch_tokens,
                        device=cfg.device, show_progress=cfg.progress)
    else:
        store = VectorStore.open(store_path)
        if cfg.teacher is not None:
            check_store_for_teacher(store, cfg.teacher)
    capture_seconds = time.perf_counter() - started
    texts = store.texts()
    vectors = np.asarray(store.vectors())
    if corpus is not None:
        # Train on exactly the corpus's texts (a shared store may hold more), with the corpus's weights.
        position = {t: i for i, t in enumerate(texts)}
        missing = [t for t in corpus.texts if t not in position]
        if missing:
            raise LeafkdError(f"{store.path}: {len(missing)} texts of the data have no stored teacher vector")
        rows = np.fromiter((position[t] for t in corpus.texts), dtype=np.int64, count=len(corpus))
        texts, vectors, weights = corpus.texts, vectors[rows], corpus.weights
    else:
        weights = np.ones(len(texts))
    if not np.isfinite(vectors.astype(np.float32)).all():
        raise LeafkdError(f"{store.path}: stored vectors contain NaN or inf")
    n = len(texts)
    if n < cfg.heldout + 10:
        raise LeafkdError(f"{n} texts is too few for {cfg.heldout} held out; lower --heldout or add data")
    # Held-out texts are chosen by content hash, so the split does not depend on file order.
    keys = np.array([int.from_bytes(text_hash(f"{cfg.seed}:{t}")[:8], "little") for t in texts], dtype=np.uint64)
    order = np.argsort(keys, kind="stable")
    heldout_idx = np.sort(order[: cfg.heldout])
    train_idx = np.sort(order[cfg.heldout :])
    return TrainData(texts, vectors, weights, train_idx, heldout_idx, store.fingerprint, dict(store.manifest),
                     bank_texts, capture_seconds)


def check_bank_texts(bank_texts: list[str], known) -> None:
    missing = sum(t not in known for t in bank_texts)
    if missing:
        raise LeafkdError(f"--bank-data: {missing} of its {len(bank_texts)} texts are not training data (add its "
                          "sources to --data: their teacher vectors come from the store)")


def bank_rows(cfg: TrainConfig, data: TrainData) -> np.ndarray:
    """Rows of `data` whose teacher vectors form the bank: the texts of --bank-data, or the training texts; a seeded
    sample of `bank_size` of them when there are more. Held-out texts never enter it (their teacher vectors would
    leak into the alignment metrics)."""
    rng = np.random.default_rng([cfg.seed, 7])
    if data.bank_texts is None:
        train_rows = np.asarray(data.train_idx)
        return np.sort(rng.choice(train_rows, size=min(cfg.bank_size, len(train_rows)), replace=False))
    position = {t: i for i, t in enumerate(data.texts)}
    check_bank_texts(data.bank_texts, position)  # a store given without --data: checked against its texts here
    rows = np.fromiter((position[t] for t in data.bank_texts), dtype=np.int64, count=len(data.bank_texts))
    rows = np.setdiff1d(rows, data.heldout_idx)
    if len(rows) < 2:
        raise LeafkdError("--bank-data: fewer than 2 of its texts are left for the bank outside the held-out set")
    if len(rows) > cfg.bank_size:
        rows = np.sort(rng.choice(rows, size=cfg.bank_size, replace=False))
    return rows


