"""`TrainConfig`: every option of `train-embedder`, read from TOML and the command line, and validated."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from leafkd.choices import Choice
from leafkd.errors import LeafkdError
from leafkd.student.choice import resolve_student, split_student
from leafkd.student.layers import SPEC_HELP


class Projection(Choice):
    """Whether the student ends with a Dense projection to the teacher's dim."""

    AUTO = "auto"  # when the dims differ
    ALWAYS = "always"
    NONE = "none"


class StudentKind(Choice):
    """What the student is made of (leafkd.student.build.StudentKind, as a training option)."""

    TRANSFORMER = "transformer"
    STATIC = "static"


class StaticInit(Choice):
    """Where a static student's table starts (leafkd.student.static.StaticInit, as a training option)."""

    FORWARD = "forward"
    EMBEDDINGS = "embeddings"


class TriState(Choice):
    """On, off, or decided by the run (the teacher, the student, the device)."""

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"


# Row attention needs packed batches: said where the configuration refuses it and where the student does.
ROWS_NEED_PACKED = ("--packed-attention rows: needs packed batches (--packed auto or true, a BERT or MPNet student "
                    "with mean pooling)")


class PackedAttention(Choice):
    """How packed training lays out a batch's texts for attention (leafkd.runtime.packed)."""

    AUTO = "auto"  # varlen: rows are opt-in until a whole H200 run with bucketed row counts has been measured
    VARLEN = "varlen"  # texts one after another, flash attention over variable-length sequences
    ROWS = "rows"  # texts bin-packed into rows, one attention call over the rows under a same-text mask


class Precision(Choice):
    """Training's autocast: bf16 on CUDA, fp32 on CPU (auto), or forced."""

    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


class SelectMode(Choice):
    """Teacher-guided data selection (leafkd.training.selection)."""

    NONE = "none"
    SUBSET = "subset"
    REWEIGHT = "reweight"


