"""Whole-state checkpoints (model, optimiser, schedule, data position, RNG), written atomically."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from leafkd import atomic
from leafkd.runtime import distributed as dist_


# -- checkpoints -------------------------------------------------------------------------------------------
def list_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.pt").exists()),
                  key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, state: dict, keep: int) -> None:
    if not dist_.is_main():  # distributed: rank 0 writes (the state is the same on every rank)
        return
    target = out / "checkpoints" / f"step-{state['step']:08d}"
    with atomic.atomic_dir(target) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


