"""Whose code raised: the user's (their file and line, exit 1) or a library's on the config's values (exit 2).

The project's own model/, data_loader/, trainer/ and any file named by `file.py:Name` are the user's code;
base/, utils/, logger/, the entry scripts and installed packages are not.
"""

import functools
import inspect
import os
import re
import sysconfig
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_FRAMEWORK = tuple(
    str(ROOT / name)
    for name in (
        "base",
        "utils",
        "logger",
        "parse_config",
        "builders.py",
        "train.py",
        "test.py",
        "export.py",
        "preflight.py",
    )
)
_LIBRARIES = tuple(
    {str(Path(sysconfig.get_paths()[key]).resolve()) for key in ("stdlib", "purelib", "platlib")}
)
_WORKER_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+, in .*$')
SHOWN_FRAMES = 6


def is_user_file(filename: str) -> bool:
    """A Python file that the user wrote: not the framework's, not an installed package's or Python's."""
    path = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    return not (filename.startswith("<") or path.startswith(_FRAMEWORK) or path.startswith(_LIBRARIES))


def user_frames(error: BaseException) -> list[traceback.FrameSummary]:
    """The frames of the traceback that lie in the user's code, outermost first."""
    return [frame for frame in traceback.extract_tb(error.__traceback__) if is_user_file(frame.filename)]


def raised_in_user_code(error: BaseException) -> bool:
    """True when the user's code is on the stack, or a DataLoader worker's traceback passed through it."""
    return bool(user_frames(error)) or bool(_worker_user_lines(str(error)))


def raised_in_library(error: BaseException) -> bool:
    """True when the innermost frame is a library's (torch refusing a value), not the user's code."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and not is_user_file(frames[-1].filename)


def defined_at(obj: Any) -> str:
    """`name (file.py:line)` of a function or of an object's class, for errors that blame the user's code."""
    obj = obj.func if isinstance(obj, functools.partial) else obj
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    try:
        path, line = inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (OSError, TypeError):
        return name
    shown = os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else path
    return f"{name} ({shown}:{line})"


def _worker_user_lines(message: str) -> list[str]:
    """A DataLoader worker's exception reaches the main process as text: its user frames, with their code."""
    lines = message.splitlines()
    kept = []
    for index, line in enumerate(lines):
        match = _WORKER_FRAME.match(line)
        if match and is_user_file(match.group(1)):
            kept += (
                [line.rstrip()] + [lines[index + 1].rstrip()] if index + 1 < len(lines) else [line.rstrip()]
            )
    return kept


def describe(error: BaseException) -> str:
    """`error: Type: message` and the user's frames (a short traceback), or the whole traceback when the
    user's code is not involved: then it is a bug of ours and every frame matters."""
    frames = user_frames(error)
    worker_lines = _worker_user_lines(str(error))
    if not frames and not worker_lines:
        return "".join(traceback.format_exception(error)).rstrip()
    headline = str(error).splitlines()[0] if str(error).strip() else ""
    last_line = str(error).strip().splitlines()[-1] if worker_lines else headline
    shown = traceback.format_list(frames[-SHOWN_FRAMES:])
    where = "".join(shown).rstrip().splitlines() + worker_lines[-2 * SHOWN_FRAMES :]
    summary = f"{type(error).__name__}: {last_line}" if not worker_lines else f"{headline} {last_line}"
    notes = getattr(error, "__notes__", [])
    return "\n".join([f"error: {summary}", "in your code (most recent call last):", *where, *notes])


def worker_death(error: BaseException) -> str | None:
    """One line for a DataLoader worker that died (killed, out of memory, os._exit in a dataset)."""
    if (
        isinstance(error, RuntimeError)
        and "DataLoader worker" in str(error)
        and "exited unexpectedly" in str(error)
    ):
        return (
            f"{str(error).splitlines()[0]}; the last good checkpoint is kept (a worker dies when killed or "
            "out of memory: try fewer num_workers, or num_workers: 0 to see the dataset's own error)"
        )
    if isinstance(error, RuntimeError) and str(error).startswith("DataLoader timed out after"):
        return (
            f"{str(error).splitlines()[0]}: a worker took longer than data_loader.args.timeout for a "
            "batch; the last good checkpoint is kept (Ctrl-C while it hangs shows where each worker is)"
        )
    return None


def compile_failure(error: BaseException) -> str | None:
    """One line for an error raised by torch.compile's machinery, naming the option that turns it off."""
    module = type(error).__module__
    if not module.startswith(("torch._dynamo", "torch._inductor")):
        return None
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"torch.compile failed ({type(error).__name__}: {reason}); set trainer.compile: false to train "
        "without it"
    )
