"""Training a student into the teacher's space (`train-embedder`).

One run: read the corpus, capture the teacher's vectors (or open a store / black-box vectors), hold out a
deterministic set of texts, build the student and warm-start its projection with ridge regression (step 0
is the linear-map baseline), then minimise the configured losses with AdamW, warm-up and cosine decay.
Checkpoints are whole-state (model, optimiser, schedule, data position, RNG) and written atomically, so a
killed run resumes where it stopped and reaches the same weights as an uninterrupted one.

Speed (the GPU path): texts are tokenised once; batches are packed (no padding: texts concatenated, attention
per text, see leafkd.packed) by a background thread into pinned memory, so they can be drawn at random like a
naive loop's; teacher vectors live on the device and are gathered by index;
bf16 autocast and fused AdamW on CUDA; the packed forward under `torch.compile` on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leafkd import atomic
from leafkd import distributed as dist_
from leafkd.alignment import alignment
from leafkd.capture import capture, capture_blackbox, check_store_for_teacher, pick_device
from leafkd.data import Corpus, load_corpus, text_hash
from leafkd.encode import Tokenized, _prefetch, encode_tokens, pad_batch, tokenize
from leafkd.errors import LeafkdError
from leafkd.graphs import GraphedTrainStep, bucket_tokens, fixed_width
from leafkd.losses import BankRelationalLoss, CombinedLoss, CosineLoss, LeafL2Loss, LELPHead, LELPLoss, MSELoss, RelationalLoss
from leafkd.models import resolve_model
from leafkd.packed import PackedForward, pack, supported as packed_supported, unsupported_reason
from leafkd.store import VectorStore
from leafkd.student import build_student, warm_start


def _opt(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every option of `train-embedder`; a TOML file sets any of them, the command line overrides."""

    teacher: str | None = _opt(None, "teacher model folder or installed name (omit with --teacher-vectors)")
    data: list[str] = _opt([], "text sources PATH[#COLUMN][*WEIGHT]: .txt, .jsonl, .tsv or a BEIR folder (repeatable)")
    vectors: str | None = _opt(None, "teacher-vector store folder (default: OUTPUT/teacher-vectors; captured if missing)")
    teacher_vectors: str | None = _opt(None, "black-box teacher: .npy of vectors, row i for text i of --data")
    student: str = _opt("all-MiniLM-L6-v2", "student base encoder: model folder or installed name")
    student_layers: int | None = _opt(None, "keep only the first N layers of the student base")
    projection: str = _opt("auto", "Dense projection to the teacher's dim: auto (when dims differ), always, none")
    normalize: str = _opt("auto", "end the student with Normalize: auto (as the teacher), true, false")
    query_prompt: str | None = _opt(None, "query prompt stored with the student (default: the teacher's 'query' prompt)")
    max_seq_length: int | None = _opt(None, "student max tokens per text (default: the base's)")
    output: str = _opt("runs/student", "run folder: checkpoints, metrics.jsonl, curves.png and model/")
    max_texts: int | None = _opt(None, "use a seeded sample of this many unique texts")
    heldout: int = _opt(2000, "texts held out for alignment metrics (never trained on)")
    epochs: float = _opt(1.0, "passes over the training texts (fractions allowed)")
    max_steps: int | None = _opt(None, "stop after this many optimiser steps (overrides epochs)")
    batch_size: int = _opt(128, "texts per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimiser step")
    lr: float = _opt(2e-4, "peak learning rate of the encoder")
    projection_lr: float = _opt(1e-3, "peak learning rate of the projection layer")
    warmup: float = _opt(0.05, "warm-up fraction of the steps")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    clip: float = _opt(1.0, "gradient norm clip (0: off)")
    dropout: float = _opt(0.0, "dropout inside the student (0 makes training deterministic)")
    leaf_l2: float = _opt(1.0, "weight of LEAF's squared-L2 loss")
    mse: float = _opt(0.0, "weight of the per-dimension MSE loss")
    cosine: float = _opt(0.0, "weight of the 1 - cosine loss")
    lelp: float = _opt(0.0, "weight of the LELP pseudo-subclass projection loss")
    lelp_classes: int = _opt(32, "LELP pseudo-classes (k-means on teacher vectors)")
    lelp_subclasses: int = _opt(8, "LELP principal directions (pseudo-subclasses) per class")
    lelp_temperature: float = _opt(0.05, "LELP softmax temperature")
    relational: float = _opt(0.0, "weight of the in-batch relational KL loss")
    relational_temperature: float = _opt(0.05, "relational softmax temperature")
    bank: float = _opt(0.0, "weight of the relational KL loss against a fixed bank of teacher vectors: the student "
                       "should rank the bank as the teacher does (for asymmetric retrieval, the index's documents)")
    bank_data: list[str] = _opt([], "sources (as --data, repeatable) whose texts' teacher vectors form the bank; each "
                                "text must be training data too (default: a sample of the training texts)")
    bank_size: int = _opt(65536, "at most this many bank vectors (a seeded sample beyond it; without --bank-data, "
                          "sampled from the training texts): the loss scores every batch text against all of them")
    bank_temperature: float = _opt(0.05, "bank relational softmax temperature")
    ridge_alpha: float = _opt(1e-2, "relative ridge penalty of the projection warm start")
    ridge_samples: int = _opt(20000, "texts used to fit the ridge warm start")
    select: str = _opt("none", "teacher-guided data selection: none, subset (train on a chosen subset) or reweight "
                       "(sample texts by student-teacher gap); see docs/selection.md")
    select_fraction: float = _opt(0.5, "subset: fraction of the training pool (after drops) to keep")
    select_size: int | None = _opt(None, "subset: number of texts to keep (overrides --select-fraction)")
    select_temperature: float = _opt(1.0, "difficulty preference (gap / mean gap) ** (1/T); large T is uniform")
    select_diversity: float = _opt(0.5, "cluster balance: share of cluster c scales with n_c ** -D (0: none, 1: equal-size clusters)")
    select_max_weight: float = _opt(4.0, "reweight: clip each text's weight factor to [1/M, M]")
    select_clusters: int = _opt(256, "k-means clusters of teacher vectors for diversity and dedup")
    select_refresh_every: int = _opt(0, "re-score and re-select every N steps, applied from the next epoch (0: once after the warm start)")
    select_score_texts: int = _opt(50000, "score a seeded sample of at most N pool texts per round (0: all); others get their cluster's mean")
    dedup_threshold: float = _opt(0.98, "selection drops near-duplicates with teacher cosine >= this (1.0: off)")
    drop_degenerate: bool = _opt(True, "drop training texts that are empty after tokenisation or have zero-norm/outlier teacher vectors")
    eval_every: int = _opt(200, "held-out evaluation every N steps (0: only at the start and end)")
    log_every: int = _opt(20, "training log line every N steps")
    checkpoint_every: int = _opt(500, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk")
    resume: bool = _opt(True, "resume from the latest checkpoint in OUTPUT")
    seed: int = _opt(0, "seed for sampling, held-out split and initialisation")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    precision: str = _opt("auto", "bf16 autocast on CUDA, fp32 on CPU (auto), or force bf16/fp32")
    compile: str = _opt("auto", "torch.compile the student's forward: auto (packed training on CUDA, where it fuses "
                        "the small kernels: ~9x the eager step rate on an H100), true, false")
    packed: str = _opt("auto", "unpadded batches: each batch's texts concatenated, attention per text, batches drawn at "
                       "random instead of grouped by length (auto: when the student is BERT/MPNet with mean pooling; "
                       "true; false: padded, length-grouped batches)")
    cuda_graphs: str = _opt("auto", "replay each packed training step as a CUDA graph (one per token bucket): auto (packed "
                            "training with flash attention on one CUDA device, grad_accum 1), true, false")
    capture_batch_tokens: int | None = _opt(None, "token budget per teacher batch when capturing")
    plot: bool = _opt(True, "write curves.png")
    progress: bool = _opt(True, "show progress bars")

    # Options that do not change the result: a resumed run may change them.
    RESUME_FREE = ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "resume", "plot", "progress",
                   "device", "max_steps", "epochs", "compile", "cuda_graphs")

    # Selection options (issue 8) enter the key only where they change the run: off their defaults, and the
    # select_* ones only when selection is on (so keys of runs from before selection existed are unchanged).
    SELECTION = ("select", "select_fraction", "select_size", "select_temperature", "select_diversity",
                 "select_max_weight", "select_clusters", "select_refresh_every", "select_score_texts",
                 "dedup_threshold", "drop_degenerate")

    # Bank loss options enter the key only when the loss is on (keys of runs from before it existed are unchanged).
    BANK = ("bank", "bank_data", "bank_size", "bank_temperature")

    def result_key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in self.RESUME_FREE}
        defaults = {f.name: f.default for f in fields(self) if f.name in self.SELECTION}
        for k in self.SELECTION:
            if d[k] == defaults[k] or (self.select == "none" and k != "drop_degenerate"):
                del d[k]
        if self.bank == 0:
            for k in self.BANK:
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a TOML file (top level or a [train] table) with keyword overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        import tomllib

        path = Path(path)
        if not path.exists():
            raise LeafkdError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise LeafkdError(f"{path}: malformed TOML ({e})") from None
        values.update(raw.get("train", raw))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LeafkdError(f"unknown option(s) {', '.join(unknown)} in {path or 'overrides'}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.teacher is None and cfg.teacher_vectors is None and cfg.vectors is None:
        raise LeafkdError("give a teacher (--teacher), a vector store (--vectors) or black-box vectors (--teacher-vectors)")
    if not cfg.data and cfg.vectors is None:
        raise LeafkdError("no training data: give --data (or --vectors of an existing store)")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise LeafkdError(f"{name} must be >= 1")
    if cfg.lr <= 0 or cfg.projection_lr <= 0:
        raise LeafkdError("learning rates must be > 0")
    if cfg.heldout < 10:
        raise LeafkdError("heldout must be >= 10")
    if cfg.projection not in ("auto", "always", "none"):
        raise LeafkdError(f"projection must be auto, always or none, not {cfg.projection!r}")
    if str(cfg.normalize).lower() not in ("auto", "true", "false"):
        raise LeafkdError(f"normalize must be auto, true or false, not {cfg.normalize!r}")
    weights = [cfg.leaf_l2, cfg.mse, cfg.cosine, cfg.lelp, cfg.relational, cfg.bank]
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise LeafkdError("loss weights must be >= 0 with at least one > 0")
    from leafkd.selection import SELECT_MODES

    if cfg.select not in SELECT_MODES:
        raise LeafkdError(f"select must be one of {', '.join(SELECT_MODES)}, not {cfg.select!r}")
    if not 0 < cfg.select_fraction <= 1 or (cfg.select_size is not None and cfg.select_size < 1):
        raise LeafkdError("select_fraction must be in (0, 1] and select_size >= 1")
    if cfg.select_temperature <= 0 or cfg.select_max_weight < 1 or cfg.select_diversity < 0:
        raise LeafkdError("select_temperature must be > 0, select_max_weight >= 1, select_diversity >= 0")
    if cfg.select_clusters < 1 or cfg.select_refresh_every < 0 or cfg.select_score_texts < 0:
        raise LeafkdError("select_clusters must be >= 1, select_refresh_every and select_score_texts >= 0")
    if str(cfg.compile).lower() not in ("auto", "true", "false"):
        raise LeafkdError(f"compile must be auto, true or false, not {cfg.compile!r}")
    if str(cfg.cuda_graphs).lower() not in ("auto", "true", "false"):
        raise LeafkdError(f"cuda_graphs must be auto, true or false, not {cfg.cuda_graphs!r}")
    if str(cfg.packed).lower() not in ("auto", "true", "false"):
        raise LeafkdError(f"packed must be auto, true or false, not {cfg.packed!r}")
    if cfg.bank > 0 and (cfg.bank_size < 2 or cfg.bank_temperature <= 0):
        raise LeafkdError("bank_size must be >= 2 and bank_temperature > 0")
    if cfg.bank_data and cfg.bank == 0:
        raise LeafkdError("--bank-data is set but the bank loss is off: give it a weight with --bank")
    if not 0 < cfg.dedup_threshold <= 1:
        raise LeafkdError("dedup_threshold must be in (0, 1] (1: no dedup)")


# -- data ------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    texts: list[str]
    teacher: np.ndarray  # float16 [n, D], row-aligned with texts
    weights: np.ndarray  # expected visits per epoch
    train_idx: np.ndarray
    heldout_idx: np.ndarray
    fingerprint: str
    teacher_meta: dict
    bank_texts: list[str] | None = None  # the texts of --bank-data, when the bank loss names them


def prepare_data(cfg: TrainConfig, out: Path, log) -> TrainData:
    corpus: Corpus | None = load_corpus(cfg.data, cfg.max_texts, cfg.seed) if cfg.data else None
    bank_texts = load_corpus(cfg.bank_data, None, cfg.seed).texts if cfg.bank > 0 and cfg.bank_data else None
    if bank_texts is not None and corpus is not None:  # fail before the capture, not after it
        _check_bank_texts(bank_texts, set(corpus.texts))
    store_path = Path(cfg.vectors) if cfg.vectors else out / "teacher-vectors"
    if cfg.teacher_vectors:
        if corpus is None:
            raise LeafkdError("--teacher-vectors needs --data: the texts the vectors embed")
        if cfg.max_texts is not None:
            raise LeafkdError("--max-texts cannot be combined with --teacher-vectors (rows must match the texts)")
        store = capture_blackbox(corpus.texts, cfg.teacher_vectors, store_path)
    elif corpus is not None and cfg.teacher is not None:
        log(f"capturing teacher vectors into {store_path}")
        store = capture(cfg.teacher, corpus, store_path, prompt=None, batch_tokens=cfg.capture_batch_tokens,
                        device=cfg.device, show_progress=cfg.progress)
    else:
        store = VectorStore.open(store_path)
        if cfg.teacher is not None:
            check_store_for_teacher(store, cfg.teacher)
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
    return TrainData(texts, vectors, weights, train_idx, heldout_idx, store.fingerprint, dict(store.manifest), bank_texts)


def _check_bank_texts(bank_texts: list[str], known) -> None:
    missing = sum(t not in known for t in bank_texts)
    if missing:
        raise LeafkdError(f"--bank-data: {missing} of its {len(bank_texts)} texts are not training data (add its sources "
                          f"to --data: their teacher vectors come from the store)")


class LengthGroupedBatches:
    """Per-epoch batches: weighted, shuffled, then (with `group`) grouped by length within windows of 16 batches.

    Packed training (no padding) takes the batches as drawn; padded training groups them to pad less.

    Epoch e is a pure function of (seed, e), so a resumed run rebuilds it and skips what it had done.
    """

    def __init__(self, indices: np.ndarray, weights: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int,
                 group: bool = True):
        self.indices, self.weights, self.lengths = indices, weights, lengths
        self.batch_size, self.seed, self.group = batch_size, seed, group

    def epoch(self, e: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, e])
        w = self.weights[self.indices]
        copies = np.floor(w).astype(np.int64) + (rng.random(len(w)) < (w - np.floor(w)))
        items = np.repeat(self.indices, copies)
        rng.shuffle(items)
        if not self.group:
            return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        # Sorting within a window of 16 batches keeps padding low while batches still mix lengths across
        # windows; wider windows pad less but make each batch more uniform in length.
        window = self.batch_size * 16
        batches = []
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def expected_batches(self) -> int:
        total = float(self.weights[self.indices].sum())
        return max(1, math.ceil(total / self.batch_size))


