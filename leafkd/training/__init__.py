"""Training a student into the teacher's space: config, corpus, data, batches, selection, steps, the trainer.

Its names load on first use (PEP 562): the CLI's parser reads `TrainConfig` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leafkd.lazy import lazy_names

_NAMES = {"TrainConfig": "leafkd.training.config", "load_config": "leafkd.training.config",
          "Trainer": "leafkd.training.trainer", "train": "leafkd.training.trainer"}

if TYPE_CHECKING:
    from leafkd.training.config import TrainConfig, load_config
    from leafkd.training.trainer import Trainer, train

__getattr__ = lazy_names(__name__, globals(), _NAMES)

__all__ = ["TrainConfig", "Trainer", "load_config", "train"]
