"""Training a student into the teacher's space: config, corpus, data, batches, selection, steps, the trainer."""

from leafkd.training.config import TrainConfig, load_config
from leafkd.training.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "load_config", "train"]
