"""Pointwise alignment losses: LEAF's squared L2, per-dimension MSE, and 1 - cosine."""

from __future__ import annotations

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