# -- model -----------------------------------------------------------------------------------------------
def _set_dropout(model: torch.nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def bank_rows(cfg: TrainConfig, data: TrainData) -> np.ndarray:
    """Rows of `data` whose teacher vectors form the bank: the texts of --bank-data, or the training texts; a seeded
    sample of `bank_size` of them when there are more. Held-out texts never enter it (their teacher vectors would
    leak into the alignment metrics)."""
    rng = np.random.default_rng([cfg.seed, 7])
    if data.bank_texts is None:
        train_rows = np.asarray(data.train_idx)
        return np.sort(rng.choice(train_rows, size=min(cfg.bank_size, len(train_rows)), replace=False))
    position = {t: i for i, t in enumerate(data.texts)}
    _check_bank_texts(data.bank_texts, position)  # a store given without --data: checked against its texts here
    rows = np.fromiter((position[t] for t in data.bank_texts), dtype=np.int64, count=len(data.bank_texts))
    rows = np.setdiff1d(rows, data.heldout_idx)
    if len(rows) < 2:
        raise LeafkdError("--bank-data: fewer than 2 of its texts are left for the bank outside the held-out set")
    if len(rows) > cfg.bank_size:
        rows = np.sort(rng.choice(rows, size=cfg.bank_size, replace=False))
    return rows


def make_loss(cfg: TrainConfig, teacher_sample: np.ndarray, bank: np.ndarray | None = None) -> CombinedLoss:
    parts: dict[str, tuple[float, torch.nn.Module]] = {}
    if cfg.leaf_l2 > 0:
        parts["leaf_l2"] = (cfg.leaf_l2, LeafL2Loss())
    if cfg.mse > 0:
        parts["mse"] = (cfg.mse, MSELoss())
    if cfg.cosine > 0:
        parts["cosine"] = (cfg.cosine, CosineLoss())
    if cfg.lelp > 0:
        head = LELPHead.fit(teacher_sample, cfg.lelp_classes, cfg.lelp_subclasses, seed=cfg.seed)
        parts["lelp"] = (cfg.lelp, LELPLoss(head, cfg.lelp_temperature))
    if cfg.relational > 0:
        parts["relational"] = (cfg.relational, RelationalLoss(cfg.relational_temperature))
    if cfg.bank > 0:
        if bank is None:
            raise ValueError("the bank loss needs its bank of teacher vectors")
        parts["bank"] = (cfg.bank, BankRelationalLoss(bank, cfg.bank_temperature))
    return CombinedLoss(parts)


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    proj, enc_decay, enc_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "linear" in name and not name.startswith("0."):
            proj.append(p)
        elif p.ndim < 2:
            enc_no_decay.append(p)
        else:
            enc_decay.append(p)
    return [
        {"params": enc_decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": enc_no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": proj, "lr": cfg.projection_lr, "weight_decay": 0.0},
    ]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _graphs_unsupported(cfg: TrainConfig, device: torch.device, world: int, packed: bool = True, forward=None,
                        autocast: torch.dtype | None = None) -> str | None:
    """None when the training step can be replayed as CUDA graphs; otherwise why not (one line). Without
    `forward` only what the config and device decide is checked (before any work)."""
    if not packed or str(cfg.packed).lower() == "false":
        return "needs packed training"
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    if world > 1:
        return "one process only (DDP's gradient hooks are not captured)"
    if cfg.grad_accum != 1:
        return "needs grad_accum 1"
    if cfg.dropout > 0:
        return "needs dropout 0"
    if forward is None:
        return None
    inner = getattr(forward, "_orig_mod", forward)
    if autocast is None or inner._attention_kind(torch.empty(1, device=device, dtype=autocast)) != "varlen":
        return "needs flash attention over packed texts (BERT-style student, bf16/fp16)"
    return None


# -- checkpoints -------------------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.pt").exists()),
                  key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, state: dict, keep: int) -> None:
    if not dist_.is_main():  # distributed: rank 0 writes (the state is the same on every rank)
        return
    target = out / "checkpoints" / f"step-{state['step']:08d}"
    with atomic.atomic_dir(target) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in _checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- the run ---------------------------------------------------------------------------------------------
