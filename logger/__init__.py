"""What a person and a tracker see: logging setup (logger.py), the run's header, epoch lines and summary
(report.py), and the writers of its records (writer.py). Importing the package loads no torch."""

from .logger import FILE_ONLY, FITTED, buffer_early_records, flush_early_records, setup_logging

__all__ = ["FILE_ONLY", "FITTED", "buffer_early_records", "flush_early_records", "setup_logging"]
