"""Distillation losses. Each is a small module: ``loss(student [B, D], teacher [B, D]) -> scalar``.

Notation: s_i the student's vector of text i, t_i the teacher's, B the batch, D the dimension.

- `LeafL2Loss`      LEAF's alignment loss:        mean_i ||s_i - t_i||^2
- `MSELoss`         per-dimension MSE:            mean_i (1/D) ||s_i - t_i||^2
- `CosineLoss`      direction only:               mean_i (1 - cos(s_i, t_i))
- `LELPLoss`        subspace projections (LELP):  mean_i T^2 KL( softmax(P t_i / T) || softmax(P s_i / T) )
- `RelationalLoss`  in-batch relations:           mean_i tau^2 KL( softmax(t_i . t_j / tau)_j || softmax(s_i . t_j / tau)_j )
- `BankRelationalLoss` relations to a fixed bank:  mean_i tau^2 KL( softmax(t_i . k_j / tau)_j || softmax(s_i . k_j / tau)_j )
- `CombinedLoss`    sum_k w_k L_k, reporting each part.

Every loss is zero, with zero gradient, when the student equals the teacher.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LeafL2Loss(nn.Module):
    """Squared L2 distance to the teacher vector (LEAF). Invariant to a rotation applied to both sides."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (student - teacher).pow(2).sum(-1).mean()


class MSELoss(nn.Module):
    """Per-dimension mean squared error: LEAF's loss divided by D (scale-free across teacher sizes)."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (student - teacher).pow(2).mean()


class CosineLoss(nn.Module):
    """1 - cosine similarity. Invariant to rescaling the student's vectors by any positive factor."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()


def kmeans(x: Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Spherical-free Lloyd k-means with k-means++ seeding; returns centroids [k, D] and labels [N]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means with k={k} on {n} points")
    first = int(torch.randint(n, (1,), generator=g))
    centroids = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = int(torch.multinomial(probs.cpu(), 1, generator=g))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centroids)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return c, labels


class LELPHead(nn.Module):
    """Fixed projection directions P [C*S, D] built from the teacher's space (no trainable parameters).

    Pseudo-classes: k-means on teacher vectors (C clusters). Per class: the members' deviations from the
    class mean, with the span of all class means removed, give the top-S principal directions; a random
    orthonormal S x S rotation spreads variance evenly over them. Each direction is a pseudo-subclass.
    """

    def __init__(self, directions: Tensor, classes: int, subclasses: int):
        super().__init__()
        self.register_buffer("directions", directions)
        self.classes = classes
        self.subclasses = subclasses

    @classmethod
    def fit(cls, teacher_vectors: np.ndarray | Tensor, classes: int = 32, subclasses: int = 8,
            seed: int = 0) -> "LELPHead":
        x = torch.as_tensor(np.asarray(teacher_vectors, dtype=np.float32))
        d = x.shape[1]
        centroids, labels = kmeans(x, classes, seed=seed)
        q, _ = torch.linalg.qr(centroids.T)  # orthonormal basis of the class-mean span, [D, C]
        g = torch.Generator().manual_seed(seed + 1)
        blocks = []
        for c in range(classes):
            r = x[labels == c] - centroids[c]
            r = r - (r @ q) @ q.T
            s = min(subclasses, max(len(r), 1), d)
            if len(r) >= 2:
                _, _, vh = torch.linalg.svd(r, full_matrices=False)
                top = vh[:s]
            else:  # a singleton class: any directions orthogonal to the class means
                top = torch.linalg.qr(torch.randn(d, s, generator=g) - q @ (q.T @ torch.randn(d, s, generator=g)))[0].T
            if len(top) < subclasses:  # pad with random orthonormal directions
                extra = torch.randn(subclasses - len(top), d, generator=g)
                top = torch.cat([top, extra / extra.norm(dim=1, keepdim=True)])
            rot, _ = torch.linalg.qr(torch.randn(subclasses, subclasses, generator=g))
            blocks.append(rot @ top)
        return cls(torch.cat(blocks).contiguous(), classes, subclasses)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.directions.to(x.dtype).T


