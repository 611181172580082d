"""Student-vs-teacher diagnostics on evaluation text: cosine, top-10 agreement, Matryoshka truncation, quantisation.

Quantisation itself is sentence-transformers' `quantize_embeddings`; this module adds what it lacks: int8 codes
back to floats (bucket centres), packed-bit Hamming similarity, and nDCG@10 of each quantised search.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from leafkd.errors import LeafkdError
from leafkd.evaluation.embedders import Embedder, LinearMapEmbedder, ModelSet
from leafkd.evaluation.metrics import retrieval_metrics, search
from leafkd.evaluation.tasks import RetrievalData, STSData, TaskData
from leafkd.vectors import normalize

logger = logging.getLogger(__name__)

TRUNCATE_DIMS = (512, 256, 128, 64)

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Quantization(StrEnum):
    """How vectors are stored for the quantisation diagnostic (both sides, except ``binary_float_query``)."""

    FLOAT32 = "float32"
    INT8 = "int8"  # 256 levels per dimension, ranges calibrated on the documents
    BINARY = "binary"  # sign bits, scored by Hamming similarity
    BINARY_FLOAT_QUERY = "binary_float_query"  # sign-bit documents scored against float queries


def truncate(x: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` coordinates (Matryoshka truncation), renormalised."""
    return normalize(np.asarray(x)[:, :dim])


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
    """Per-dimension [minimum; maximum] of calibration vectors ([2, dim]), as `quantize_embeddings` uses them."""
    x = np.asarray(calibration, dtype=np.float32)
    return np.vstack((x.min(0), x.max(0)))


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Float vectors from `quantize_embeddings(..., "int8", ranges=ranges)` codes: the centre of each bucket.

    sentence-transformers truncates (level = floor((x - min) / step), step = (max - min) / 255, clipped to 0..255,
    minus 128), so level k holds [min + k step, min + (k + 1) step) and its centre is within step / 2 of every
    value inside the calibration range. A dimension with max == min decodes to min.
    """
    ranges = np.asarray(ranges, dtype=np.float32)
    width = ranges[1] - ranges[0]
    step = width / 255
    level = codes.astype(np.float32) + 128
    return (ranges[0] + np.where(width > 0, (level + 0.5) * step, 0.0)).astype(np.float32)


def hamming_similarity(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """dim - 2 * Hamming distance between packed bit vectors (the dot product of the +-1 vectors)."""
    ones = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int32)
    out = np.empty((len(a), len(b)), dtype=np.float32)
    for i in range(len(a)):
        out[i] = dim - 2 * ones[np.bitwise_xor(a[i][None, :], b)].sum(1)
    return out


def _dot(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    return q @ d.T


def _quantize(x: np.ndarray, precision: Literal["int8", "ubinary"], ranges: np.ndarray | None = None) -> np.ndarray:
    """sentence-transformers' `quantize_embeddings` on one matrix (typed: a matrix in, a matrix out)."""
    from sentence_transformers import quantize_embeddings

    return np.asarray(quantize_embeddings(x, precision, ranges=ranges))


def quantized_scores(Q: np.ndarray, D: np.ndarray, kind: Quantization | str) -> tuple[np.ndarray, np.ndarray, ScoreFn]:
    """Transformed (Q, D) and a score function for a quantisation kind (int8 ranges calibrated on documents).

    int8 vectors are scored as the cosine of their decoded bucket centres. sentence-transformers' int8 truncates
    where leafkd's own quantiser (before issue 17) rounded to the nearest of 256 levels spanning [min, max]: the
    bucket edges moved by half a step, so recorded int8 nDCG@10 numbers may move slightly (float32 and binary
    numbers are unchanged).
    """
    kind = Quantization(kind)
    Q, D = np.asarray(Q, dtype=np.float32), np.asarray(D, dtype=np.float32)
    if kind is Quantization.FLOAT32:
        return normalize(Q), normalize(D), _dot
    if kind is Quantization.INT8:
        ranges = int8_ranges(D)
        q, d = (normalize(dequantize_int8(_quantize(x, "int8", ranges), ranges)) for x in (Q, D))
        return q, d, _dot
    bits = _quantize(D, "ubinary")
    dim = Q.shape[1]
    if kind is Quantization.BINARY:
        return _quantize(Q, "ubinary"), bits, lambda q, d: hamming_similarity(q, d, dim)
    signs = np.unpackbits(bits, axis=1, count=dim).astype(np.float32) * 2 - 1  # q . sign(d)
    return normalize(Q), signs, _dot


def _ndcg_of(Q: np.ndarray, D: np.ndarray, data: RetrievalData, kind: Quantization = Quantization.FLOAT32,
             ignore_identical_ids: bool = True) -> float:
    q, d, fn = quantized_scores(Q, D, kind)
    run = search(q, d, data.query_ids, data.doc_ids, top_k=10, ignore_identical_ids=ignore_identical_ids, score_fn=fn)
    return retrieval_metrics(data.qrels, run)["ndcg_at_10"]


