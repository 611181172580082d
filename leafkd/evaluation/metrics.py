"""Retrieval and STS metrics: exact cosine search, nDCG@10 and recall@100 (as trec_eval), Spearman of cosine."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from leafkd.vectors import normalize


def search(Q: np.ndarray, D: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str], top_k: int = 100,
           ignore_identical_ids: bool = True, chunk: int = 1024,
           score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Exact search: the `top_k` documents per query by cosine (or `score_fn(Q_chunk, D)`), as a run dict.

    With `ignore_identical_ids`, a document whose id equals the query's is never returned (BEIR's rule).
    """
    if score_fn is None:
        Qn, Dn = normalize(Q), normalize(D)
        score_fn = lambda q, d: q @ d.T  # noqa: E731
    else:
        Qn, Dn = Q, D
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    k = min(top_k, len(doc_ids))
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(query_ids), chunk):
        S = np.asarray(score_fn(Qn[start:start + chunk], Dn), dtype=np.float32)
        if ignore_identical_ids:
            for r, qid in enumerate(query_ids[start:start + chunk]):
                j = doc_index.get(qid)
                if j is not None:
                    S[r, j] = -np.inf
        kk = min(k + 1, S.shape[1]) if ignore_identical_ids else k  # one spare for an excluded id
        if kk < S.shape[1]:
            part = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
        else:
            part = np.tile(np.arange(S.shape[1]), (len(S), 1))
        for r, qid in enumerate(query_ids[start:start + chunk]):
            cand = part[r]
            cand = cand[np.isfinite(S[r, cand])]
            order = sorted(cand.tolist(), key=lambda j: (-float(S[r, j]), NegStr(doc_ids[j])))[:k]
            run[qid] = {doc_ids[j]: float(S[r, j]) for j in order}
    return run


class NegStr(str):
    """A string that sorts in reverse (trec_eval breaks score ties by document id, descending)."""

    def __lt__(self, other):  # type: ignore[override]
        return str.__gt__(self, other)


def ndcg_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
              k: int = 10) -> dict[str, float]:
    """Per-query nDCG@k exactly as trec_eval's ``ndcg_cut_k`` (linear gains, ties by doc id descending)."""
    out: dict[str, float] = {}
    for qid, rels in qrels.items():
        if qid not in run:
            continue
        ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], NegStr(kv[0])))[:k]
        dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, (d, _) in enumerate(ranked))
        ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out[qid] = dcg / idcg if idcg > 0 else 0.0
    return out


def recall_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                k: int = 100) -> dict[str, float]:
    """Per-query recall@k over documents judged relevant (grade > 0)."""
    out: dict[str, float] = {}
    for qid, rels in qrels.items():
        if qid not in run:
            continue
        relevant = {d for d, g in rels.items() if g > 0}
        ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], NegStr(kv[0])))[:k]
        out[qid] = len(relevant & {d for d, _ in ranked}) / len(relevant) if relevant else 0.0
    return out


def have_pytrec_eval() -> bool:
    return importlib.util.find_spec("pytrec_eval") is not None


def retrieval_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                      backend: str = "auto") -> dict[str, float]:
    """Mean nDCG@10 and recall@100 over judged queries, by pytrec_eval (``auto`` when installed) or built-in."""
    if backend == "auto":
        backend = "pytrec_eval" if have_pytrec_eval() else "builtin"
    qrels = {q: r for q, r in qrels.items() if r}
    if backend == "pytrec_eval":
        import pytrec_eval

        ev = pytrec_eval.RelevanceEvaluator({q: dict(r) for q, r in qrels.items()}, {"ndcg_cut.10", "recall.100"})
        per = ev.evaluate({q: dict(r) for q, r in run.items()})
        ndcg = [v["ndcg_cut_10"] for v in per.values()]
        rec = [v["recall_100"] for v in per.values()]
    else:
        ndcg = list(ndcg_at_k(qrels, run, 10).values())
        rec = list(recall_at_k(qrels, run, 100).values())
    return {"ndcg_at_10": float(np.mean(ndcg)) if ndcg else 0.0, "recall_at_100": float(np.mean(rec)) if rec else 0.0}


def sts_metrics(a: np.ndarray, b: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation of pairwise cosine similarity with the gold scores."""
    from scipy.stats import pearsonr, spearmanr

    cos = (normalize(a) * normalize(b)).sum(1).astype(np.float64)
    return {"cosine_spearman": float(spearmanr(gold, cos)[0]), "cosine_pearson": float(pearsonr(gold, cos)[0])}


