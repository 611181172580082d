"""`distill`: from a corpus to a served student that matches the teacher on it, in one call.

Stages, each reused by a rerun and resumable after a kill:

1. train: the training corpus is the extra text (the generic mix by default) plus the corpus's adaptation text
   (its documents, their sentence pieces, query-sized spans); the teacher embeds all of it once into the vector
   store (resumable capture), and the student trains with the corpus-adapted recipe (resumable checkpoints);
2. index: the corpus's FAISS index is built from the vectors the capture already holds: the teacher does not
   embed a document a second time;
3. evaluate (when there are queries and relevance labels): teacher, base, student alone and asymmetric nDCG@10,
   the teacher's document vectors again taken from the store; a report with a chart;
4. the `leafkd serve` command that serves the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leafkd import atomic
from leafkd.capture.store import VectorStore
from leafkd.data.documents import Document, check_unique_ids, read_documents
from leafkd.data.mixes import generic_mix
from leafkd.data.sources import text_hash
from leafkd.errors import LeafkdError
from leafkd.pipeline.config import RECIPE, DistillConfig
from leafkd.student.info import read_student_info

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"


@dataclass
class DistillResult:
    """Where a distillation put its parts, and what it measured."""

    out: Path
    student: Path  # the student model folder (SentenceTransformer(path) loads it)
    index: Path
    store: Path
    scores: dict[str, float] | None  # nDCG@10 of each mode on the corpus, when evaluated
    serve_command: str
    teacher_texts: int  # texts the teacher embedded (each once), documents included
    documents: int
    seconds: dict[str, float]  # wall time of each stage of this call (a reused stage takes ~0)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def training_options(cfg: DistillConfig) -> dict[str, Any]:
    """The TrainConfig options of a distillation: the recipe, the data, the corpus to adapt to, the run's paths."""
    from leafkd.models import load_model, resolve_model
    from leafkd.runtime.tokens import max_seq_length

    data = cfg.data if cfg.data is not None else generic_mix(cfg.data_dir)
    options: dict[str, Any] = {**RECIPE, "teacher": cfg.teacher, "student": cfg.student, "data": list(data),
                               "adapt": [cfg.corpus], "vectors": str(cfg.store_path),
                               "output": str(Path(cfg.out) / "student"), "seed": cfg.seed, "device": cfg.device,
                               "progress": cfg.progress}
    # The student reads as many tokens as the teacher does (long documents are matched on what the teacher saw).
    options["max_seq_length"] = max_seq_length(load_model(resolve_model(cfg.teacher), device="cpu"))
    if cfg.deterministic:
        options["deterministic"] = True
    options.update(cfg.train)
    return options


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train(cfg: DistillConfig) -> tuple[Path, dict[str, Any], dict[str, float]]:
    """Train (or reuse a finished student of the same options); returns the model folder, its leafkd.json and
    the training's own timings (capture, setup, steps, finish; empty when reused)."""
    from leafkd.training.config import load_config
    from leafkd.training.trainer import train

    train_cfg = load_config(None, **training_options(cfg))
    model = Path(train_cfg.output) / "model"
    info = read_student_info(model)
    if info.get("config") and info.get("result_key") == train_cfg.result_key():
        logger.info("student: reusing %s (trained with the same options)", model)
        return model, info, {}
    result = train(train_cfg)
    return model, read_student_info(model), result.get("seconds", {})


def document_vectors(store: VectorStore, docs: list[Document]) -> np.ndarray:
    """The stored teacher vectors of the documents (title and text joined, as they were captured), float32."""
    row_of = {bytes(h): i for i, h in enumerate(store.hashes())}
    rows = []
    for d in docs:
        row = row_of.get(text_hash(d.full_text))
        if row is None:
            raise LeafkdError(f"{store.path}: document {d.id!r} has no teacher vector (was the store captured "
                              "from this corpus?)")
        rows.append(row)
    return np.asarray(store.vectors()[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


def _index(cfg: DistillConfig, docs: list[Document], store: VectorStore) -> Path:
    """The corpus's index from the captured vectors (reused when built from the same documents and store)."""
    from leafkd.retrieval.build import build_index
    from leafkd.retrieval.manifest import MANIFEST

    folder = Path(cfg.out) / "index"
    key = _digest([d.id for d in docs], store.fingerprint, store.count, cfg.factory)
    manifest = folder / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("distill_key") == key:
        logger.info("index: reusing %s", folder)
        return folder
    vectors = document_vectors(store, docs)
    logger.info("index: %d documents from the captured teacher vectors (no second teacher pass)", len(docs))
    build_index(folder, docs, vectors=vectors, teacher=cfg.teacher, teacher_fingerprint=store.fingerprint,
                factory=cfg.factory, overwrite=True)
    data = json.loads(manifest.read_text())
    atomic.write_json(manifest, {**data, "distill_key": key})
    return folder


def distill(cfg: DistillConfig) -> DistillResult:
    """Run (or resume) every stage; returns where the parts are and the scores (see the module docstring)."""
    from leafkd.pipeline.evaluate import evaluate_distilled, retrieval_task

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LeafkdError(f"--out {out}: exists and is not a folder")
    docs = read_documents(cfg.corpus)
    check_unique_ids(docs, cfg.corpus)
    task = retrieval_task(cfg) if cfg.evaluate else None  # bad queries/qrels fail before any model work
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, info, train_seconds = _train(cfg)
    seconds = {f"train.{k}": v for k, v in train_seconds.items()}
    seconds["train"] = time.perf_counter() - started
    store = VectorStore.open(cfg.store_path)
    mark = time.perf_counter()
    index = _index(cfg, docs, store)
    seconds["index"] = time.perf_counter() - mark
    mark = time.perf_counter()
    scores = evaluate_distilled(cfg, task, model, store) if task is not None else None
    seconds["evaluate"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    logger.info("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    serve = f"leafkd serve --index {index} --student {model}"
    result = DistillResult(out, model, index, cfg.store_path, scores, serve, store.count, len(docs),
                           {k: round(v, 2) for k, v in seconds.items()})
    atomic.write_json(out / SUMMARY, {**result.as_dict(), "config": asdict(cfg),
                                      "student_metrics": info.get("metrics")})
    return result
