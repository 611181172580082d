"""Teacher-guided data selection (issue 8): train on the texts that teach the student most.

The teacher's vectors are already captured, so the student-teacher gap of every text is cheap to know once the
student exists (after the ridge warm start, and again during training). This module scores the training pool:

- **guard** (`degenerate_mask`): texts that are empty after tokenisation, whose teacher vector has (near-)zero
  norm or is not finite, or is an extreme outlier (robust z-score of its log-norm, or of its cosine to the
  mean direction) are reported and dropped from training;
- **diversity** (`leafkd.vectors.kmeans`, `near_duplicates`): k-means clusters of the teacher's unit vectors, and
  removal of near-duplicates (teacher cosine >= a threshold, searched within each cluster);
- **difficulty** (`difficulty`): 1 - cos (or squared L2) between the current student and the teacher;

and then either picks a training subset (`select_subset`: per-cluster quotas, difficulty-proportional sampling
without replacement inside each cluster) or reweights the sampler (`reweight`: expected visits per epoch from
the difficulty, tempered, clipped and cluster-balanced). `Selector` is the hook the trainer uses: it prepares the
pool before training, selects after the warm start, refreshes every N steps (applied from the next epoch, and
carried in checkpoints, so a resumed run is identical) and writes `selection.npz` / `selection.json` into the
run folder. Everything is a pure function of the seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leafkd import atomic
from leafkd.errors import LeafkdError
from leafkd.training.config import SelectMode, TrainConfig
from leafkd.vectors import cosine_rows, kmeans

logger = logging.getLogger(__name__)

REASONS = ("nonfinite", "empty", "zero_norm", "outlier_norm", "outlier_direction", "duplicate")


# -- guard ------------------------------------------------------------------------------------------------
def _robust_z(x: np.ndarray, floor: float) -> np.ndarray:
    med = np.median(x)
    scale = max(1.4826 * float(np.median(np.abs(x - med))), floor)
    return (x - med) / scale


def degenerate_mask(texts: Sequence[str], token_lengths: np.ndarray, teacher_vectors: np.ndarray, *,
                    min_tokens: int = 3, min_norm_ratio: float = 1e-3, outlier_z: float = 8.0,
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Which texts carry a usable teacher vector.

    Returns `keep` (bool [n]) and, for each reason, the indices dropped for it (a text is counted under its
    first reason only): `nonfinite` (NaN/inf in the vector), `empty` (blank text, or fewer than `min_tokens`
    tokens including the special ones: nothing but [CLS] [SEP]), `zero_norm` (norm below `min_norm_ratio` x the
    median norm), `outlier_norm` (|robust z| of the log-norm above `outlier_z`), `outlier_direction` (cosine to
    the mean direction more than `outlier_z` robust deviations below the median).
    """
    v = np.asarray(teacher_vectors, dtype=np.float32)
    n = len(v)
    if len(texts) != n or len(token_lengths) != n:
        raise LeafkdError(f"degenerate_mask: {len(texts)} texts, {len(token_lengths)} lengths, {n} vectors")
    reason = np.full(n, -1, dtype=np.int64)

    def mark(mask: np.ndarray, code: int) -> None:
        reason[(reason < 0) & mask] = code

    finite = np.asarray(np.isfinite(v).all(axis=1))
    mark(~finite, 0)
    v = np.where(finite[:, None], v, 0.0)
    empty = np.fromiter((not t.strip() for t in texts), dtype=bool, count=n) | (np.asarray(token_lengths) < min_tokens)
    mark(empty, 1)
    norms = np.linalg.norm(v, axis=1)
    ok = (reason < 0)
    med = float(np.median(norms[ok])) if ok.any() else 0.0
    mark(norms <= max(min_norm_ratio * med, 1e-12), 2)
    ok = reason < 0
    if ok.sum() >= 10:
        z = np.zeros(n)
        z[ok] = _robust_z(np.log(norms[ok]), floor=0.05)
        mark(np.abs(z) > outlier_z, 3)
        ok = reason < 0
        unit = v[ok] / norms[ok, None]
        mean = unit.mean(0)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        z = np.zeros(n)
        z[ok] = _robust_z(unit @ mean, floor=0.02)
        mark(z < -outlier_z, 4)
    dropped = {name: np.flatnonzero(reason == code) for code, name in enumerate(REASONS[:5])}
    return reason < 0, dropped


