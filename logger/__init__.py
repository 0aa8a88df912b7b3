"""Logging setup and the TensorBoard writer."""
from .logger import setup_logging
from .visualization import TensorboardWriter

__all__ = ["setup_logging", "TensorboardWriter"]
