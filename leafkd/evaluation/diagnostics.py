"""Student-vs-teacher diagnostics on evaluation text: cosine, top-10 agreement, Matryoshka truncation, quantisation."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from leafkd.errors import LeafkdError
from leafkd.evaluation.embedders import LinearMapEmbedder, ModelSet
from leafkd.evaluation.metrics import retrieval_metrics, search
from leafkd.evaluation.tasks import RetrievalData, TaskData
from leafkd.vectors import normalize

csv.field_size_limit(sys.maxsize)


TRUNCATE_DIMS = (512, 256, 128, 64)


QUANTIZATIONS = ("float32", "int8", "binary")


def truncate(x: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` coordinates (Matryoshka truncation), renormalised."""
    return normalize(np.asarray(x)[:, :dim])


def int8_calibration(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (minimum, step) for 256-level scalar quantisation, from calibration vectors."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = x.min(0), x.max(0)
    return lo, np.maximum(hi - lo, 1e-12) / 255.0


def quantize_int8(x: np.ndarray, calibration: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per-dimension scalar quantisation to int8 (levels -128..127), ranges from `calibration` or `x`."""
    lo, step = calibration if calibration is not None else int8_calibration(x)
    q = np.rint((np.asarray(x, dtype=np.float32) - lo) / step) - 128
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_int8(q: np.ndarray, calibration: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    lo, step = calibration
    return ((q.astype(np.float32) + 128) * step + lo).astype(np.float32)


def quantize_binary(x: np.ndarray) -> np.ndarray:
    """Sign bits, packed 8 per byte (uint8, [n, ceil(dim/8)])."""
    return np.packbits(np.asarray(x) > 0, axis=1)


def hamming_similarity(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """dim - 2 * Hamming distance between packed bit vectors (the dot product of the +-1 vectors)."""
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int32)
    out = np.empty((len(a), len(b)), dtype=np.float32)
    for i in range(len(a)):
        out[i] = dim - 2 * table[np.bitwise_xor(a[i][None, :], b)].sum(1)
    return out


def quantized_scores(Q: np.ndarray, D: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, Callable]:
    """Transformed (Q, D) and a score function for a quantisation kind (ranges calibrated on documents)."""
    if kind == "float32":
        return normalize(Q), normalize(D), lambda q, d: q @ d.T
    if kind == "int8":
        cal = int8_calibration(D)
        return (normalize(dequantize_int8(quantize_int8(Q, cal), cal)),
                normalize(dequantize_int8(quantize_int8(D, cal), cal)), lambda q, d: q @ d.T)
    if kind == "binary":
        dim = Q.shape[1]
        return quantize_binary(Q), quantize_binary(D), lambda q, d: hamming_similarity(q, d, dim)
    if kind == "binary_float_query":  # binary documents, float queries: q . sign(d)
        return normalize(Q), np.where(D > 0, 1.0, -1.0).astype(np.float32), lambda q, d: q @ d.T
    raise ValueError(f"unknown quantisation {kind!r}")


def _ndcg_of(Q: np.ndarray, D: np.ndarray, data: RetrievalData, kind: str = "float32",
             ignore_identical_ids: bool = True) -> float:
    q, d, fn = quantized_scores(Q, D, kind)
    run = search(q, d, data.query_ids, data.doc_ids, top_k=10, ignore_identical_ids=ignore_identical_ids, score_fn=fn)
    return retrieval_metrics(data.qrels, run)["ndcg_at_10"]


def cosine_summary(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Distribution of row-wise cosine similarity between two views of the same texts."""
    c = (normalize(a) * normalize(b)).sum(1)
    return {"n": int(len(c)), "mean": float(c.mean()), "p5": float(np.percentile(c, 5)),
            "median": float(np.median(c)), "min": float(c.min())}


def neighbour_agreement(Qa: np.ndarray, Qb: np.ndarray, D: np.ndarray, data: RetrievalData, k: int = 10,
                        ignore_identical_ids: bool = True) -> float:
    """Mean overlap (0..1) of the top-k documents retrieved for each query by two query encoders."""
    ra = search(Qa, D, data.query_ids, data.doc_ids, top_k=k, ignore_identical_ids=ignore_identical_ids)
    rb = search(Qb, D, data.query_ids, data.doc_ids, top_k=k, ignore_identical_ids=ignore_identical_ids)
    return float(np.mean([len(set(ra[q]) & set(rb[q])) / k for q in data.query_ids]))


def alignment_diagnostics(models: ModelSet, datas: Sequence[TaskData], *, max_docs: int = 2000, seed: int = 0,
              dims: Sequence[int] = TRUNCATE_DIMS, ignore_identical_ids: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Student-vs-teacher diagnostics per task on held-out (evaluation) text.

    - ``cosine``: cos(student(x), teacher(x)) over queries and a sample of documents (retrieval) or sentences (STS);
    - ``top10_agreement``: overlap of the top-10 documents for student queries vs teacher queries (teacher documents);
    - ``truncation``: asymmetric and teacher nDCG@10 on the first 512/256/128/64 dimensions;
    - ``quantization``: asymmetric and teacher nDCG@10 with int8 / binary vectors (both sides), and binary documents
      scored against float queries.
    """
    if models.student is None or models.teacher is None:
        raise LeafkdError("--alignment needs both a student and a teacher")
    S, T = models.student, models.teacher
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for data in datas:
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        if isinstance(data, RetrievalData):
            Tq, Td = T.embed(data.query_texts, "query"), T.embed(data.doc_texts, "document")
            Sq = S.embed(data.query_texts, "query")
            idx = np.sort(rng.choice(len(data.doc_texts), size=min(max_docs, len(data.doc_texts)), replace=False))
            sample = [data.doc_texts[i] for i in idx]
            Sd = S.embed(sample, "document")
            res["cosine"] = {"queries": cosine_summary(Sq, Tq), "documents": cosine_summary(Sd, Td[idx])}
            agree = {"asymmetric": neighbour_agreement(Sq, Tq, Td, data, 10, ignore_identical_ids)}
            if models.ridge is not None and models.base is not None:
                Rq = LinearMapEmbedder(models.base, models.ridge).embed(data.query_texts, "query")
                agree["ridge"] = neighbour_agreement(Rq, Tq, Td, data, 10, ignore_identical_ids)
            res["top10_agreement"] = agree
            full = Td.shape[1]
            use_dims = [full] + [d for d in dims if d < full]
            res["truncation"] = {
                who: {str(d): _ndcg_of(truncate(Q, d), truncate(Td, d), data, "float32", ignore_identical_ids)
                      for d in use_dims}
                for who, Q in (("asymmetric", Sq), ("teacher", Tq))}
            res["quantization"] = {
                who: {k: _ndcg_of(Q, Td, data, k, ignore_identical_ids)
                      for k in ("float32", "int8", "binary", "binary_float_query")}
                for who, Q in (("asymmetric", Sq), ("teacher", Tq))}
        else:
            texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
            idx = np.sort(rng.choice(len(texts), size=min(max_docs, len(texts)), replace=False))
            sample = [texts[i] for i in idx]
            res["cosine"] = {"sentences": cosine_summary(S.embed(sample, None, prompts=False),
                                                         T.embed(sample, None, prompts=False))}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out[data.name] = res
        if log:
            c = res["cosine"].get("queries") or res["cosine"]["sentences"]
            extra = f"  top10 {res['top10_agreement']['asymmetric']:.3f}" if "top10_agreement" in res else ""
            log(f"alignment  {data.name:<14} cos mean {c['mean']:.3f} p5 {c['p5']:.3f}{extra}")
    return out


