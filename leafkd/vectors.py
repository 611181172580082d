"""Vector arithmetic every stage shares: L2 normalisation, the ridge map and k-means (one implementation each)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads in k-means only: the numpy helpers stay light for the CLI and the server's parser
    import torch


def normalize(x: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Float32, C-contiguous, L2-normalised rows (zero rows stay zero); ``copy=False`` may reuse a float32 input."""
    x = np.array(x, dtype=np.float32, order="C", copy=True) if copy else np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) for each row."""
    return np.sum(normalize(a) * normalize(b), axis=1)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression y ~ x W^T + b on centred data.

    `alpha` is relative: the penalty is alpha * mean eigenvalue of the centred Gram matrix, so one value suits
    inputs of any scale (a student's pooled vectors, a base model's unit vectors). Returns W [dy, dx] and b [dy].
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = alpha * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc).T
    b = my - w @ mx
    return w.astype(np.float32), b.astype(np.float32)


def _assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool, chunk: int = 16384) -> torch.Tensor:
    import torch

    if spherical:
        return torch.cat([(x[i : i + chunk] @ centroids.T).argmax(1) for i in range(0, len(x), chunk)])
    return torch.cat([torch.cdist(x[i : i + chunk], centroids).argmin(1) for i in range(0, len(x), chunk)])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kmeans(vectors: np.ndarray, k: int, *, spherical: bool = True, iters: int = 20, seed: int = 0,
           fit_samples: int = 50000, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, fitted on a seeded sample of at most `fit_samples` rows.

    ``spherical``: on unit vectors by cosine (centroids renormalised); otherwise Euclidean on the raw vectors.
    Returns centroids [k, D] and the labels of every row [n]; k is clamped to the number of rows.
    """
    import torch

    n = len(vectors)
    if n == 0:
        return np.zeros((0, np.shape(vectors)[1]), np.float32), np.zeros(0, np.int64)
    k = max(1, min(int(k), n))
    prepare = _unit if spherical else (lambda t: t)
    rng = np.random.default_rng([seed, 11])
    fit_idx = np.sort(rng.choice(n, size=min(n, fit_samples), replace=False))
    x = prepare(torch.as_tensor(np.asarray(vectors, dtype=np.float32)[fit_idx], device=device))

    def gap(j: int) -> torch.Tensor:  # distance of every point to point j: 1 - cos, or the squared L2
        return (1 - x @ x[j]).clamp_min(0) if spherical else (x - x[j]).pow(2).sum(1)

    g = torch.Generator(device="cpu").manual_seed(int(seed))
    chosen = [int(torch.randint(len(x), (1,), generator=g))]
    d = gap(chosen[0])
    for _ in range(1, k):
        total = float(d.sum())
        probs = (d / total).cpu() if total > 0 else torch.full((len(x),), 1.0 / len(x))
        j = int(torch.multinomial(probs, 1, generator=g))
        chosen.append(j)
        d = torch.minimum(d, gap(j))
    c = x[chosen].clone()
    for _ in range(iters):
        labels = _assign(x, c, spherical)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # re-seed empty clusters at the points farthest from their centroid
            far = torch.argsort((x * c[labels]).sum(1) if spherical else -(x - c[labels]).pow(2).sum(1))[: len(empty)]
            sums[empty] = x[far]
            counts[empty] = 1
        c = _unit(sums) if spherical else sums / counts.clamp_min(1)[:, None].to(sums.dtype)
    all_x = prepare(torch.as_tensor(np.asarray(vectors, dtype=np.float32), device=device))
    labels = _assign(all_x, c, spherical)
    return c.cpu().numpy(), labels.cpu().numpy().astype(np.int64)
