"""Relational KL losses: the student should rank keys (the batch's, or a fixed bank of teacher vectors) as the
teacher does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relational_kl(student: Tensor, teacher: Tensor, keys: Tensor, tau: float) -> Tensor:
    """tau^2 * mean_i KL(softmax(t_i K^T / tau) || softmax(s_i K^T / tau)): student i ranks the keys as teacher i?"""
    log_p_s = F.log_softmax(student @ keys.T / tau, dim=-1)
    log_p_t = F.log_softmax(teacher @ keys.T / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * tau * tau


class RelationalLoss(nn.Module):
    """In-batch relations: the student query i should rank the batch's teacher documents as the teacher does.

    logits_s = s t^T / tau, logits_t = t t^T / tau;
    loss = tau^2 * mean_i KL(softmax(logits_t_i) || softmax(logits_s_i)).
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

    bank: Tensor  # a buffer: it moves with the module, no gradient

    def __init__(self, bank: Tensor | np.ndarray, temperature: float = 0.05):
        super().__init__()
        bank = torch.as_tensor(np.asarray(bank, dtype=np.float32))
        if bank.ndim != 2 or len(bank) < 2:
            raise ValueError(f"a relational bank needs at least 2 vectors, got shape {tuple(bank.shape)}")
        self.register_buffer("bank", bank.contiguous())
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return relational_kl(student, teacher, self.bank.to(student.dtype), self.temperature)


