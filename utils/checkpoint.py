"""The checkpoint file format: atomic writes, a content digest per part, the checks a loaded file passes,
and the most advanced intact file of a run. Reading a file as data is utils/safe_load.py's; what a
checkpoint holds is base/checkpointer.py's business."""

import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Mapping, NamedTuple

import torch

from .errors import CheckpointError, TrainingError
from .safe_load import CONFIG, LEGACY, WEIGHTS, WHOLE_MODEL, load_safely

logger = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: content digests
DIGESTS = "digests"
EXACT_RESUME_PARTS = ("rng", "data_order")  # refused when missing unless --allow-inexact-resume
_TEMP_SUFFIX = ".tmp"
_PLAIN_ITEMS = {int, float, str, bool}  # a list of only these is hashed as its repr, in one update


class Staged(NamedTuple):
    """A checkpoint under a temp name beside its own: the CPU's part of a save is done (serialized, or linked
    to a file holding the same state); publish() does the rest, which only waits on the disk."""

    file: BinaryIO | None  # the open temp file, to fsync; None for a second name of a file synced before it
    temp: Path
    path: Path


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write to a temp file in the same directory, fsync it, then rename (stage_checkpoint, publish)."""
    publish([stage_checkpoint(state, path)])


def stage_checkpoint(state: Mapping[str, Any], path: Path) -> Staged:
    """`state` and its content digests serialized into a temp file beside `path`."""
    path = Path(path)
    temp, file = _temp_name(path), None
    try:
        file = open(temp, "wb")
        torch.save({**state, DIGESTS: content_digests(state)}, file)
        file.flush()
    except BaseException as error:
        discard([Staged(file, temp, path)])
        if isinstance(error, (OSError, RuntimeError)):  # RuntimeError: torch's writer reports a full disk so
            raise _save_error(error, path) from error
        raise
    return Staged(file, temp, path)


def stage_second_name(existing: Staged | Path | None, state: Mapping[str, Any], path: Path) -> Staged:
    """A second name for `existing` (a checkpoint of exactly `state`, published or staged): a hard link under
    a temp name, published after it. `state` is staged anew where there is none or the filesystem has no
    hard links."""
    if existing is not None:
        temp = _temp_name(Path(path))
        try:
            temp.unlink(missing_ok=True)
            os.link(existing.temp if isinstance(existing, Staged) else existing, temp)
            return Staged(None, temp, Path(path))
        except OSError:
            temp.unlink(missing_ok=True)
    return stage_checkpoint(state, path)


def publish(staged: list[Staged]) -> None:
    """Each staged file fsynced, then renamed to its name, in order (a second name after its file): a kill or
    a crash at any moment leaves either the complete old file or the complete new one. The directory is not
    synced here: that only makes the new names durable sooner, and is done before an older checkpoint is
    deleted while no kept one's name is durable yet (sync_directory). On a failure nothing more is
    published, and what is left is discarded."""
    for index, item in enumerate(staged):
        try:
            if item.file is not None:
                with item.file:
                    os.fsync(item.file.fileno())
            os.replace(item.temp, item.path)
        except OSError as error:
            discard(staged[index:])
            raise _save_error(error, item.path) from error


def discard(staged: list[Staged]) -> None:
    """Close and remove staged temp files that will not be published."""
    for item in staged:
        if item.file is not None:
            item.file.close()
        item.temp.unlink(missing_ok=True)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_TEMP_SUFFIX}")


def _save_error(error: Exception, path: Path) -> TrainingError:
    return TrainingError(
        f"could not save checkpoint {path}: {_save_failure(error, path)}; the previous one is intact"
    )


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files a process killed mid-save left behind; call it holding the run directory's lock, when no
    other process can be writing one."""
    for stale in directory.glob(f".*{_TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _save_failure(error: Exception, path: Path) -> str:
    """The reason with its errno; torch's writer hides ENOSPC in a RuntimeError, so a full disk is asked."""
    number = getattr(error, "errno", None)
    if number is None and shutil.disk_usage(path.parent).free < 1 << 20:
        number = errno.ENOSPC
    if number is None:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{os.strerror(number)} ({errno.errorcode.get(number, number)})"


def sync_directory(directory: Path) -> None:
    """Make the names in `directory` durable: before a checkpoint is deleted while no kept one's name is, so
    that a crash cannot keep the deletion and lose the renames of its successors."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint(path: Path, for_evaluation: bool = False) -> dict:
    """Load a torchkiln checkpoint, verify its content digests and check that this version can read it.
    `for_evaluation`: only the weights and config must be intact (test.py); other damage is a warning."""
    path = Path(path)
    state = load_safely(path)
    if (
        not isinstance(state, dict)
        or WEIGHTS not in state
        or not isinstance(state.get("version"), int)
        or isinstance(state["version"], bool)
        or state["version"] < 0
    ):
        raise CheckpointError(f"{path}: not a torchkiln checkpoint (no valid 'version' and 'state_dict')")
    if state["version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state['version']} is newer than this torchkiln reads "
            f"({FORMAT_VERSION}); update torchkiln to load it"
        )
    if state.get(WHOLE_MODEL):
        raise CheckpointError(
            f"{path}: holds a whole pickled model (torch.save(model)), not a checkpoint: start a run from "
            f"its weights with arch.init_from.path={path}"
        )
    if not is_legacy(state):
        verify_digests(state, path, for_evaluation)
    return state


def _evaluated(key: str) -> bool:
    """Whether test.py and init_from read this part: the weights, which of them to use, the config."""
    return key in (WEIGHTS, "ema_state_dict", "eval_weights", CONFIG, "version") or key.startswith("models.")


def is_legacy(state: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint was written by pytorch-template: weights and config, no training state."""
    return bool(state.get(LEGACY))


def stored_config(state: Mapping[str, Any], path: Path) -> dict:
    """The config a checkpoint was written with, as plain data ({} when it has none)."""
    config = state.get(CONFIG) or {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its '{CONFIG}' is not a mapping")
    return config


def best_checkpoint(path: Path) -> tuple[Path, dict]:
    """What test.py evaluates: a checkpoint file, or a run directory's model_best.pth when it has an intact
    one, else its most advanced intact checkpoint. Only the weights and config need be intact."""
    best = path / "model_best.pth"
    if path.is_dir() and best.is_file():
        try:
            return best, load_checkpoint(best, for_evaluation=True)
        except CheckpointError as error:
            logger.warning("%s; falling back to the newest intact checkpoint", error)
    return newest_intact_checkpoint(path, for_evaluation=True)


def newest_intact_checkpoint(path: Path, for_evaluation: bool = False) -> tuple[Path, dict]:
    """A checkpoint file, or a run directory's most advanced intact checkpoint by its own counters (never by
    file time: a copy or a `touch` changes that): checkpoint-last.pth or the newest intact epoch file,
    whichever has trained more. A damaged one is skipped with a warning."""
    if not path.is_dir():
        return path, load_checkpoint(path, for_evaluation)
    last = path / "checkpoint-last.pth"
    newest_first = sorted(path.glob("checkpoint-epoch*.pth"), key=_epoch_of, reverse=True)
    found = []
    for candidate in ([last] if last.is_file() else []) + newest_first:
        try:
            found.append((candidate, load_checkpoint(candidate, for_evaluation)))
        except CheckpointError as error:
            logger.warning("%s; falling back to the next newest checkpoint", error)
            continue
        if candidate != last:  # the newest intact epoch file: older ones trained less
            break
    if not found:
        raise CheckpointError(f"{path}: the run directory holds no intact checkpoint-*.pth")
    return max(found, key=lambda item: progress_of(item[1]))


def _epoch_of(path: Path) -> int:
    digits = path.stem.removeprefix("checkpoint-epoch")
    return int(digits) if digits.isdigit() else -1


def progress_of(state: Mapping[str, Any]) -> tuple[int, int, int]:
    """How far a checkpoint's run had trained, by its own counters."""
    return tuple(value if isinstance(value, int) else 0 for value in (
        state.get("global_step"), state.get("epoch"), state.get("batches_in_epoch")))  # fmt: skip


def load_state_dict_file(path: Path) -> dict:
    """The model weights in a torchkiln checkpoint or in a plain `torch.save(model.state_dict())` file."""
    path = Path(path)
    state = load_safely(path)
    if isinstance(state, dict) and ("version" in state or DIGESTS in state) and not is_legacy(state):
        verify_digests(state, path, for_evaluation=True)  # a torchkiln checkpoint: as test.py loads one
    if isinstance(state, dict) and isinstance(state.get(WEIGHTS), dict):
        state = state[WEIGHTS]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: holds neither a checkpoint nor a state_dict of tensors")
    named = next((key for key in state if not isinstance(key, str)), None)
    if named is not None:
        raise CheckpointError(
            f"{path}: its state_dict has a key that is not a name ({named!r}): not a model's"
        )
    if state and all(key.startswith("module.") for key in state):  # saved from a DataParallel wrapper
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def content_digests(state: Mapping[str, Any]) -> dict[str, str]:
    """sha256 of each top-level part's content (tensor bytes, dtypes, shapes, values, key order-free)."""
    return {key: _digest(value) for key, value in state.items() if key != DIGESTS}


def _digest(value: Any) -> str:
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()


def _feed(hasher: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        hasher.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")  # the buffer, not a copy
    elif isinstance(value, Mapping):
        hasher.update(b"{")
        for key in sorted(value, key=repr):
            hasher.update(repr(key).encode())
            _feed(hasher, value[key])
        hasher.update(b"}")
    elif isinstance(value, (list, tuple)) and set(map(type, value)) <= _PLAIN_ITEMS:
        hasher.update(f"{type(value).__name__}:{value!r};".encode())  # RNG states: one update, not 625
    elif isinstance(value, (list, tuple)):
        hasher.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(hasher, item)
        hasher.update(b"]")
    else:
        hasher.update(f"{type(value).__name__}:{value!r};".encode())


def verify_digests(state: Mapping[str, Any], path: Any, for_evaluation: bool = False) -> None:
    """Refuse a file whose content no longer matches what was written, naming the damaged parts; a file
    without digests is refused by every route. `for_evaluation`: damage outside the weights and config (an
    optimizer, the RNG state) is a warning, since evaluating needs only those."""
    written = state.get(DIGESTS)
    if not isinstance(written, Mapping):
        raise CheckpointError(f"{path}: has no content digests (damaged, or not written by this torchkiln)")
    now = content_digests(state)
    damaged = sorted(set(now) ^ set(written) | {key for key in now if now[key] != written.get(key)})
    if for_evaluation and damaged and not any(_evaluated(key) for key in damaged):
        parts = ", ".join(damaged)
        logger.warning("%s: damaged: its %s do not match the digest written with it; only its intact weights "
                       "are used", path, parts)  # fmt: skip
        return
    if damaged:
        raise CheckpointError(
            f"{path}: damaged: its {', '.join(damaged)} do not match the digest written with "
            "it; resume from an earlier checkpoint"
        )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def check_fields(
    state: Mapping[str, Any],
    path: Any,
    allow_inexact: bool,
    optimizers: tuple[str, ...],
    counters: tuple[str, ...],
) -> None:
    """Every field a resume reads, of the right type and range; damage names the field and the fix.
    `optimizers` are the keys of the optimizer parts, `counters` those of the progress record."""
    problems = [
        f"'{key}' must be a non-negative integer, not {state.get(key)!r}"
        for key in counters
        if not _count(state.get(key))
    ]
    if not _count(state.get("world_size", 1)) or state.get("world_size", 1) < 1:
        problems.append(f"'world_size' must be a positive integer, not {state.get('world_size')!r}")
    for key in optimizers:
        if not isinstance(state.get(key), Mapping) or not {"state", "param_groups"} <= set(state[key]):
            problems.append(f"'{key}' must be an optimizer state_dict")
    metrics = state.get("metrics")
    if not (
        isinstance(metrics, Mapping)
        and isinstance(metrics.get("sums"), Mapping)
        and isinstance(metrics.get("counts"), Mapping)
        and all(map(_count, metrics["counts"].values()))
        and all(isinstance(v, (torch.Tensor, float, int)) for v in metrics["sums"].values())
    ):
        problems.append("'metrics' must hold the partial epoch's sums and counts")
    for key in EXACT_RESUME_PARTS:
        if not _part_ok(key, state.get(key)) and not allow_inexact:
            problems.append(
                f"'{key}' is missing or damaged: the run cannot continue exactly (pass "
                "--allow-inexact-resume to continue anyway)"
            )
    if problems:
        raise CheckpointError(f"{path}: cannot resume from it: {problems[0]}")


def _part_ok(key: str, value: Any) -> bool:
    if key == "data_order":
        return isinstance(value, Mapping) and _count(value.get("pass")) and _count(value.get("batches_done"))
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("torch"), torch.Tensor)
        and isinstance(value.get("python"), list)
        and isinstance(value.get("numpy"), list)
    )


def exact_parts_intact(state: Mapping[str, Any]) -> bool:
    """Whether the RNG and data-order state an exact resume needs are there and well-formed."""
    return all(_part_ok(key, state.get(key)) for key in EXACT_RESUME_PARTS)
