"""Logging setup and the run's scalar writer (TensorBoard and metrics.csv)."""
from .logger import FILE_ONLY, buffer_early_records, flush_early_records, setup_logging
from .visualization import TensorboardWriter

__all__ = ["FILE_ONLY", "TensorboardWriter", "buffer_early_records", "flush_early_records", "setup_logging"]
