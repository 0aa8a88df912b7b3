"""Mechanics users don't edit: the trainer's epoch loop, the training step, the checkpoint's owner, the
monitor, the LR schedule, and the model and data loader bases."""

from .base_data_loader import BaseDataLoader
from .base_model import BaseModel
from .base_trainer import BaseTrainer

__all__ = ["BaseDataLoader", "BaseModel", "BaseTrainer"]