# -- diversity --------------------------------------------------------------------------------------------
def near_duplicates(vectors: np.ndarray, labels: np.ndarray, threshold: float = 0.98, *,
                    device: str | torch.device = "cpu", chunk: int = 4096) -> np.ndarray:
    """Greedy near-duplicate removal by cosine, searched within each cluster of `labels`.

    Rows are visited in index order; a row is a duplicate when an earlier row that was kept has cosine
    >= `threshold` with it. Returns `dup_of` [n]: the index of the kept row it duplicates, or -1.
    """
    n = len(vectors)
    dup_of = np.full(n, -1, dtype=np.int64)
    if threshold >= 1.0 + 1e-6 or n < 2:
        return dup_of
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        members = np.sort(members)
        u = F.normalize(torch.as_tensor(np.asarray(vectors, dtype=np.float32)[members], device=device), dim=1)
        earlier: dict[int, np.ndarray] = {}
        for s in range(0, len(members), chunk):
            sims = u[s : s + chunk] @ u.T
            rows = torch.arange(s, min(s + chunk, len(members)), device=sims.device)
            # only earlier rows count (j < i)
            sims.masked_fill_(torch.arange(len(members), device=sims.device)[None, :] >= rows[:, None], -2.0)
            hit_r, hit_c = torch.nonzero(sims >= threshold, as_tuple=True)
            if len(hit_r):
                rows_hit, cols_hit = (hit_r + s).cpu().numpy(), hit_c.cpu().numpy()
                split = np.flatnonzero(np.diff(rows_hit)) + 1
                for r, cols in zip(rows_hit[np.r_[0, split]], np.split(cols_hit, split)):
                    earlier[int(r)] = cols
        if not earlier:
            continue
        kept = np.ones(len(members), dtype=bool)
        for r in sorted(earlier):
            cols = earlier[r]
            alive = cols[kept[cols]]
            if len(alive):
                kept[r] = False
                dup_of[members[r]] = members[alive[0]]
    return dup_of


# -- difficulty and selection ------------------------------------------------------------------------------
def difficulty(student_vectors: np.ndarray, teacher_vectors: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """Per-text gap: 1 - cos(s_i, t_i) (`cosine`) or ||s_i - t_i||^2 (`l2`)."""
    if kind == "cosine":
        return (1.0 - cosine_rows(student_vectors, teacher_vectors)).astype(np.float64)
    if kind == "l2":
        s = np.asarray(student_vectors, dtype=np.float32)
        t = np.asarray(teacher_vectors, dtype=np.float32)
        return ((s - t) ** 2).sum(1).astype(np.float64)
    raise LeafkdError(f"difficulty kind must be cosine or l2, not {kind!r}")


def fill_by_cluster(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Replace NaN scores (unscored texts) by their cluster's mean score (or the global mean)."""
    scores = np.asarray(scores, dtype=np.float64).copy()
    known = ~np.isnan(scores)
    if not known.any():
        return np.ones_like(scores)
    k = int(labels.max()) + 1 if len(labels) else 0
    sums = np.bincount(labels[known], weights=scores[known], minlength=k)
    counts = np.bincount(labels[known], minlength=k)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), scores[known].mean())
    scores[~known] = means[labels[~known]]
    return scores


