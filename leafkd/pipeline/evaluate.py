"""The evaluation stage of `distill`: the distilled student against its teacher on the corpus's own queries.

Modes: the teacher (its document vectors are the captured ones: the teacher embeds no document again), the
student's base model unchanged, the student alone, and asymmetric (student queries, teacher documents: how the
result is served). Writes OUT/eval/ (results.json, results.md, scores.png) and OUT/report.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from leafkd import atomic
from leafkd.capture.store import VectorStore
from leafkd.data.sources import text_hash
from leafkd.errors import LeafkdError
from leafkd.evaluation.embedders import Mode, load_models
from leafkd.evaluation.report import scores_chart, write_report
from leafkd.evaluation.runner import evaluate_models
from leafkd.evaluation.tasks import RetrievalData, TaskSpec, load_task
from leafkd.pipeline.config import DistillConfig

logger = logging.getLogger(__name__)


def retrieval_task(cfg: DistillConfig) -> RetrievalData | None:
    """The corpus's retrieval task: a BEIR folder's own queries and qrels/test.tsv, or --queries and --qrels; None
    when there are none (nothing to evaluate)."""
    corpus = Path(cfg.corpus)
    if cfg.queries is None and not (corpus.is_dir() and (corpus / "qrels" / "test.tsv").exists()):
        logger.info("no queries and relevance labels for %s: the evaluation stage is skipped", corpus)
        return None
    name = corpus.name if corpus.is_dir() else corpus.stem
    spec = TaskSpec(key=name, name=name, kind="retrieval", path=corpus,
                    queries=Path(cfg.queries) if cfg.queries else None, qrels=Path(cfg.qrels) if cfg.qrels else None)
    data = load_task(spec)
    assert isinstance(data, RetrievalData)
    return data


def _prefill_teacher_documents(models, data: RetrievalData, store: VectorStore) -> int:
    """Give the teacher its captured vectors of the task's documents; returns how many it will still embed."""
    row_of = {bytes(h): i for i, h in enumerate(store.hashes())}
    texts, rows = [], []
    for text in dict.fromkeys(data.doc_texts):
        row = row_of.get(text_hash(text))
        if row is not None:
            texts.append(text)
            rows.append(row)
    if rows:
        models.teacher.prefill(texts, store.vectors()[rows], role="document")
    return len(set(data.doc_texts)) - len(texts)  # empty documents are never captured


def evaluate_distilled(cfg: DistillConfig, data: RetrievalData, model: Path, store: VectorStore) -> dict[str, float]:
    """Score teacher, base, student and asymmetric on `data`; write the report; returns nDCG@10 per mode."""
    models = load_models(cfg.teacher, model, device=None if cfg.device == "auto" else cfg.device)
    left = _prefill_teacher_documents(models, data, store)
    logger.info("evaluation: the teacher's %d document vectors come from the capture (%d left to embed)",
                len(set(data.doc_texts)) - left, left)
    # The base model unchanged, unless it is the teacher itself (a student cut from the teacher's own layers).
    base = models.base is not None and models.teacher is not None and models.base.key != models.teacher.key
    modes = [Mode.TEACHER, Mode.STUDENT, Mode.ASYMMETRIC] + ([Mode.BASE] if base else [])
    results = evaluate_models(models, [data], modes=modes, engine="fast")
    results["teacher_documents_embedded_for_evaluation"] = left
    out = Path(cfg.out) / "eval"
    write_report(results, out)
    scores = {row["mode"]: float(row["scores"][data.name]) for row in results["rows"]}
    atomic.write_text(Path(cfg.out) / "report.md", report_markdown(cfg, data, scores, model))
    atomic.write_bytes(Path(cfg.out) / "scores.png", scores_chart(results))
    return scores


def report_markdown(cfg: DistillConfig, data: RetrievalData, scores: dict[str, float], model: Path) -> str:
    """A short report: nDCG@10 of each mode and its share of the teacher's."""
    teacher = scores.get(Mode.TEACHER.value)
    if not teacher:
        raise LeafkdError("the evaluation has no teacher score")
    labels = {"teacher": "teacher (queries and documents)", "base": "base student, undistilled",
              "student": "student alone (queries and documents)",
              "asymmetric": "asymmetric: student queries, teacher documents (served)"}
    lines = [f"# leafkd distill: {data.name}", "",
             f"- corpus `{cfg.corpus}`: {data.size()['documents']} documents, {data.size()['queries']} judged queries",
             f"- teacher `{cfg.teacher}`, student `{model}` (base `{cfg.student}`), seed {cfg.seed}", "",
             "| mode | nDCG@10 | % of teacher |", "|---|---:|---:|"]
    for mode in ("teacher", "base", "student", "asymmetric"):
        if mode in scores:
            lines.append(f"| {labels[mode]} | {100 * scores[mode]:.2f} | {100 * scores[mode] / teacher:.1f}% |")
    lines += ["", "![scores](scores.png)", "", f"Serve it: `leafkd serve --index {Path(cfg.out) / 'index'} "
              f"--student {model}`", ""]
    return "\n".join(lines)
