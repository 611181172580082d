"""The two evaluation engines: ``mteb`` (the reference: local `AbsTaskRetrieval`/`AbsTaskSTS` tasks, run with
``cache=None``) and ``fast`` (exact search in numpy with pytrec_eval); they compute the same numbers.

STS tasks score ``sentence1`` in the query role and ``sentence2`` in the document role, without prompts: for a
symmetric mode this is plain MTEB STS; for ``asymmetric``/``ridge`` it measures student-to-teacher similarity.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np

from leafkd.errors import LeafkdError
from leafkd.evaluation.embedders import Embedder
from leafkd.evaluation.metrics import retrieval_metrics, search, sts_metrics
from leafkd.evaluation.tasks import RetrievalData, STSData, TaskData
from leafkd.extras import MissingExtraError

logger = logging.getLogger(__name__)


class Engine(StrEnum):
    """How tasks are scored: mteb itself (the reference) or the built-in numpy + pytrec_eval engine."""

    MTEB = "mteb"
    FAST = "fast"


def task_vectors(embedder: Embedder, data: TaskData) -> tuple[np.ndarray, np.ndarray]:
    """(query vectors, document vectors) of a retrieval task, or (sentence1, sentence2) vectors of an STS task."""
    if isinstance(data, RetrievalData):
        return embedder.embed(data.query_texts, "query"), embedder.embed(data.doc_texts, "document")
    return (embedder.embed(data.sentences1, "query", prompts=False),
            embedder.embed(data.sentences2, "document", prompts=False))


def fast_evaluate_task(embedder: Embedder, data: TaskData, backend: str = "auto",
                       ignore_identical_ids: bool = True) -> dict[str, float]:
    """One task's metrics with the built-in engine."""
    a, b = task_vectors(embedder, data)
    if isinstance(data, RetrievalData):
        run = search(a, b, data.query_ids, data.doc_ids, top_k=100, ignore_identical_ids=ignore_identical_ids)
        return retrieval_metrics(data.qrels, run, backend)
    return sts_metrics(a, b, data.scores)


def have_mteb() -> bool:
    return importlib.util.find_spec("mteb") is not None


def _task_metadata(data: TaskData):
    from mteb.abstasks.task_metadata import TaskMetadata

    retrieval = isinstance(data, RetrievalData)
    return TaskMetadata(
        name=data.name,
        description=f"Local {'BEIR retrieval' if retrieval else 'STS'} task read from {data.spec.path}.",
        dataset={"path": str(data.spec.path), "revision": "local"},
        type="Retrieval" if retrieval else "STS",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=data.spec.metric,
        date=None,
        domains=None,
        task_subtypes=None,
        license="not specified",
        annotations_creators=None,
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )


def mteb_task(data: TaskData, ignore_identical_ids: bool = True):
    """An mteb task whose ``load_data`` fills its dataset from the already-read local files."""
    if isinstance(data, RetrievalData):
        return _mteb_retrieval_task(data, ignore_identical_ids)
    return _mteb_sts_task(data)


def _mteb_retrieval_task(data: RetrievalData, ignore_identical_ids: bool):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _task_metadata(data)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            corpus = Dataset.from_dict({"id": data.doc_ids, "title": [""] * len(data.doc_ids), "text": data.doc_texts})
            queries = Dataset.from_dict({"id": data.query_ids, "text": data.query_texts})
            self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries,
                                                 "relevant_docs": {q: dict(r) for q, r in data.qrels.items()},
                                                 "top_ranked": None}}}
            self.data_loaded = True

    task = LocalRetrieval()
    task.ignore_identical_ids = ignore_identical_ids
    return task