def tempered(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Sampling preference from difficulty: (d / mean d) ** (1 / T); T -> infinity is uniform."""
    if temperature <= 0:
        raise LeafkdError("select temperature must be > 0")
    d = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)
    mean = d.mean() if len(d) and d.mean() > 0 else 1.0
    return np.maximum(d / mean, 1e-6) ** (1.0 / temperature)


def _allocate(total: int, mass: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Integer quotas summing to `total`, proportional to `mass`, capped by `caps` (water-filling), >= 1 each
    where total allows (largest remainder; deterministic)."""
    caps = caps.astype(np.int64)
    total = int(min(total, caps.sum()))
    quota = np.zeros(len(caps), dtype=np.int64)
    if total <= 0:
        return quota
    if total >= np.count_nonzero(caps):
        quota[caps > 0] = 1
    while quota.sum() < total:
        open_ = quota < caps
        left = total - quota.sum()
        m = np.where(open_, mass, 0.0)
        if m.sum() <= 0:
            m = open_.astype(np.float64)
        share = left * m / m.sum()
        add = np.minimum(np.floor(share).astype(np.int64), caps - quota)
        if add.sum() == 0:  # hand out the remainder one by one, largest fractional share first
            frac = np.where(open_, share - np.floor(share), -1.0)
            for j in np.argsort(-frac, kind="stable")[: left]:
                if quota[j] < caps[j]:
                    quota[j] += 1
            continue
        quota += add
    return quota


def select_subset(scores: np.ndarray, labels: np.ndarray, size: int, *, temperature: float = 1.0,
                  diversity: float = 0.5, seed: int = 0) -> np.ndarray:
    """Positions (into `scores`) of a training subset of `size` texts.

    Each cluster c gets a quota proportional to n_c^-diversity x sum of its texts' tempered difficulty (at least
    one per cluster when size allows; capped at its size); inside a cluster, texts are drawn without replacement
    with probability proportional to tempered difficulty (Efraimidis-Spirakis keys). diversity=0: plain
    difficulty-proportional; 1: every cluster's share is its mean difficulty, whatever its size.
    """
    n = len(scores)
    size = int(min(max(size, 0), n))
    labels = np.asarray(labels, dtype=np.int64)
    p = tempered(scores, temperature)
    k = int(labels.max()) + 1 if n else 0
    counts = np.bincount(labels, minlength=k)
    mass = np.bincount(labels, weights=p, minlength=k) * np.maximum(counts, 1).astype(np.float64) ** (-diversity)
    quota = _allocate(size, mass, counts)
    rng = np.random.default_rng([seed, 23])
    keys = np.log(rng.random(n)) / p  # larger is better; top-q per cluster = weighted sampling w/o replacement
    order = np.lexsort((-keys, labels))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    chosen = [order[starts[c] : starts[c] + quota[c]] for c in range(k) if quota[c]]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def reweight(scores: np.ndarray, labels: np.ndarray, base_weights: np.ndarray, *, temperature: float = 1.0,
             diversity: float = 0.5, max_ratio: float = 4.0) -> np.ndarray:
    """Expected visits per epoch for each text: base weight x factor, factor proportional to
    tempered difficulty x n_c^-diversity, clipped to [1/max_ratio, max_ratio] of the mean, rescaled so the
    total (the epoch length) equals the base total."""
    base = np.asarray(base_weights, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if not len(base):
        return base.copy()
    counts = np.bincount(labels, minlength=int(labels.max()) + 1).astype(np.float64)
    f = tempered(scores, temperature) * np.maximum(counts[labels], 1.0) ** (-diversity)
    target = base.sum()
    for _ in range(20):
        f = f * target / max(float((base * f).sum()), 1e-12)
        clipped = np.clip(f, 1.0 / max_ratio, max_ratio)
        if np.allclose(clipped, f):
            break
        f = clipped
    return base * f


# -- the training hook -------------------------------------------------------------------------------------
def _save_npz(path: Path, **arrays) -> None:
    with atomic.atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


class Selector:
    """Selection inside a training run (see `leafkd.train`): pool, scores, current and pending sampler state."""

    def __init__(self, cfg: TrainConfig, texts: Sequence[str], teacher: np.ndarray, train_idx: np.ndarray,
                 weights: np.ndarray, lengths: np.ndarray, out: Path, device: str | torch.device = "cpu"):
        self.cfg, self.teacher, self.out, self.device = cfg, teacher, Path(out), device
        self.mode = cfg.select
        self.base_weights = np.asarray(weights, dtype=np.float64)
        self.refreshes = 0
        self.pending: tuple[np.ndarray, np.ndarray] | None = None
        self.history: list[dict] = []
        t0 = time.perf_counter()
        n = len(texts)
        self.reason = np.full(n, "", dtype=object)
        train_idx = np.asarray(train_idx, dtype=np.int64)
        keep = np.ones(n, dtype=bool)
        self.dropped: dict[str, list[int]] = {}
        if cfg.drop_degenerate:
            keep, dropped = degenerate_mask(texts, lengths, teacher)
            self.dropped = {k: v.tolist() for k, v in dropped.items()}
        train_keep = keep[train_idx]
        heldout_bad = int((~keep).sum() - (~train_keep).sum())
        pool = train_idx[train_keep]
        self.labels = np.full(n, -1, dtype=np.int64)
        self.dup_of = np.full(n, -1, dtype=np.int64)
        if self.mode != SelectMode.NONE and len(pool):
            k = max(1, min(cfg.select_clusters, len(pool) // 10))
            _, self.labels[pool] = kmeans(teacher[pool], k, seed=cfg.seed, device=device)
            if cfg.dedup_threshold < 1.0:
                dup = near_duplicates(teacher[pool], self.labels[pool], cfg.dedup_threshold, device=device)
                self.dup_of[pool] = np.where(dup >= 0, pool[np.maximum(dup, 0)], -1)
                self.dropped["duplicate"] = pool[dup >= 0].tolist()
                pool = pool[dup < 0]
        self.pool = pool
        self.clusters = int(self.labels.max()) + 1 if self.mode != SelectMode.NONE and len(pool) else 0
        if self.mode == SelectMode.SUBSET:
            size = cfg.select_size if cfg.select_size is not None else int(round(cfg.select_fraction * len(pool)))
            self.size = int(min(max(size, 1), len(pool)))
        else:
            self.size = len(pool)
        self.scores = np.full(n, np.nan)
        self.chosen = pool
        self.sampler_weights = self.base_weights.copy()
        counts = {k: len(v) for k, v in self.dropped.items()}
        self.summary = {"mode": self.mode, "texts": n, "train_texts": int(len(train_idx)),
                        "dropped": counts, "heldout_degenerate_kept": heldout_bad, "pool": int(len(pool)),
                        "clusters": self.clusters, "size": self.size, "prepare_seconds": time.perf_counter() - t0}
        if any(counts.values()):
            logger.info("selection: dropped " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                + (f" (and {heldout_bad} degenerate held-out texts kept for comparability)" if heldout_bad else ""))

    # The pool and the budget the sampler is built with before selection (subset: the subset's expected size).
    def initial(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.base_weights.copy()
        if self.mode == SelectMode.SUBSET and len(self.pool):
            w[self.pool] *= self.size / len(self.pool)
        return self.pool, w

    def _score(self, student, tokens, round_: int, exclude: np.ndarray | None = None) -> np.ndarray:
        from leafkd.runtime.encode import encode_tokens

        limit = self.cfg.select_score_texts
        idx = self.pool if exclude is None else np.setdiff1d(self.pool, exclude)
        scores = np.full(len(self.teacher), np.nan)
        if not len(idx):
            return scores
        if limit and len(idx) > limit:
            rng = np.random.default_rng([self.cfg.seed, 31, round_])
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        from leafkd.runtime import distributed as dist_

        # Distributed: rank 0 scores and every rank takes its scores, so all ranks build the same batches.
        if dist_.is_main():
            vecs = encode_tokens(student, tokens.take(idx), device=self.device)
            assert vecs is not None
            scores[idx] = difficulty(vecs, self.teacher[idx].astype(np.float32))
        return dist_.broadcast_object(scores)

    def _choose(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        pool, cfg = self.pool, self.cfg
        est = fill_by_cluster(self.scores[pool], self.labels[pool])
        weights = self.base_weights.copy()
        if self.mode == SelectMode.SUBSET:
            pos = select_subset(est, self.labels[pool], self.size, temperature=cfg.select_temperature,
                                diversity=cfg.select_diversity, seed=cfg.seed + 1000 * round_)
            return pool[pos], weights
        weights[pool] = reweight(est, self.labels[pool], self.base_weights[pool], temperature=cfg.select_temperature,
                                 diversity=cfg.select_diversity, max_ratio=cfg.select_max_weight)
        return pool, weights

    def start(self, student, tokens, sampler, exclude: np.ndarray | None = None) -> None:
        """After the warm start: score, select, set the sampler (the first epoch uses it), write the files.

        `exclude`: texts not to score (the ridge fit's own texts, whose gap is optimistically small); they get
        their cluster's mean like any unscored text.
        """
        sampler.indices, sampler.weights = self.pool, self.sampler_weights
        if self.mode == SelectMode.NONE or not len(self.pool):
            self.save()
            return
        t0 = time.perf_counter()
        self.scores = self._score(student, tokens, 0, exclude)
        self.chosen, self.sampler_weights = self._choose(0)
        sampler.indices, sampler.weights = self.chosen, self.sampler_weights
        self._record(0, 0, time.perf_counter() - t0)
        self.save()

    def maybe_refresh(self, step: int, student, tokens) -> None:
        """Every `select_refresh_every` steps: re-score and re-select; the sampler takes it at the next epoch."""
        every = self.cfg.select_refresh_every
        if self.mode == SelectMode.NONE or not every or step % every or not len(self.pool):
            return
        t0 = time.perf_counter()
        self.refreshes += 1
        self.scores = self._score(student, tokens, self.refreshes)
        self.pending = self._choose(self.refreshes)
        self._record(self.refreshes, step, time.perf_counter() - t0)
        self.save()

    def new_epoch(self, sampler) -> None:
        if self.pending is not None:
            self.chosen, self.sampler_weights = self.pending
            self.pending = None
            sampler.indices, sampler.weights = self.chosen, self.sampler_weights

    def _record(self, round_: int, step: int, seconds: float) -> None:
        scored = self.scores[~np.isnan(self.scores)]
        rec = {"round": round_, "step": step, "scored": int(len(scored)), "seconds": round(seconds, 3),
               "difficulty_mean": float(scored.mean()) if len(scored) else None,
               "difficulty_p50": float(np.median(scored)) if len(scored) else None,
               "difficulty_p95": float(np.percentile(scored, 95)) if len(scored) else None}
        chosen, w = self.pending if self.pending is not None else (self.chosen, self.sampler_weights)
        if self.mode == SelectMode.SUBSET:
            rec["chosen"] = int(len(chosen))
            rec["clusters_covered"] = int(len(np.unique(self.labels[chosen])))
            sc = self.scores[chosen]
            sc = sc[~np.isnan(sc)]
            rec["chosen_difficulty_mean"] = float(sc.mean()) if len(sc) else None
        else:
            wp = w[self.pool] / np.maximum(self.base_weights[self.pool], 1e-12)
            rec["weight_factor_min"], rec["weight_factor_max"] = float(wp.min()), float(wp.max())
        self.history.append(rec)
        logger.info(f"selection round {round_} (step {step}): " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("round", "step")))

    def save(self) -> None:
        """`selection.npz` (arrays) and `selection.json` (summary, drops by reason, rounds) in the run folder."""
        from leafkd.runtime import distributed as dist_

        if not dist_.is_main():
            return
        n = len(self.teacher)
        chosen = np.zeros(n, dtype=bool)
        chosen[self.chosen] = True
        reason_code = np.full(n, -1, dtype=np.int8)
        for code, name in enumerate(REASONS):
            reason_code[np.asarray(self.dropped.get(name, []), dtype=np.int64)] = code
        _save_npz(self.out / "selection.npz", pool=self.pool, chosen=np.flatnonzero(chosen),
                  weights=self.sampler_weights, scores=self.scores, cluster=self.labels, duplicate_of=self.dup_of,
                  dropped_reason=reason_code, reasons=np.array(REASONS))
        info = {**self.summary, "chosen": int(chosen.sum()), "rounds": self.history,
                "options": {k: getattr(self.cfg, k) for k in ("select", "select_size", "select_fraction",
                            "select_temperature", "select_diversity", "select_max_weight", "select_clusters",
                            "select_refresh_every", "select_score_texts", "dedup_threshold", "drop_degenerate",
                            "seed")},
                "dropped_indices": {k: v[:1000] for k, v in self.dropped.items()}}
        atomic.write_json(self.out / "selection.json", info)

    def summary_for_model(self) -> dict:
        """What `leafkd.json` records: the summary, the final selection size and the last round."""
        return {**self.summary, "chosen": int(len(self.chosen)), "rounds": len(self.history),
                "last_round": self.history[-1] if self.history else None}

    def state_dict(self) -> dict:
        return {"refreshes": self.refreshes, "history": list(self.history), "scores": self.scores,
                "chosen": self.chosen, "weights": self.sampler_weights, "pending": self.pending}

    def load_state_dict(self, state: dict | None, sampler) -> None:
        if not state:
            self.start_without_scoring(sampler)
            return
        self.refreshes, self.history = state["refreshes"], list(state["history"])
        self.scores, self.chosen, self.sampler_weights = state["scores"], state["chosen"], state["weights"]
        self.pending = state["pending"]
        sampler.indices, sampler.weights = self.chosen, self.sampler_weights

    def start_without_scoring(self, sampler) -> None:
        sampler.indices, sampler.weights = self.chosen, self.sampler_weights


