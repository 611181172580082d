"""Distillation losses. Each is a small module: ``loss(student [B, D], teacher [B, D]) -> scalar``.

Notation: s_i the student's vector of text i, t_i the teacher's, B the batch, D the dimension.

- `LeafL2Loss`          LEAF's alignment loss:     mean_i ||s_i - t_i||^2
- `MSELoss`             per-dimension MSE:         mean_i (1/D) ||s_i - t_i||^2
- `CosineLoss`          direction only:            mean_i (1 - cos(s_i, t_i))
- `LELPLoss`            subspace projections:      mean_i T^2 KL(softmax(P t_i / T) || softmax(P s_i / T))
- `RelationalLoss`      in-batch relations:        mean_i tau^2 KL(softmax(t_i.t_j / tau)_j || softmax(s_i.t_j / tau)_j)
- `BankRelationalLoss`  relations to a fixed bank: mean_i tau^2 KL(softmax(t_i.k_j / tau)_j || softmax(s_i.k_j / tau)_j)
- `CombinedLoss`        sum_k w_k L_k, reporting each part.

Every loss is zero, with zero gradient, when the student equals the teacher.
"""

from leafkd.losses.combined import CombinedLoss
from leafkd.losses.distance import CosineLoss, LeafL2Loss, MSELoss
from leafkd.losses.lelp import LELPHead, LELPLoss
from leafkd.losses.relational import BankRelationalLoss, RelationalLoss, relational_kl

__all__ = ["BankRelationalLoss", "CombinedLoss", "CosineLoss", "LELPHead", "LELPLoss", "LeafL2Loss", "MSELoss",
           "RelationalLoss", "relational_kl"]
