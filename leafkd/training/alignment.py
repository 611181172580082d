"""Held-out alignment between a student and its teacher: cosine distribution and neighbour agreement."""

from __future__ import annotations

import numpy as np

from leafkd.vectors import cosine_rows, normalize


def neighbour_agreement(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> float:
    """Mean overlap of top-k neighbours, asymmetric as in retrieval.

    For each pool text i: the teacher's neighbours are the top-k of t_i . t_j, the student's the top-k of
    s_i . t_j (a student query against teacher documents), j != i. Returns |overlap| / k averaged over i.
    """
    s, t = normalize(student), normalize(teacher)
    n = len(t)
    k = min(k, n - 1)
    if k <= 0:
        return float("nan")
    total = 0.0
    for start in range(0, n, 1024):
        stop = min(start + 1024, n)
        rows = np.arange(start, stop)
        sims_t = t[start:stop] @ t.T
        sims_s = s[start:stop] @ t.T
        sims_t[np.arange(stop - start), rows] = -np.inf
        sims_s[np.arange(stop - start), rows] = -np.inf
        top_t = np.argpartition(-sims_t, k, axis=1)[:, :k]
        top_s = np.argpartition(-sims_s, k, axis=1)[:, :k]
        for a, b in zip(top_t, top_s):
            total += len(np.intersect1d(a, b, assume_unique=True))
    return total / (n * k)


def heldout_alignment(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean and 5th-percentile cosine to the teacher, and top-k neighbour agreement."""
    cos = cosine_rows(student, teacher)
    return {
        "heldout_cos_mean": float(cos.mean()),
        "heldout_cos_p5": float(np.percentile(cos, 5)),
        f"top{k}_agreement": float(neighbour_agreement(student, teacher, k)),
    }