def _mteb_sts_task(data: STSData):
    from datasets import Dataset
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.types import PromptType

    class LocalSTS(AbsTaskSTS):
        metadata = _task_metadata(data)
        # mteb annotates these as int; a task's score range may be fractional (only used to rescale gold scores)
        min_score = data.spec.score_range[0]  # type: ignore[assignment]
        max_score = data.spec.score_range[1]  # type: ignore[assignment]
        # Route sentence1 to the query side and sentence2 to the document side (matters only for asymmetric modes).
        input1_prompt_type = PromptType.query
        input2_prompt_type = PromptType.document

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {"default": {"test": Dataset.from_dict({
                "sentence1": data.sentences1, "sentence2": data.sentences2, "score": data.scores.tolist()})}}
            self.data_loaded = True

    return LocalSTS()


def mteb_encoder(embedder: Embedder, name: str):
    """Wrap an `Embedder` as an mteb encoder that routes on ``prompt_type`` (query vs document)."""
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    class LeafkdEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.embedder = embedder
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites={"name": f"leafkd/{name}", "similarity_fn_name": ScoringFunction.COSINE})

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            role = getattr(prompt_type, "value", prompt_type)
            return self.embedder.embed(texts, role, prompts=task_metadata.type != "STS")

    return LeafkdEncoder()


def mteb_evaluate(embedder: Embedder, datas: Sequence[TaskData], name: str = "model",
                  ignore_identical_ids: bool = True) -> dict[str, dict[str, float]]:
    """Run mteb (offline, ``cache=None``) on local tasks; returns {task name: metrics}."""
    import datasets
    import mteb

    logging.getLogger("mteb").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    tasks = [mteb_task(d, ignore_identical_ids) for d in datas]
    result = mteb.evaluate(mteb_encoder(embedder, name), tasks, cache=None, overwrite_strategy="always",
                           show_progress_bar=False, encode_kwargs={"batch_size": 64})
    if getattr(result, "exceptions", None):
        raise RuntimeError(f"mteb failed: {result.exceptions}")
    out: dict[str, dict[str, float]] = {}
    for tr in result.task_results:
        s = tr.scores["test"][0]
        keys = ("ndcg_at_10", "recall_at_100") if "ndcg_at_10" in s else ("cosine_spearman", "cosine_pearson")
        out[tr.task_name] = {k: float(s[k]) for k in keys}
    return out


def resolve_engine(engine: Engine | str | None) -> Engine:
    """The engine to use: ``mteb`` when installed for None or ``"auto"``; asking for a missing mteb is an error."""
    if engine is None or engine == "auto":
        return Engine.MTEB if have_mteb() else Engine.FAST
    try:
        engine = Engine(engine)
    except ValueError:
        raise LeafkdError(f"unknown engine {engine!r} (use mteb or fast)") from None
    if engine is Engine.MTEB and not have_mteb():
        raise MissingExtraError("engine 'mteb' needs mteb installed (pip install 'leafkd[eval]'), or use --engine fast")
    return engine


def evaluate(embedders: Mapping[str, Embedder], datas: Sequence[TaskData], engine: Engine | str | None = None, *,
             ignore_identical_ids: bool = True, backend: str = "auto") -> list[dict[str, Any]]:
    """Score each mode on each task; one row per mode with ``scores`` (main metric), ``metrics`` and ``average``."""
    engine = resolve_engine(engine)
    rows = []
    for mode, emb in embedders.items():
        metrics: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        for data in datas:
            t0 = time.perf_counter()
            if engine is Engine.FAST:
                metrics[data.name] = fast_evaluate_task(emb, data, backend, ignore_identical_ids)
            else:
                metrics.update(mteb_evaluate(emb, [data], mode, ignore_identical_ids))
            seconds[data.name] = round(time.perf_counter() - t0, 2)
            metric = data.spec.metric
            logger.info(f"{mode:<10} {data.name:<14} {metric} {100 * metrics[data.name][metric]:6.2f}  "
                        f"({seconds[data.name]:.1f}s)")
        scores = {d.name: metrics[d.name][d.spec.metric] for d in datas}
        rows.append({"mode": mode, "encoders": emb.describe(), "engine": engine.value, "scores": scores,
                     "average": float(np.mean(list(scores.values()))), "metrics": metrics, "seconds": seconds})
    return rows
