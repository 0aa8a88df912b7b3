"""What makes a loaded checkpoint trustworthy as data: a content digest per part, verified on every load, and
a check of every field's type and range before anything is built from it."""
import hashlib
from typing import Any, Mapping

import torch

from .errors import CheckpointError

DIGESTS = "digests"
# the parts a resume cannot do without: refused when missing unless --allow-inexact-resume
EXACT_RESUME_PARTS = ("rng", "data_order")


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
        hasher.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, Mapping):
        hasher.update(b"{")
        for key in sorted(value, key=repr):
            hasher.update(repr(key).encode())
            _feed(hasher, value[key])
        hasher.update(b"}")
    elif isinstance(value, (list, tuple)) and all(type(item) in (int, float, str, bool) for item in value):
        hasher.update(f"{type(value).__name__}:{value!r};".encode())  # RNG states: one update, not 625
    elif isinstance(value, (list, tuple)):
        hasher.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(hasher, item)
        hasher.update(b"]")
    else:
        hasher.update(f"{type(value).__name__}:{value!r};".encode())


def verify_digests(state: Mapping[str, Any], path: Any) -> None:
    """Refuse a file whose content no longer matches what was written, naming the damaged parts."""
    written = state.get(DIGESTS)
    if not isinstance(written, Mapping):
        raise CheckpointError(f"{path}: has no content digests (damaged, or not written by this torchkiln)")
    now = content_digests(state)
    damaged = sorted(set(now) ^ set(written) | {key for key in now if now[key] != written.get(key)})
    if damaged:
        raise CheckpointError(f"{path}: damaged: its {', '.join(damaged)} do not match the digest written with "
                              "it; resume from an earlier checkpoint")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def check_fields(state: Mapping[str, Any], path: Any, allow_inexact: bool = False) -> None:
    """Every field a resume reads, of the right type and range; damage names the field and the fix."""
    problems = []
    for key in ("epoch", "batches_in_epoch", "global_step", "skipped_steps"):
        if not _count(state.get(key)):
            problems.append(f"'{key}' must be a non-negative integer, not {state.get(key)!r}")
    if not _count(state.get("world_size", 1)) or state.get("world_size", 1) < 1:
        problems.append(f"'world_size' must be a positive integer, not {state.get('world_size')!r}")
    if not isinstance(state.get("optimizer"), Mapping) or not {"state", "param_groups"} <= set(state["optimizer"]):
        problems.append("'optimizer' must be an optimizer state_dict")
    metrics = state.get("metrics")
    if not (isinstance(metrics, Mapping) and isinstance(metrics.get("sums"), Mapping)
            and isinstance(metrics.get("counts"), Mapping) and all(map(_count, metrics["counts"].values()))
            and all(isinstance(v, (torch.Tensor, float, int)) for v in metrics["sums"].values())):
        problems.append("'metrics' must hold the partial epoch's sums and counts")
    for key in EXACT_RESUME_PARTS:
        if not part_ok(key, state.get(key)) and not allow_inexact:
            problems.append(f"'{key}' is missing or damaged: the run cannot continue exactly (pass "
                            "--allow-inexact-resume to continue anyway)")
    if problems:
        raise CheckpointError(f"{path}: cannot resume from it: {problems[0]}")


def part_ok(key: str, value: Any) -> bool:
    if key == "data_order":
        return isinstance(value, Mapping) and _count(value.get("pass")) and _count(value.get("batches_done"))
    return (isinstance(value, Mapping) and isinstance(value.get("torch"), torch.Tensor)
            and isinstance(value.get("python"), list) and isinstance(value.get("numpy"), list))


def first_nonfinite(state_dict: Mapping[str, Any]) -> str | None:
    """The name of the first floating tensor holding a nan or inf, if any."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_optimizer_fits(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, path: Any) -> None:
    """A saved optimizer state for these parameters: same groups, same counts, state tensors of their shapes,
    and no parameter left without state when others have it."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{path}: its optimizer has {len(groups)} parameter groups, the model's has "
                              f"{len(optimizer.param_groups)}")
    for index, (group, own) in enumerate(zip(groups, optimizer.param_groups)):
        if len(group["params"]) != len(own["params"]):
            raise CheckpointError(f"{path}: its optimizer group {index} has {len(group['params'])} parameters, "
                                  f"the model's has {len(own['params'])}")
    shapes = {key: parameter.shape for group, own in zip(groups, optimizer.param_groups)
              for key, parameter in zip(group["params"], own["params"])}
    states = saved["state"]
    missing = [key for key in shapes if states and key not in states]
    if missing:
        raise CheckpointError(f"{path}: its optimizer state lacks parameter {missing[0]}")
    for key, entry in states.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes.get(key, value.shape):
                raise CheckpointError(f"{path}: its optimizer state '{name}' of parameter {key} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(shapes[key])}")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(f"{path}: its optimizer state '{name}' of parameter {key} is not finite")
    if any(key not in shapes for key in states):
        raise CheckpointError(f"{path}: its optimizer state names parameters the model does not have")
