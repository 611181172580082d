"""`DistillConfig`: what `leafkd distill` needs, from the command line or a TOML file's ``[distill]`` section.

The training itself is the measured corpus-adapted recipe (`RECIPE`, eval/RESULTS.md): the corpus's documents and
their sentence pieces visited 3x per epoch, 4 query-sized spans per document once, the bank loss (weight 300)
against the corpus's documents, the student reading as many tokens as the teacher. A ``[train]`` section of the
same file (or `train` overrides) changes any `TrainConfig` option of it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from leafkd.errors import LeafkdError
from leafkd.student.choice import resolve_student, split_student

# The corpus-adapted recipe as TrainConfig options (examples/recipes/adapted-bank300.toml, without its data paths).
RECIPE: dict[str, Any] = {
    "adapt_weight": 3.0,
    "adapt_spans": 4,
    "bank": 300.0,
    "bank_from_adapt": True,
    "heldout": 2000,
    "epochs": 10.0,
    "batch_size": 512,
    "lr": 1e-3,
    "projection_lr": 1e-3,
    "warmup": 0.03,
    "leaf_l2": 1.0,
    "eval_every": 1000,
    "checkpoint_every": 2000,
}


@dataclass
class DistillConfig:
    """A corpus, a teacher and a student in; a trained student, an index of the corpus and a report out."""

    corpus: str  # the documents: a BEIR folder, corpus.jsonl, any .jsonl (_id, title, text) or a .txt
    teacher: str  # model folder or installed name
    # The student: a base encoder (folder or installed name), or a `StudentChoice`: "teacher" (the teacher's own
    # layers, see student_layers) or "static" (a static-embedding student from the teacher).
    student: str = "all-MiniLM-L6-v2"
    student_layers: str | int | None = None  # layers of the base to keep: first:k, every:n or i,j,k (default: all)
    out: str = "runs/distill"  # run folder: teacher-vectors/, student/, index/, eval/, report.md
    queries: str | None = None  # queries.jsonl for evaluation (a BEIR folder brings its own)
    qrels: str | None = None  # relevance TSV for evaluation (a BEIR folder: qrels/test.tsv)
    data: list[str] | None = None  # extra training text (PATH[#COLUMN][*WEIGHT]); None: the generic mix
    data_dir: str | None = None  # where the generic mix is found (default: $LEAFKD_DATA or ../shared/data)
    vectors: str | None = None  # teacher-vector store (default OUT/teacher-vectors); share one between runs
    factory: str = "Flat"  # FAISS factory string of the index
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False  # eager kernels (no compile, no CUDA graphs): the same weights on every run
    evaluate: bool = True  # evaluate when queries and relevance labels are there
    progress: bool = True
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig options over the recipe

    def __post_init__(self) -> None:
        if (self.queries is None) != (self.qrels is None):
            raise LeafkdError("give both --queries and --qrels (or neither: a BEIR folder brings its own)")
        if not str(self.corpus).strip():
            raise LeafkdError("no corpus given")
        for name in ("corpus", "teacher", "student", "out", "queries", "qrels", "data_dir", "vectors"):
            value = getattr(self, name)
            if value is not None:  # paths arrive as Path objects too (the command line's checked --out)
                setattr(self, name, str(value))
        if self.data is not None:
            self.data = [str(d) for d in self.data]
        layers = self.student_layers if self.student_layers is not None else self.train.get("student_layers")
        spec = split_student(self.student, layers, self.train.get("static_dim"))
        self.student, static = resolve_student(spec.base, self.teacher)
        if static:
            self.train.setdefault("student_kind", "static")
        self.student_layers = spec.layers
        if spec.layers is not None:
            self.train.setdefault("student_layers", spec.layers)
        if spec.static_dim is not None:
            self.train["static_dim"] = spec.static_dim

    @property
    def store_path(self) -> Path:
        return Path(self.vectors) if self.vectors else Path(self.out) / "teacher-vectors"


def load_distill_config(path: str | Path | None = None, **overrides: Any) -> DistillConfig:
    """A DistillConfig from a TOML file's ``[distill]`` (and ``[train]``) tables, with keyword overrides."""
    values: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LeafkdError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise LeafkdError(f"{path}: malformed TOML ({e})") from None
        values.update(raw.get("distill", {}))
        train.update(raw.get("train", {}))
    train.update(overrides.pop("train", None) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(DistillConfig)} - {"train"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LeafkdError(f"unknown distill option(s) {', '.join(unknown)} in {path or 'overrides'}")
    for required in ("corpus", "teacher"):
        if not values.get(required):
            raise LeafkdError(f"no {required} given (--{required} or {required} = ... in [distill])")
    return DistillConfig(**values, train=train)