class MetricsLog:
    """Append-only JSONL of training and evaluation records (truncated to the resumed step on resume)."""

    def __init__(self, path: Path, resume_step: int | None, readonly: bool = False):
        self.path = path
        self.readonly = readonly  # distributed ranks other than 0 keep the records in memory only
        self.records: list[dict] = []
        if path.exists() and resume_step is not None:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        if not readonly:
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.readonly:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    if evals:
        steps = [r["step"] for r in evals]
        axes[1].plot(steps, [r["heldout_cos_mean"] for r in evals], marker="o", label="mean cosine")
        axes[1].plot(steps, [r["heldout_cos_p5"] for r in evals], marker=".", label="5th pct cosine")
        axes[1].plot(steps, [r["top10_agreement"] for r in evals], marker="x", label="top-10 agreement")
        axes[1].legend(loc="lower right")
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out alignment to the teacher")
    fig.tight_layout()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if cfg.precision in ("auto", "bf16"):
        return torch.bfloat16
    raise LeafkdError(f"precision must be auto, bf16 or fp32, not {cfg.precision!r}")


def evaluate_student(model, tokens: Tokenized, teacher: np.ndarray, device: torch.device) -> dict[str, float]:
    if dist_.world_size() > 1:
        # Distributed: each rank embeds a contiguous slice of the held-out texts; the slices are gathered on
        # every rank (no rank idles while another evaluates) and the metrics computed on the whole set.
        lo, hi = dist_.split_range(len(tokens))
        vecs = dist_.gather_rows(encode_tokens(model, tokens.take(np.arange(lo, hi)), device=device))
        return alignment(vecs, teacher.astype(np.float32))
    vecs = encode_tokens(model, tokens, device=device)
    return alignment(vecs, teacher.astype(np.float32))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns the final held-out metrics and the model folder.

    Under `torchrun` (WORLD_SIZE > 1): DistributedDataParallel, each rank takes a contiguous slice of every
    global batch (see leafkd.distributed.local_batch); rank 0 logs, checkpoints and saves the model.
    """
    validate(cfg)
    dist_.init_from_env(cfg.device)
    world, is_main = dist_.world_size(), dist_.is_main()
    if not is_main:
        log = lambda *a, **k: None  # noqa: E731
    device = pick_device(cfg.device)
    if str(cfg.cuda_graphs).lower() == "true":  # fail before any work (the student-dependent check comes later)
        why_not = _graphs_unsupported(cfg, device, world)
        if why_not is not None:
            raise LeafkdError(f"--cuda-graphs true: {why_not}")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    data = prepare_data(cfg, out, log)
    teacher_dim = data.teacher.shape[1]

    normalize = str(cfg.normalize).lower()
    teacher_model_meta: dict[str, Any] = {"teacher": data.teacher_meta.get("teacher")}
    query_prompt = cfg.query_prompt
    teacher_normalizes = None
    if cfg.teacher is not None:
        teacher_path = resolve_model(cfg.teacher)
        teacher_cfg_modules = json.loads((teacher_path / "modules.json").read_text()) if (teacher_path / "modules.json").exists() else []
        teacher_normalizes = any(m.get("type", "").endswith("Normalize") for m in teacher_cfg_modules)
        if query_prompt is None:
            st_cfg = teacher_path / "config_sentence_transformers.json"
            prompts = json.loads(st_cfg.read_text()).get("prompts", {}) if st_cfg.exists() else {}
            query_prompt = prompts.get("query") or None
        teacher_model_meta["teacher"] = str(teacher_path)
    if normalize == "auto":
        if teacher_normalizes is None:
            norms = np.linalg.norm(data.teacher[:1000].astype(np.float32), axis=1)
            teacher_normalizes = bool(np.allclose(norms, 1.0, atol=1e-2))
        use_norm = teacher_normalizes
    else:
        use_norm = normalize == "true"

    student = build_student(cfg.student, teacher_dim, layers=cfg.student_layers, normalize=use_norm,
                            projection=cfg.projection, max_seq_length=cfg.max_seq_length)
    if query_prompt:
        student.prompts = {**student.prompts, "query": query_prompt}
    _set_dropout(student, cfg.dropout)
    tokens, truncated = tokenize(student, data.texts)
    lengths = tokens.lengths
    heldout_tokens = tokens.take(data.heldout_idx)
    heldout_teacher = data.teacher[data.heldout_idx]
    log(f"{len(data.texts)} texts ({len(data.train_idx)} train, {len(data.heldout_idx)} held out), "
        f"teacher dim {teacher_dim}, {truncated} texts truncated to {student.max_seq_length} tokens")

    selector = None
    if cfg.select != "none" or cfg.drop_degenerate:
        from leafkd.selection import Selector

        # Teacher-only part of the selection (drops, clusters, dedup); the pool replaces the training texts.
        selector = Selector(cfg, data.texts, data.teacher, data.train_idx, data.weights, lengths, out, log, device)
        data.train_idx, data.weights = selector.initial()
    packed = str(cfg.packed).lower() == "true" or (str(cfg.packed).lower() == "auto" and packed_supported(student))
    if str(cfg.packed).lower() == "true" and not packed_supported(student):
        raise LeafkdError(f"--packed true: {unsupported_reason(student)}")
    sampler = LengthGroupedBatches(data.train_idx, data.weights, lengths, cfg.batch_size, cfg.seed, group=not packed)
    micro_per_epoch = sampler.expected_batches()
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))

    rng = np.random.default_rng(cfg.seed)
    teacher_sample_idx = np.sort(rng.choice(data.train_idx, size=min(len(data.train_idx), max(cfg.ridge_samples, 1)), replace=False))
    bank = None
    if cfg.bank > 0:
        rows = bank_rows(cfg, data)
        bank = data.teacher[rows].astype(np.float32)
        log(f"bank loss: {len(rows)} teacher vectors ({'--bank-data' if cfg.bank_data else 'sample of the training texts'})")
    loss_fn = make_loss(cfg, data.teacher[teacher_sample_idx].astype(np.float32), bank)

    ckpts = _checkpoints(out) if cfg.resume else []
    state = None
    if ckpts:
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        if state["result_key"] != cfg.result_key():
            raise LeafkdError(f"{out} holds a run with other settings; use --no-resume or another --output")
        student.load_state_dict(state["model"])
        log(f"resuming from {ckpts[-1].name}")
    elif not cfg.resume and is_main and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")

    student.to(device)
    loss_fn.to(device)
    if state is None:
        # Step 0 is the ridge map: the baseline a trained student must beat.
        warm_start(student, [data.texts[i] for i in teacher_sample_idx], data.teacher[teacher_sample_idx].astype(np.float32),
                   alpha=cfg.ridge_alpha)
    if selector is not None:
        # Score the pool with the warm-started student and select (or restore the checkpoint's selection).
        if state is None:
            selector.start(student, tokens, sampler, exclude=teacher_sample_idx)  # the ridge fit's texts look easy
        else:
            selector.load_state_dict(state.get("selection"), sampler)
    student.train()
    _set_dropout(student, cfg.dropout)

    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(student, cfg), betas=(0.9, 0.999), eps=1e-8, fused=fused)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, epoch, position = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        _set_rng_state(state["rng"])
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None, readonly=not is_main)
    if state is None:
        metrics.records.clear()
        if is_main:
            atomic.write_text(out / "metrics.jsonl", "")

    teacher_dev = torch.from_numpy(np.ascontiguousarray(data.teacher)).to(device)
    autocast = _autocast_dtype(cfg, device)
    forward = PackedForward(student) if packed else student
    ddp = None
    if world > 1:
        forward = ddp = dist_.wrap_ddp(forward, device)  # after the warm start: DDP broadcasts rank 0's weights
    compile_mode = str(cfg.compile).lower()
    if compile_mode == "true" or (compile_mode == "auto" and packed and device.type == "cuda"):
        forward = torch.compile(forward, dynamic=True)
    pad_id = student.tokenizer.pad_token_id or 0
    graphed, graph_shapes = None, {}
    graphs_mode = str(cfg.cuda_graphs).lower()
    if graphs_mode != "false":
        why_not = _graphs_unsupported(cfg, device, world, packed, forward if packed else None, autocast)
        if why_not is None:
            width = fixed_width(lengths[data.train_idx])
            graph_shapes = {"bucket": bucket_tokens(float(lengths[data.train_idx].mean()) * cfg.batch_size, width),
                            "width": width, "filler_id": pad_id}
            graphed = GraphedTrainStep(forward, loss_fn, list(student.parameters()), teacher_dev, autocast)
        elif graphs_mode == "true":
            raise LeafkdError(f"--cuda-graphs true: {why_not}")

    def run_eval() -> dict:
        student.eval()
        result = evaluate_student(student, heldout_tokens, heldout_teacher, device)
        student.train()
        _set_dropout(student, cfg.dropout)
        record = {"type": "eval", "step": step, **result}
        metrics.write(record)
        log(f"step {step}: held-out cos {result['heldout_cos_mean']:.4f} (p5 {result['heldout_cos_p5']:.4f}), "
            f"top-10 agreement {result['top10_agreement']:.3f}")
        return result

    if state is None:
        baseline = run_eval()
        baseline_record = {"type": "baseline", "step": 0, "name": "ridge", **baseline}
        metrics.write(baseline_record)
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", smoothing=0.05)

    def batch_stream(start_epoch: int, start_pos: int):
        e, pos = start_epoch, start_pos
        while True:
            batches = sampler.epoch(e)
            todo = batches[pos:]

            def make(k: int, todo=todo) -> dict:
                full = todo[k]
                idx, weight = dist_.local_batch(full)  # this rank's slice of the global batch (all of it: 1 process)
                item = {"idx": torch.from_numpy(idx), "real_tokens": int(lengths[full].sum()), "n": len(full),
                        "weight": weight}
                if packed:
                    item["packed"] = pack(tokens, idx, **graph_shapes)
                else:
                    ids, mask = pad_batch(tokens, idx, pad_id)
                    item["ids"], item["mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
                if world > 1 and cfg.relational > 0:
                    item["full"] = torch.from_numpy(full)  # in-batch relations span the whole global batch
                if device.type == "cuda":
                    for key in ("idx", "ids", "mask", "packed"):
                        if key in item:
                            item[key] = item[key].pin_memory()
                return item

            for k, item in enumerate(_prefetch(make, len(todo))):
                yield e, pos + k + 1, item
            e, pos = e + 1, 0
            if selector is not None:
                selector.new_epoch(sampler)  # a refresh's selection takes effect at an epoch boundary

    stream = batch_stream(epoch, position)
    skipped = 0
    skipped_dev = torch.zeros((), device=device)
    t_last, samples_since, tokens_since = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    part_sums: dict[str, torch.Tensor] = {}
    try:
        while step < total_steps:
            factor = lr_factor(step, total_steps, cfg.warmup)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            if graphed is None:  # the graphs zero their static gradient buffers themselves
                optimizer.zero_grad(set_to_none=True)
            total = None
            for micro in range(cfg.grad_accum):
                epoch, position, item = next(stream)
                if ddp is not None:  # DDP's no_sync(): all-reduce the gradients only on the last micro-batch
                    ddp.require_backward_grad_sync = micro == cfg.grad_accum - 1
                if graphed is not None:
                    loss, parts = graphed(item["packed"], item["idx"])
                    total = loss
                    for name, value in parts.items():
                        part_sums[name] = part_sums.get(name, 0.0) + value
                    samples_since += item["n"]
                    tokens_since += item["real_tokens"]
                    continue
                target = teacher_dev[item["idx"].to(device, non_blocking=True)].float()
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    if packed:
                        emb = forward(item["packed"].to(device))
                    else:
                        ids = item["ids"].to(device, non_blocking=True)
                        mask = item["mask"].to(device, non_blocking=True)
                        emb = forward({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
                keys = teacher_dev[item["full"].to(device, non_blocking=True)].float() if "full" in item else None
                loss, parts = loss_fn(emb.float(), target, keys)
                if item["weight"] != 1.0:  # distributed, uneven split: the mean over ranks is the global-batch mean
                    loss = loss * item["weight"]
                    parts = {name: value * item["weight"] for name, value in parts.items()}
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                total = loss.detach() if total is None else total + loss.detach()
                samples_since += item["n"]
                tokens_since += item["real_tokens"]
            total = total / cfg.grad_accum
            if world > 1:  # the global batch's loss, so every rank makes the same skip decision
                total = dist_.all_reduce_sum(total) / world
            if fused:
                # NaN/inf guard without a host sync: fused AdamW skips the update on the device when `found_inf`
                # is set (the GradScaler protocol), so the CPU keeps queueing work; skips are counted at log time.
                found_inf = (~torch.isfinite(total)).float()
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
                optimizer.found_inf, optimizer.grad_scale = found_inf, None
                optimizer.step()
                skipped_dev += found_inf
                loss_sum += torch.nan_to_num(total) * (1 - found_inf)
                loss_count += 1 - found_inf
            elif not torch.isfinite(total):
                # NaN/inf guard: drop this step's update; stop if it keeps happening.
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
                optimizer.step()
                loss_sum += total
                loss_count += 1
            step += 1
            if selector is not None and step < total_steps:
                selector.maybe_refresh(step, student, tokens)
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                skipped += int(skipped_dev)
                skipped_dev.zero_()
                if skipped > 20:
                    raise LeafkdError(f"training diverged: {skipped} steps with non-finite loss; lower --lr")
                loss_count = float(loss_count)
                if world > 1 and part_sums:
                    reduced = dist_.all_reduce_sum(torch.stack([torch.as_tensor(v, device=device).float()
                                                                for v in part_sums.values()])) / world
                    part_sums = dict(zip(part_sums, reduced))
                mean_loss = float(loss_sum / max(loss_count, 1))
                rec = {"type": "train", "step": step, "epoch": epoch, "loss": mean_loss,
                       "lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples_since / (now - t_last),
                       "tokens_per_s": tokens_since / (now - t_last), "skipped_steps": skipped,
                       "loss_parts": {k: float(v) / max(loss_count, 1) for k, v in part_sums.items()}}
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4g}", sps=f"{rec['samples_per_s']:.0f}")
                loss_sum.zero_()
                loss_count = 0
                part_sums.clear()
                t_last, samples_since, tokens_since = now, 0, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run_eval()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(out, {"step": step, "epoch": epoch, "position": position, "model": student.state_dict(),
                                      "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                                      "result_key": cfg.result_key(), "config": asdict(cfg),
                                      "selection": selector.state_dict() if selector is not None else None},
                                cfg.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()

    graph_stats = None
    if graphed is not None:
        graph_stats = graphed.stats()
        log(f"CUDA graphs: {graph_stats['graphs']} captured, {graph_stats['replays']} replays, "
            f"{graph_stats['eager_steps']} eager steps"
            + (f"; off after a failed capture: {graph_stats['disabled']}" if graph_stats["disabled"] else ""))
        graphed = None  # frees the graphs' memory pool before the final evaluation
    final = run_eval()
    # The same metrics on as many training texts (a seeded sample): a gap to the held-out numbers is overfitting;
    # both low is what the student cannot fit at all (capacity), which more data or steps will not fix.
    fit_n = min(len(data.heldout_idx), len(data.train_idx))
    fit_idx = np.sort(np.random.default_rng(cfg.seed).choice(data.train_idx, fit_n, replace=False))
    student.eval()
    fit = evaluate_student(student, tokens.take(fit_idx), data.teacher[fit_idx], device)
    train_fit = {"cos_mean": fit["heldout_cos_mean"], "cos_p5": fit["heldout_cos_p5"], "texts": len(fit_idx)}
    metrics.write({"type": "train_fit", "step": step, **train_fit})
    log(f"training texts ({len(fit_idx)} sampled): cos {train_fit['cos_mean']:.4f} (p5 {train_fit['cos_p5']:.4f})")
    baseline = next((r for r in metrics.records if r.get("type") == "baseline"), None)
    model_dir = out / "model"
    info = {
        "leafkd_version": __import__("leafkd").__version__,
        "teacher": teacher_model_meta["teacher"],
        "teacher_fingerprint": data.fingerprint,
        "teacher_dim": teacher_dim,
        "student_dim": teacher_dim,
        "base": str(resolve_model(cfg.student)),
        "base_layers": cfg.student_layers,
        "normalize": use_norm,
        "query_prompt": query_prompt,
        "losses": {k: v for k, v in loss_fn.weights.items()},
        "data": cfg.data,
        "texts": len(data.texts),
        "heldout": len(data.heldout_idx),
        "steps": step,
        "config": asdict(cfg),
        "metrics": {"final": final, "ridge_baseline": {k: baseline[k] for k in final} if baseline else None,
                    "train_fit": train_fit},
        "selection": selector.summary_for_model() if selector is not None else None,
    }
    if is_main:
        with atomic.atomic_dir(model_dir) as tmp:
            student.to("cpu").save(str(tmp))
            atomic.write_json(tmp / "leafkd.json", info)
    save_checkpoint(out, {"step": step, "epoch": epoch, "position": position, "model": student.state_dict(),
                          "optimizer": optimizer.state_dict(), "rng": _rng_state(), "result_key": cfg.result_key(),
                          "config": asdict(cfg), "selection": selector.state_dict() if selector is not None else None},
                    cfg.keep_checkpoints)
    if cfg.plot and is_main:
        plot_curves(metrics.records, out / "curves.png")
    dist_.barrier()  # the others return once rank 0 has written the model
    return {"model": str(model_dir), "final": final, "ridge_baseline": info["metrics"]["ridge_baseline"], "steps": step,
            "train_fit": train_fit, "cuda_graphs": graph_stats}
