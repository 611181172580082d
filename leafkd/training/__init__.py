"""Training a student into the teacher's space: config, data, batches, selection, the trainer, checkpoints."""

from leafkd.training.config import TrainConfig, load_config
from leafkd.training.trainer import train

__all__ = ["TrainConfig", "load_config", "train"]