def _opt(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    if isinstance(default, Choice):
        kw["choices"] = type(default)
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every option of `train-embedder`; a TOML file sets any of them, the command line overrides."""

    teacher: str | None = _opt(None, "teacher model folder or installed name (omit with --teacher-vectors)")
    data: list[str] = _opt([], "text sources PATH[#COLUMN][*WEIGHT]: .txt, .jsonl, .tsv or a BEIR folder "
                           "(repeatable)")
    vectors: str | None = _opt(None, "teacher-vector store folder (default: OUTPUT/teacher-vectors; captured if "
                               "missing)")
    teacher_vectors: str | None = _opt(None, "black-box teacher: .npy of vectors, row i for text i of --data")
    student: str = _opt("all-MiniLM-L6-v2", "student base encoder: model folder or installed name; 'teacher': the "
                        "teacher's own layers (see --student-layers); 'static': a static student from the teacher; "
                        "NAME:LAYERS / static:DIM in one string, e.g. teacher:first:6, static:256")
    student_kind: StudentKind = _opt(StudentKind.TRANSFORMER, "transformer (the base's layers + mean pooling) or "
                                     "static (a token embedding table embedded by the base, model2vec-style, + mean "
                                     "pooling; padded batches)")
    student_layers: str | int | None = _opt(None, f"layers of the student base to keep: {SPEC_HELP}")
    static_dim: int | None = _opt(None, "static: PCA dimensions of the token table (default: the base's dimension)",
                                  min=1)
    static_vocab: int | None = _opt(None, "static: embed only the first N token ids with the base (ids run roughly "
                                    "by frequency; the rest start as the unknown token; 0: a random table)", min=0)
    static_init: StaticInit = _opt(StaticInit.FORWARD, "static: the table starts as each token embedded by the "
                                   "base (forward: model2vec-style, one pass over the vocabulary, seconds on a GPU) "
                                   "or as the base's input token embeddings (embeddings: instant)")
    projection: Projection = _opt(Projection.AUTO, "Dense projection to the teacher's dim: auto (when dims differ), "
                                  "always, none")
    normalize: TriState = _opt(TriState.AUTO, "end the student with Normalize: auto (as the teacher), true, false")
    query_prompt: str | None = _opt(None, "query prompt stored with the student (default: the teacher's 'query' "
                                    "prompt)")
    max_seq_length: int | None = _opt(None, "student max tokens per text (default: the base's)", min=1)
    output: str = _opt("runs/student", "run folder: checkpoints, metrics.jsonl, curves.png and model/")
    max_texts: int | None = _opt(None, "use a seeded sample of this many unique texts of --data (adaptation text is "
                                 "added whole)", min=1)
    adapt: list[str] = _opt([], "corpora to adapt to (repeatable): BEIR folders or any --data source; their documents, "
                            "sentence pieces and query-sized spans join the training text (as `leafkd adapt-text` "
                            "cuts them)")
    adapt_weight: float = _opt(3.0, "visits per epoch of the adapted documents and of their sentence pieces", gt=0)
    adapt_spans: int = _opt(4, "random 4-32-word spans per adapted document, visited once per epoch (0: none)", min=0)
    bank_from_adapt: bool = _opt(False, "the bank loss's bank is the adapted corpora's documents (as --bank-data "
                                 "naming them would be)")
    heldout: int = _opt(2000, "texts held out for alignment metrics (never trained on)", min=10)
    epochs: float = _opt(1.0, "passes over the training texts (fractions allowed)", gt=0)
    max_steps: int | None = _opt(None, "stop after this many optimiser steps (overrides epochs)", min=1)
    batch_size: int = _opt(128, "texts per micro-batch", min=1)
    grad_accum: int = _opt(1, "micro-batches per optimiser step", min=1)
    lr: float = _opt(1e-3, "peak learning rate of the encoder (1e-3: the measured best, eval/RESULTS.md)", gt=0)
    projection_lr: float = _opt(1e-3, "peak learning rate of the projection layer", gt=0)
    warmup: float = _opt(0.05, "warm-up fraction of the steps", min=0, max=1)
    weight_decay: float = _opt(0.01, "AdamW weight decay", min=0)
    clip: float = _opt(1.0, "gradient norm clip (0: off)", min=0)
    dropout: float = _opt(0.0, "dropout inside the student (0 makes training deterministic)", min=0, max=0.9)
    leaf_l2: float = _opt(1.0, "weight of LEAF's squared-L2 loss", min=0)
    mse: float = _opt(0.0, "weight of the per-dimension MSE loss", min=0)
    cosine: float = _opt(0.0, "weight of the 1 - cosine loss", min=0)
    lelp: float = _opt(0.0, "weight of the LELP pseudo-subclass projection loss", min=0)
    lelp_classes: int = _opt(32, "LELP pseudo-classes (k-means on teacher vectors)", min=1)
    lelp_subclasses: int = _opt(8, "LELP principal directions (pseudo-subclasses) per class", min=1)
    lelp_temperature: float = _opt(0.05, "LELP softmax temperature", gt=0)
    relational: float = _opt(0.0, "weight of the in-batch relational KL loss", min=0)
    relational_temperature: float = _opt(0.05, "relational softmax temperature", gt=0)
    bank: float = _opt(0.0, "weight of the relational KL loss against a fixed bank of teacher vectors: the student "
                       "should rank the bank as the teacher does (for asymmetric retrieval, the index's documents)",
                       min=0)
    bank_data: list[str] = _opt([], "sources (as --data, repeatable) whose texts' teacher vectors form the bank; each "
                                "text must be training data too (default: a sample of the training texts)")
    bank_size: int = _opt(65536, "at most this many bank vectors (a seeded sample beyond it; without --bank-data, "
                          "sampled from the training texts): the loss scores every batch text against all of them",
                          min=1)
    bank_temperature: float = _opt(0.05, "bank relational softmax temperature", gt=0)
    ridge_alpha: float = _opt(1e-2, "relative ridge penalty of the projection warm start", min=0)
    ridge_samples: int = _opt(20000, "texts used to fit the ridge warm start", min=1)
    select: SelectMode = _opt(SelectMode.NONE, "teacher-guided data selection: none, subset (train on a chosen "
                              "subset) or reweight (sample texts by student-teacher gap); see docs/selection.md")
    select_fraction: float = _opt(0.5, "subset: fraction of the training pool (after drops) to keep", gt=0, max=1)
    select_size: int | None = _opt(None, "subset: number of texts to keep (overrides --select-fraction)", min=1)
    select_temperature: float = _opt(1.0, "difficulty preference (gap / mean gap) ** (1/T); large T is uniform", gt=0)
    select_diversity: float = _opt(0.5, "cluster balance: share of cluster c scales with n_c ** -D (0: none, "
                                   "1: equal-size clusters)", min=0)
    select_max_weight: float = _opt(4.0, "reweight: clip each text's weight factor to [1/M, M]", min=1)
    select_clusters: int = _opt(256, "k-means clusters of teacher vectors for diversity and dedup", min=1)
    select_refresh_every: int = _opt(0, "re-score and re-select every N steps, applied from the next epoch (0: once "
                                     "after the warm start)", min=0)
    select_score_texts: int = _opt(50000, "score a seeded sample of at most N pool texts per round (0: all); others "
                                   "get their cluster's mean", min=0)
    dedup_threshold: float = _opt(0.98, "selection drops near-duplicates with teacher cosine >= this (1.0: off)",
                                  gt=0, max=1)
    drop_degenerate: bool = _opt(True, "drop training texts that are empty after tokenisation or have "
                                 "zero-norm/outlier teacher vectors")
    eval_every: int = _opt(200, "held-out evaluation every N steps (0: only at the start and end)", min=0)
    log_every: int = _opt(20, "training log line every N steps", min=1)
    checkpoint_every: int = _opt(500, "checkpoint every N steps (0: only at the end)", min=0)
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk", min=1)
    resume: bool = _opt(True, "resume from the latest checkpoint in OUTPUT")
    seed: int = _opt(0, "seed for sampling, held-out split and initialisation", min=0, max=2**32 - 1)
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    precision: Precision = _opt(Precision.AUTO, "bf16 autocast on CUDA, fp32 on CPU (auto), or force bf16/fp32")
    compile: TriState = _opt(TriState.AUTO, "torch.compile the student's forward: auto (packed training on CUDA, "
                             "where it fuses the small kernels: ~9x the eager step rate on an H100), true, false")
    packed: TriState = _opt(TriState.AUTO, "unpadded batches: each batch's texts concatenated, attention per text, "
                            "batches drawn at random instead of grouped by length (auto: when the student is "
                            "BERT/MPNet with mean pooling; true; false: padded, length-grouped batches)")
    cuda_graphs: TriState = _opt(TriState.AUTO, "replay each packed training step as a CUDA graph (one per token "
                                 "bucket): auto (packed training with flash attention on one CUDA device, "
                                 "grad_accum 1), true, false")
    packed_attention: PackedAttention = _opt(PackedAttention.AUTO, "packed batches' attention: varlen (flash "
                                             "attention per text; auto) or rows (texts bin-packed into rows, cuDNN "
                                             "attention per row: ~1.3x the steady-state step rate on an H200, "
                                             "experimental, see eval/BENCHMARKS.md)")
    deterministic: bool = _opt(False, "the same weights on every run: eager kernels (no compile, no CUDA graphs) "
                               "and torch's deterministic algorithms; slower on CUDA (eval/RESULTS.md)")
    capture_batch_tokens: int | None = _opt(None, "token budget per teacher batch when capturing", min=1)
    plot: bool = _opt(True, "write curves.png")
    progress: bool = _opt(True, "show progress bars")

    # Options that do not change the result: a resumed run may change them.
    RESUME_FREE = ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "resume", "plot", "progress",
                   "device", "max_steps", "epochs", "compile", "cuda_graphs", "deterministic", "packed_attention")

    # Selection options (issue 8) enter the key only where they change the run: off their defaults, and the
    # select_* ones only when selection is on (so keys of runs from before selection existed are unchanged).
    SELECTION = ("select", "select_fraction", "select_size", "select_temperature", "select_diversity",
                 "select_max_weight", "select_clusters", "select_refresh_every", "select_score_texts",
                 "dedup_threshold", "drop_degenerate")

    # Bank loss options enter the key only when the loss is on (keys of runs from before it existed are unchanged).
    BANK = ("bank", "bank_data", "bank_size", "bank_temperature")

    # Corpus adaptation enters the key only when a corpus is adapted to (bank_from_adapt: only when on).
    ADAPT = ("adapt", "adapt_weight", "adapt_spans")

    # Student kinds (issue 21) enter the key only off their defaults (keys of earlier runs are unchanged).
    STUDENT = ("student_kind", "static_dim", "static_vocab", "static_init")

    def __post_init__(self) -> None:
        # Paths arrive as Path objects from library callers: keep them as strings (leafkd.json, the result key).
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))
            elif isinstance(value, list):
                setattr(self, f.name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
        # Fixed-choice options arrive as strings (TOML, the command line, keywords): parse them into their Enum.
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                setattr(self, f.name, choices.parse(getattr(self, f.name), f.name))
        self.adapt_weight = float(self.adapt_weight)  # TOML's 3 and the command line's 3.0: one result key
        if self.deterministic:
            for name in ("compile", "cuda_graphs"):
                if getattr(self, name) == TriState.TRUE:
                    flag = name.replace("_", "-")
                    raise LeafkdError(f"--deterministic runs eager kernels: it cannot go with --{flag} true")
                setattr(self, name, TriState.FALSE)
        # "teacher:first:6" and ("teacher", "first:6"), "6" and 6: one spelling, one result key
        spec = split_student(self.student, self.student_layers, self.static_dim)
        self.student_layers, self.static_dim = spec.layers, spec.static_dim
        self.student, static = resolve_student(spec.base, self.teacher)  # 'teacher' / 'static': the teacher
        if static:
            self.student_kind = StudentKind.STATIC

    def result_key(self) -> str:
        """A hash of the options that change the result: a run resumes only a checkpoint with the same key."""
        d = {k: v for k, v in asdict(self).items() if k not in self.RESUME_FREE}
        defaults = {f.name: f.default for f in fields(self) if f.name in self.SELECTION}
        for k in self.SELECTION:
            if d[k] == defaults[k] or (self.select == SelectMode.NONE and k != "drop_degenerate"):
                del d[k]
        if self.bank == 0:
            for k in self.BANK:
                del d[k]
        if not self.adapt:
            for k in self.ADAPT:
                del d[k]
        if not self.bank_from_adapt:
            del d["bank_from_adapt"]
        defaults = {f.name: f.default for f in fields(self) if f.name in self.STUDENT}
        for k in self.STUDENT:
            if d[k] == defaults[k]:
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    """One-line errors for options that cannot work together (before any work)."""
    if cfg.teacher is None and cfg.teacher_vectors is None and cfg.vectors is None:
        raise LeafkdError("give a teacher (--teacher), a vector store (--vectors) or black-box vectors "
                          "(--teacher-vectors)")
    if not cfg.data and not cfg.adapt and cfg.vectors is None:
        raise LeafkdError("no training data: give --data (or --vectors of an existing store)")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise LeafkdError(f"{name} must be >= 1")
    if cfg.lr <= 0 or cfg.projection_lr <= 0:
        raise LeafkdError("learning rates must be > 0")
    if cfg.heldout < 10:
        raise LeafkdError("heldout must be >= 10")
    weights = [cfg.leaf_l2, cfg.mse, cfg.cosine, cfg.lelp, cfg.relational, cfg.bank]
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise LeafkdError("loss weights must be >= 0 with at least one > 0")
    _validate_selection(cfg)
    _validate_bank_and_adaptation(cfg)
    _validate_student(cfg)


def _validate_selection(cfg: TrainConfig) -> None:
    if not 0 < cfg.select_fraction <= 1 or (cfg.select_size is not None and cfg.select_size < 1):
        raise LeafkdError("select_fraction must be in (0, 1] and select_size >= 1")
    if cfg.select_temperature <= 0 or cfg.select_max_weight < 1 or cfg.select_diversity < 0:
        raise LeafkdError("select_temperature must be > 0, select_max_weight >= 1, select_diversity >= 0")
    if cfg.select_clusters < 1 or cfg.select_refresh_every < 0 or cfg.select_score_texts < 0:
        raise LeafkdError("select_clusters must be >= 1, select_refresh_every and select_score_texts >= 0")
    if not 0 < cfg.dedup_threshold <= 1:
        raise LeafkdError("dedup_threshold must be in (0, 1] (1: no dedup)")


def _validate_bank_and_adaptation(cfg: TrainConfig) -> None:
    if cfg.bank > 0 and (cfg.bank_size < 2 or cfg.bank_temperature <= 0):
        raise LeafkdError("bank_size must be >= 2 and bank_temperature > 0")
    if cfg.bank_data and cfg.bank == 0:
        raise LeafkdError("--bank-data is set but the bank loss is off: give it a weight with --bank")
    if cfg.bank_from_adapt and (cfg.bank == 0 or not cfg.adapt):
        raise LeafkdError("--bank-from-adapt needs the bank loss (--bank) and corpora to adapt to (--adapt)")
    if cfg.adapt_weight < 0 or cfg.adapt_spans < 0:
        raise LeafkdError("adapt_weight and adapt_spans must be >= 0")
    if cfg.adapt and cfg.teacher_vectors:
        raise LeafkdError("--adapt cannot be combined with --teacher-vectors (rows must match the texts of --data)")
    if cfg.packed_attention == PackedAttention.ROWS and (cfg.packed == TriState.FALSE
                                                         or cfg.student_kind == StudentKind.STATIC):
        raise LeafkdError(ROWS_NEED_PACKED)


def _validate_student(cfg: TrainConfig) -> None:
    if cfg.student_kind == StudentKind.STATIC and cfg.student_layers is not None:
        raise LeafkdError("a static student has no layers to select: drop --student-layers")
    if cfg.student_kind != StudentKind.STATIC and (cfg.static_dim is not None or cfg.static_vocab is not None
                                                   or cfg.static_init != StaticInit.FORWARD):
        raise LeafkdError("--static-dim, --static-vocab and --static-init need a static student (--student static)")
    if (cfg.static_dim is not None and cfg.static_dim < 1) or (cfg.static_vocab is not None and cfg.static_vocab < 0):
        raise LeafkdError("static_dim must be >= 1 and static_vocab >= 0")
    if cfg.student_kind == StudentKind.STATIC and cfg.packed == TriState.TRUE:
        raise LeafkdError("--packed true: a static student trains on padded batches (use --packed auto or false)")
