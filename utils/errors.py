"""Project errors: the entry scripts turn them into one line on stderr instead of a traceback."""


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
