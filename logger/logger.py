"""stdlib logging from logger_config.yaml: a clean console, and info.log in the run's log directory holding
everything the console showed plus the step-level detail and the traceback of a crash."""

import logging
import logging.config
import logging.handlers
import re
import shutil
import sys
import textwrap
from pathlib import Path

import yaml

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
# The project's own loggers: verbosity applies to these only, so that libraries (PIL, matplotlib, ...) keep
# their WARNING level instead of flooding the console with their debug output.
PROJECT_LOGGERS = (
    "train",
    "test",
    "parse_config",
    "base",
    "trainer",
    "model",
    "data_loader",
    "utils",
    "logger",
)
FILE_ONLY = {"file_only": True}  # logger.info(..., extra=FILE_ONLY): info.log only, never the console
FITTED = {"fitted": True}  # logger.info(..., extra=FITTED): wrapped to the terminal's width on the console
_CONFIG_FILE = Path(__file__).with_name("logger_config.yaml")


class FittedFormatter(logging.Formatter):
    """Lines logged with extra=FITTED (the epoch lines), wrapped to the terminal's width at their
    double-space field boundaries: between metrics, never inside a number; continuations indented. Other
    lines are left whole (a printed command must paste as one line), and so is output that is not a
    terminal (a file, a pipe to a log), for grep."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not getattr(record, "fitted", False) or not sys.stdout.isatty():
            return text
        width = max(shutil.get_terminal_size((80, 24)).columns, 40)
        return "\n".join(line for original in text.split("\n") for line in fitted(original, width))


def fitted(line: str, width: int) -> list[str]:
    """`line` as lines of at most `width` columns. A header or summary row (`  key    value`) wraps its value
    under the value's column, at spaces only (a path stays whole, to paste); any other line breaks where it
    separates fields with two spaces."""
    if len(line) <= width:
        return [line]
    row = re.match(r"^(  \S+(?: \S+)*  +)", line)  # keys of two words: `run dir`
    if row:
        indent = " " * len(row.group(1))
        return textwrap.wrap(
            line, width, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False
        )
    lines, current = [], ""
    for field in line.split("  "):
        candidate = f"{current}  {field}" if current else field
        if len(candidate) <= width or not current.strip():
            current = candidate
            continue
        lines.append(current)
        current = "  " + field
    lines.append(current)
    return [piece for part in lines for piece in textwrap.wrap(part, width, subsequent_indent="    ") or [""]]


class ConsoleFilter(logging.Filter):
    """Keeps step-level detail (records logged with extra=FILE_ONLY) off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def buffer_early_records() -> logging.handlers.MemoryHandler:
    """Hold what is logged before the run's log directory exists (device warnings, config notices), so that
    setup_logging can send it to the console and to info.log; flush_early_records shows it if no run
    starts."""
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    logging.root.addHandler(buffer)
    logging.root.setLevel(logging.INFO)
    return buffer


def flush_early_records(buffer: logging.handlers.MemoryHandler) -> None:
    """No run directory after all (bad input, --print-config): show the held warnings on stderr."""
    logging.root.removeHandler(buffer)
    console = logging.StreamHandler()
    for record in buffer.buffer:
        if record.levelno >= logging.WARNING and not getattr(record, "file_only", False):
            console.handle(record)
    buffer.buffer.clear()


def setup_logging(
    log_dir: Path, verbosity: int = 2, early: logging.handlers.MemoryHandler | None = None, main: bool = True
) -> None:
    """Configure logging; called once by an entry script after the config is validated. Records held by
    `early` are replayed through the new handlers. A DDP rank other than 0 (`main` false) writes no file
    and shows warnings and errors only."""
    config = yaml.safe_load(_CONFIG_FILE.read_text())
    if not main:
        del config["handlers"]["info_file_handler"]
        config["root"]["handlers"] = ["console"]
        verbosity = 0
    for handler in config["handlers"].values():
        if "filename" in handler:
            handler["filename"] = str(Path(log_dir) / handler["filename"])
    config["loggers"] = {name: {"level": LEVELS[verbosity]} for name in PROJECT_LOGGERS}
    logging.config.dictConfig(config)
    if early is not None:
        for record in early.buffer:
            if logging.getLogger(record.name).isEnabledFor(record.levelno):
                logging.root.handle(record)
        early.buffer.clear()
