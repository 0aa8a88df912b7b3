"""The training loop users edit."""
from .trainer import Trainer, evaluate

__all__ = ["Trainer", "evaluate"]
