"""Checkpoint files: atomic writes, weights_only loads, and readable state_dict mismatch reports."""
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint_check import DIGESTS, content_digests, first_nonfinite, verify_digests
from .errors import CheckpointError, TrainingError

FORMAT_VERSION = 2  # 2: content digests
_TEMP_SUFFIX = ".tmp"


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a kill at any moment leaves
    either the complete old file or the complete new one."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}{_TEMP_SUFFIX}")
    state = {**state, DIGESTS: content_digests(state)}
    try:
        with open(temp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch's writer reports a full disk so
        temp.unlink(missing_ok=True)
        raise TrainingError(f"could not save checkpoint {path}: {_save_failure(error, path)}; the previous one "
                            "is intact") from error
    for stale in path.parent.glob(f".*{_TEMP_SUFFIX}"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)


def _save_failure(error: Exception, path: Path) -> str:
    """The reason with its errno; torch's writer hides ENOSPC in a RuntimeError, so a full disk is asked."""
    number = getattr(error, "errno", None)
    if number is None and shutil.disk_usage(path.parent).free < 1 << 20:
        number = errno.ENOSPC
    if number is None:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{os.strerror(number)} ({errno.errorcode.get(number, number)})"


def link_or_save(existing: Path | None, state: Mapping[str, Any], path: Path) -> None:
    """Give `existing` (a checkpoint of exactly `state`) a second name atomically, or save `state` anew when
    there is none or the filesystem has no hard links."""
    if existing is not None:
        temp = path.with_name(f".{path.name}.{os.getpid()}{_TEMP_SUFFIX}")
        try:
            temp.unlink(missing_ok=True)
            os.link(existing, temp)
            os.replace(temp, path)
            _fsync_directory(path.parent)
            return
        except OSError:
            temp.unlink(missing_ok=True)
    save_checkpoint(state, path)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _load_safely(path: Path) -> Any:
    """torch.load with weights_only=True always passed explicitly, so that the environment variable
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot switch the protection off."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            legacy = _load_pytorch_template_checkpoint(path)
            if legacy is not None:
                return legacy
            raise CheckpointError(
                f"{path}: refused: not a torchkiln checkpoint, or unsafe: loading it would run code "
                "from the file; only load such a file with weights_only=False if you made it yourself"
            ) from None
        raise CheckpointError(f"{path}: not a checkpoint (unreadable: {_first_line(error)})") from None
    except (RuntimeError, EOFError, ValueError, OSError):
        raise CheckpointError(f"{path}: not a complete checkpoint: truncated or corrupt") from None


class _Inert:
    """Stands in for a class or function a pickle names: built from the pickled data, it runs none of its code."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


def _load_pytorch_template_checkpoint(path: Path) -> dict | None:
    """A checkpoint written by pytorch-template (it pickles its ConfigParser, with Path objects inside): every
    global it names is replaced by an inert stand-in, so nothing from the file runs; what comes out is its
    weights and its config as plain data, or None when the file is not such a checkpoint."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(name.rpartition(".")[2], (_Inert,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, TypeError, ValueError, AttributeError):
        return None
    parser = state.get("config") if isinstance(state, dict) else None
    config = getattr(parser, "_config", None)
    if not isinstance(state.get("state_dict"), dict) or not isinstance(config, dict) or "arch" not in state:
        return None
    weights = {key.removeprefix("module."): value for key, value in state["state_dict"].items()}
    return {"version": 0, "legacy": True, "epoch": state.get("epoch"), "state_dict": weights,
            "config": json.loads(json.dumps(config, default=str))}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: Path) -> dict:
    """Load a torchkiln checkpoint, verify its content digests and check that this version can read it."""
    path = Path(path)
    state = _load_safely(path)
    if not isinstance(state, dict) or "state_dict" not in state or not isinstance(state.get("version"), int) \
            or isinstance(state["version"], bool) or state["version"] < 0:
        raise CheckpointError(f"{path}: not a torchkiln checkpoint (no valid 'version' and 'state_dict')")
    if state["version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state['version']} is newer than this torchkiln reads "
            f"({FORMAT_VERSION}); update torchkiln to load it"
        )
    if not state.get("legacy"):
        verify_digests(state, path)
    return state


def load_state_dict_file(path: Path) -> dict:
    """The model weights in a torchkiln checkpoint or in a plain `torch.save(model.state_dict())` file."""
    path = Path(path)
    state = _load_safely(path)
    if isinstance(state, dict) and DIGESTS in state:  # a torchkiln checkpoint: verified like any other load
        verify_digests(state, path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: holds neither a checkpoint nor a state_dict of tensors")
    if state and all(key.startswith("module.") for key in state):  # saved from a DataParallel wrapper
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _compare(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    return {
        "missing": [key for key in own if key not in state_dict],
        "unexpected": [key for key in state_dict if key not in own],
        "shape-mismatched": [key for key in own if key in state_dict and state_dict[key].shape != own[key].shape],
    }


def _describe(problems: Mapping[str, list[str]], own: Mapping[str, torch.Tensor],
              state_dict: Mapping[str, torch.Tensor], shown: int = 3) -> str:
    def label(kind: str, key: str) -> str:
        if kind != "shape-mismatched":
            return key
        return f"{key} {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"

    parts = []
    for kind, keys in problems.items():
        if keys:
            more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {kind}: {', '.join(label(kind, key) for key in keys[:shown])}{more}")
    return "; ".join(parts)


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path) -> None:
    """Load strictly, naming the first missing, unexpected and mis-shaped keys, or a tensor that is not finite."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source}: its weights are not a state_dict of tensors")
    bad = first_nonfinite(state_dict)
    if bad:
        raise CheckpointError(f"{source}: its weight '{bad}' holds nan or inf; resume from an earlier checkpoint")
    own = model.state_dict()
    problems = _compare(own, state_dict)
    if any(problems.values()):
        raise CheckpointError(f"{source}: its state_dict does not fit the configured model: "
                              f"{_describe(problems, own, state_dict)}")
    model.load_state_dict(state_dict)


def load_matching_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path, strict: bool, exclude: list[str]
) -> dict[str, int]:
    """Copy the tensors that fit (the partial-update and drop-the-head recipes); return the counts."""
    patterns = [re.compile(pattern) for pattern in exclude]
    kept = {key: value for key, value in state_dict.items() if not any(p.search(key) for p in patterns)}
    own = model.state_dict()
    problems = _compare(own, kept)
    if strict and any(problems.values()):
        raise CheckpointError(f"{source}: init_from with strict: true, but {_describe(problems, own, kept)}")
    mismatched = set(problems["shape-mismatched"])
    loadable = {key: value for key, value in kept.items() if key in own and key not in mismatched}
    model.load_state_dict(loadable, strict=False)
    return {
        "loaded": len(loadable),
        "excluded": len(state_dict) - len(kept),
        "missing": len(problems["missing"]),
        "shape-mismatched": len(mismatched),
        "unexpected": len(problems["unexpected"]),
    }
