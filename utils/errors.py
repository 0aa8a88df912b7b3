"""Project errors: the entry scripts turn them into one line on stderr instead of a traceback, and the
exit."""

import logging
import multiprocessing
import os
import re
import sys


class ConfigError(Exception):
    """Bad user input (config, command line, checkpoint file): exit status 2, nothing written."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used as asked."""


class TrainingError(Exception):
    """Training had to stop (failed save, non-finite loss): exit status 1, last good checkpoint kept."""


class TrainingInterrupted(Exception):
    """A signal asked training to stop after saving; carries the exit status (128 + signal)."""

    def __init__(self, exit_status: int, message: str):
        super().__init__(message)
        self.exit_status = exit_status


def exit_after(status: int) -> None:
    """Exit with `status`. A failed run (1) has said its one line and closed its files; it kills its remaining
    DataLoader workers (they share its stderr, and print tracebacks when they find the parent gone) and leaves
    without Python's teardown, where their threads could do the same."""
    if status == 1:
        for child in multiprocessing.active_children():
            child.kill()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def without_password(url: str) -> str:
    """`scheme://user:***@host/...`: a URL fit for a message or a log line."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
