"""LELP, adapted: fixed projection directions from the teacher's space (pseudo-classes and their principal
pseudo-subclasses) and a KL loss on the student's and teacher's distributions over them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leafkd.vectors import kmeans


class LELPHead(nn.Module):
    """Fixed projection directions P [C*S, D] built from the teacher's space (no trainable parameters).

    Pseudo-classes: k-means on teacher vectors (C clusters). Per class: the members' deviations from the
    class mean, with the span of all class means removed, give the top-S principal directions; a random
    orthonormal S x S rotation spreads variance evenly over them. Each direction is a pseudo-subclass.
    """

    directions: Tensor  # a buffer: it moves with the module, no gradient

    def __init__(self, directions: Tensor, classes: int, subclasses: int):
        super().__init__()
        self.register_buffer("directions", directions)
        self.classes = classes
        self.subclasses = subclasses

    @classmethod
    def fit(cls, teacher_vectors: np.ndarray | Tensor, classes: int = 32, subclasses: int = 8,
            seed: int = 0) -> LELPHead:
        x = torch.as_tensor(np.asarray(teacher_vectors, dtype=np.float32))
        d = x.shape[1]
        # Euclidean pseudo-classes on the raw teacher vectors, fitted on all of them.
        c, lab = kmeans(x.numpy(), classes, spherical=False, iters=25, seed=seed, fit_samples=len(x))
        centroids, labels = torch.from_numpy(c), torch.from_numpy(lab)
        q, _ = torch.linalg.qr(centroids.T)  # orthonormal basis of the class-mean span, [D, C]
        g = torch.Generator().manual_seed(seed + 1)
        blocks = []
        for k in range(classes):
            r = x[labels == k] - centroids[k]
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