def cosine_summary(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Distribution of row-wise cosine similarity between two views of the same texts."""
    c = (normalize(a) * normalize(b)).sum(1)
    return {"n": int(len(c)), "mean": float(c.mean()), "p5": float(np.percentile(c, 5)),
            "median": float(np.median(c)), "min": float(c.min())}


def retrieval_agreement(Qa: np.ndarray, Qb: np.ndarray, D: np.ndarray, data: RetrievalData, k: int = 10,
                        ignore_identical_ids: bool = True) -> float:
    """Mean overlap (0..1) of the top-k documents that two query encoders retrieve from the same documents."""
    ra = search(Qa, D, data.query_ids, data.doc_ids, top_k=k, ignore_identical_ids=ignore_identical_ids)
    rb = search(Qb, D, data.query_ids, data.doc_ids, top_k=k, ignore_identical_ids=ignore_identical_ids)
    return float(np.mean([len(set(ra[q]) & set(rb[q])) / k for q in data.query_ids]))


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def _retrieval_diagnostics(student: Embedder, teacher: Embedder, ridge: Embedder | None, data: RetrievalData,
                           rng: np.random.Generator, max_docs: int, dims: Sequence[int],
                           ignore_identical_ids: bool) -> dict[str, Any]:
    Tq, Td = teacher.embed(data.query_texts, "query"), teacher.embed(data.doc_texts, "document")
    Sq = student.embed(data.query_texts, "query")
    idx = _sample(len(data.doc_texts), max_docs, rng)
    Sd = student.embed([data.doc_texts[i] for i in idx], "document")
    agree = {"asymmetric": retrieval_agreement(Sq, Tq, Td, data, 10, ignore_identical_ids)}
    if ridge is not None:
        agree["ridge"] = retrieval_agreement(ridge.embed(data.query_texts, "query"), Tq, Td, data, 10,
                                             ignore_identical_ids)
    full = Td.shape[1]
    use_dims = [full] + [d for d in dims if d < full]
    queries = (("asymmetric", Sq), ("teacher", Tq))
    return {
        "cosine": {"queries": cosine_summary(Sq, Tq), "documents": cosine_summary(Sd, Td[idx])},
        "top10_agreement": agree,
        "truncation": {who: {str(d): _ndcg_of(truncate(Q, d), truncate(Td, d), data, Quantization.FLOAT32,
                                              ignore_identical_ids) for d in use_dims}
                       for who, Q in queries},
        "quantization": {who: {k.value: _ndcg_of(Q, Td, data, k, ignore_identical_ids) for k in Quantization}
                         for who, Q in queries},
    }


def _sts_diagnostics(student: Embedder, teacher: Embedder, data: STSData, rng: np.random.Generator,
                     max_docs: int) -> dict[str, Any]:
    texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
    sample = [texts[i] for i in _sample(len(texts), max_docs, rng)]
    return {"cosine": {"sentences": cosine_summary(student.embed(sample, None, prompts=False),
                                                   teacher.embed(sample, None, prompts=False))}}


def alignment_diagnostics(models: ModelSet, datas: Sequence[TaskData], *, max_docs: int = 2000, seed: int = 0,
                          dims: Sequence[int] = TRUNCATE_DIMS, ignore_identical_ids: bool = True) -> dict[str, Any]:
    """Student-vs-teacher diagnostics per task on held-out (evaluation) text.

    - ``cosine``: cos(student(x), teacher(x)) over queries and a sample of documents (retrieval) or sentences (STS);
    - ``top10_agreement``: overlap of the top-10 documents for student queries vs teacher queries (teacher documents);
    - ``truncation``: asymmetric and teacher nDCG@10 on the first 512/256/128/64 dimensions;
    - ``quantization``: asymmetric and teacher nDCG@10 for each `Quantization` kind.
    """
    student, teacher = models.student, models.teacher
    if student is None or teacher is None:
        raise LeafkdError("--alignment needs both a student and a teacher")
    ridge = None if models.ridge is None or models.base is None else LinearMapEmbedder(models.base, models.ridge)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for data in datas:
        t0 = time.perf_counter()
        if isinstance(data, RetrievalData):
            res = _retrieval_diagnostics(student, teacher, ridge, data, rng, max_docs, dims, ignore_identical_ids)
        else:
            res = _sts_diagnostics(student, teacher, data, rng, max_docs)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out[data.name] = res
        c = res["cosine"].get("queries") or res["cosine"]["sentences"]
        top10 = f"  top10 {res['top10_agreement']['asymmetric']:.3f}" if "top10_agreement" in res else ""
        logger.info(f"alignment  {data.name:<14} cos mean {c['mean']:.3f} p5 {c['p5']:.3f}{top10}")
    return out
