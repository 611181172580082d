"""The optimiser's side of training: losses from the config, parameter groups, the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch

from leafkd.losses.combined import CombinedLoss
from leafkd.losses.distance import CosineLoss, LeafL2Loss, MSELoss
from leafkd.losses.lelp import LELPHead, LELPLoss
from leafkd.losses.relational import BankRelationalLoss, RelationalLoss
from leafkd.training.config import TrainConfig


# -- model -----------------------------------------------------------------------------------------------
def set_dropout(model: torch.nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def make_loss(cfg: TrainConfig, teacher_sample: np.ndarray, bank: np.ndarray | None = None) -> CombinedLoss:
    parts: dict[str, tuple[float, torch.nn.Module]] = {}
    if cfg.leaf_l2 > 0:
        parts["leaf_l2"] = (cfg.leaf_l2, LeafL2Loss())
    if cfg.mse > 0:
        parts["mse"] = (cfg.mse, MSELoss())
    if cfg.cosine > 0:
        parts["cosine"] = (cfg.cosine, CosineLoss())
    if cfg.lelp > 0:
        head = LELPHead.fit(teacher_sample, cfg.lelp_classes, cfg.lelp_subclasses, seed=cfg.seed)
        parts["lelp"] = (cfg.lelp, LELPLoss(head, cfg.lelp_temperature))
    if cfg.relational > 0:
        parts["relational"] = (cfg.relational, RelationalLoss(cfg.relational_temperature))
    if cfg.bank > 0:
        if bank is None:
            raise ValueError("the bank loss needs its bank of teacher vectors")
        parts["bank"] = (cfg.bank, BankRelationalLoss(bank, cfg.bank_temperature))
    return CombinedLoss(parts)


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    # A static student's token table gets no weight decay: AdamW would shrink every row at every step, also the
    # rows of tokens the batches never contain.
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.EmbeddingBag)}
    proj, enc_decay, enc_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "linear" in name and not name.startswith("0."):
            proj.append(p)
        elif p.ndim < 2 or id(p) in tables:
            enc_no_decay.append(p)
        else:
            enc_decay.append(p)
    return [
        {"params": enc_decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": enc_no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": proj, "lr": cfg.projection_lr, "weight_decay": 0.0},
    ]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


