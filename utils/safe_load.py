"""Loading a file as data: torch.load(weights_only=True) always, bounded by what the file holds, and the
foreign formats torchkiln reads (pytorch-template's checkpoints, also pre-1.6 non-zip ones, whole pickled
models) through inert stand-ins, so that no code from a file ever runs."""

import json
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError

CONFIG = "config"  # the run's config as plain data (pytorch-template's key)
WEIGHTS = "state_dict"  # the model's weights (pytorch-template's key)
LEGACY = "legacy"  # marks a pytorch-template checkpoint read through stand-ins
WHOLE_MODEL = "whole_model"  # marks a torch.save(model) file, of which only the weights are read


def load_safely(path: Path) -> Any:
    """torch.load with weights_only=True always passed explicitly, so that the environment variable
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot switch the protection off."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    try:
        return _bounded(torch.load(path, map_location="cpu", weights_only=True), path)
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


MAX_VALUES = 1_000_000  # once shared parts are expanded: what a real checkpoint holds, many times over
MAX_DEPTH = 80  # a config's 64 levels, inside a checkpoint
TENSOR_BYTES_PER_FILE_BYTE = (
    16  # tensors may share storage (tied weights), but not declare far more than is stored
)


def _bounded(state: Any, path: Path) -> Any:
    """`state` once its size is known to be what the file holds, in constant memory and before any tensor is
    materialised or digested: a tensor declaring more bytes than its storage holds (a stride-0 view of one
    element, made to allocate gigabytes), shared references expanding to billions of values, a mapping that
    contains itself, or nesting past any config's depth are refused."""
    budget = TENSOR_BYTES_PER_FILE_BYTE * path.stat().st_size + (64 << 20)
    declared, count, stack = 0, 0, [(state, 0, ())]
    while stack:
        node, depth, where = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            raise CheckpointError(
                f"{path}: refused: it expands to more than {MAX_VALUES:,} values or nests deeper than "
                f"{MAX_DEPTH} levels (shared or self-containing parts): not a checkpoint torchkiln wrote"
            )
        if isinstance(node, torch.Tensor):
            size, held = node.numel() * node.element_size(), node.untyped_storage().nbytes()
            declared += size
            if size > held or declared > budget:
                raise CheckpointError(
                    f"{path}: refused: tensor {'.'.join(map(str, where)) or '(top)'} declares {size:,} bytes "
                    f"but the file stores {held:,} for it: a crafted file, loading it would allocate what it "
                    "declares"
                )
        elif isinstance(node, Mapping):
            stack.extend((value, depth + 1, (*where, key)) for key, value in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((value, depth + 1, (*where, index)) for index, value in enumerate(node))
        elif isinstance(node, _Inert):  # a pickled object's stand-in: its fields, as any other container
            stack.append((vars(node), depth + 1, where))
    return state


class _Inert:
    """Stands in for a class or function a pickle names: built from the pickled data, it runs none of its
    code."""

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
        names = (
            torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if zipfile.is_zipfile(path)
            else _legacy_globals(path)
        )
        stand_ins = [(type(name.rpartition(".")[2], (_Inert,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            state = _bounded(torch.load(path, map_location="cpu", weights_only=True), path)
    except (pickle.UnpicklingError, RuntimeError, TypeError, ValueError, AttributeError, EOFError):
        return None
    if isinstance(state, _Inert) and isinstance(getattr(state, "_modules", None), dict):  # torch.save(model)
        return {"version": 0, LEGACY: True, WHOLE_MODEL: True, "epoch": None, WEIGHTS: _module_weights(state),
                CONFIG: {}}  # fmt: skip
    parser = state.get(CONFIG) if isinstance(state, dict) else None
    config = getattr(parser, "_config", None)
    if not isinstance(state.get(WEIGHTS), dict) or not isinstance(config, dict) or "arch" not in state:
        return None
    weights = {key.removeprefix("module."): value for key, value in state[WEIGHTS].items()}
    return {
        "version": 0,
        LEGACY: True,
        "epoch": state.get("epoch"),
        WEIGHTS: weights,
        CONFIG: json.loads(json.dumps(config, default=str)),
    }


def _legacy_globals(path: Path) -> list[str]:
    """The classes and functions a pre-1.6 (non-zip) torch.save file names, read from the opcodes of its four
    pickles (magic number, protocol, system info, the object) without unpickling anything. torch's own names,
    which weights_only resolves itself, are left out."""
    names = set()
    with path.open("rb") as file:
        for _ in range(4):
            for opcode, argument, _ in pickletools.genops(file):
                if opcode.name == "GLOBAL":
                    names.add(str(argument).replace(" ", "."))
    return sorted(name for name in names if not name.startswith(("torch.", "builtins.", "collections.")))


def _module_weights(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """A pickled nn.Module's parameters and persistent buffers by their state_dict names, read from its inert
    stand-in: the weights of a whole-model file, with none of its code run."""
    skipped = getattr(module, "_non_persistent_buffers_set", set())
    weights = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (getattr(module, kind, None) or {}).items():
            if isinstance(value, torch.Tensor) and name not in skipped:
                weights[prefix + name] = value
    for name, child in getattr(module, "_modules", {}).items():
        if child is not None:
            weights.update(_module_weights(child, f"{prefix}{name}."))
    return weights


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