class LELPLoss(nn.Module):
    """KL between the teacher's and the student's distributions over the C x S pseudo-subclasses.

    p = softmax(P v / T) for v = teacher or student vector; loss = T^2 * KL(p_teacher || p_student).
    The head is shared and fixed, so this adds no trainable parameters. Invariant to components of the
    student's error orthogonal to every direction in P.
    """

    def __init__(self, head: LELPHead, temperature: float = 0.05):
        super().__init__()
        self.head = head
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(self.head(student) / t, dim=-1)
        log_p_t = F.log_softmax(self.head(teacher) / t, dim=-1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


def relational_kl(student: Tensor, teacher: Tensor, keys: Tensor, tau: float) -> Tensor:
    """tau^2 * mean_i KL(softmax(t_i K^T / tau) || softmax(s_i K^T / tau)): how student i ranks the keys vs teacher i."""
    log_p_s = F.log_softmax(student @ keys.T / tau, dim=-1)
    log_p_t = F.log_softmax(teacher @ keys.T / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * tau * tau


class RelationalLoss(nn.Module):
    """In-batch relations: the student query i should rank the batch's teacher documents as the teacher does.

    logits_s = s t^T / tau, logits_t = t t^T / tau; loss = tau^2 * mean_i KL(softmax(logits_t_i) || softmax(logits_s_i)).
    Invariant to a rotation applied to both student and teacher.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor, keys: Tensor | None = None) -> Tensor:
        """``keys``: the teacher vectors of the whole batch when ``student``/``teacher`` are one rank's rows of it
        (distributed training): each row's loss only needs its own vectors and the batch's teacher vectors."""
        return relational_kl(student, teacher, teacher if keys is None else keys, self.temperature)


class BankRelationalLoss(nn.Module):
    """The student query i should rank a fixed bank of teacher vectors k_j as the teacher's vector of i does.

    The bank is what the student will be compared against in asymmetric retrieval: the teacher vectors of the
    index's documents (or a sample of the training texts' when no index is named). Unlike the in-batch
    `RelationalLoss`, whose random batch makes the teacher's distribution almost one-hot on the text itself, the
    bank holds each text's near neighbours, so the loss weighs the student's error by how it reorders them.
    loss = tau^2 * mean_i KL(softmax(t_i K^T / tau) || softmax(s_i K^T / tau)). Teacher vectors only: no labels.
    """

    def __init__(self, bank: Tensor | np.ndarray, temperature: float = 0.05):
        super().__init__()
        bank = torch.as_tensor(np.asarray(bank, dtype=np.float32))
        if bank.ndim != 2 or len(bank) < 2:
            raise ValueError(f"a relational bank needs at least 2 vectors, got shape {tuple(bank.shape)}")
        self.register_buffer("bank", bank.contiguous())
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return relational_kl(student, teacher, self.bank.to(student.dtype), self.temperature)


class CombinedLoss(nn.Module):
    """Weighted sum of named losses; `forward` returns the total and each weighted part (detached)."""

    def __init__(self, parts: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        if not parts:
            raise ValueError("CombinedLoss needs at least one loss with a non-zero weight")
        self.weights = {name: float(w) for name, (w, _) in parts.items()}
        self.losses = nn.ModuleDict({name: m for name, (_, m) in parts.items()})

    def forward(self, student: Tensor, teacher: Tensor, keys: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        total = student.new_zeros(())
        report: dict[str, float] = {}
        for name, module in self.losses.items():
            if keys is not None and isinstance(module, RelationalLoss):
                value = module(student, teacher, keys) * self.weights[name]
            else:
                value = module(student, teacher) * self.weights[name]
            total = total + value
            report[name] = value.detach()
        return total, report

