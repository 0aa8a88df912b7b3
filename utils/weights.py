"""State dicts into modules and optimizers: strictly, with a readable report of what does not fit, or (for
init_from) only the parts that fit."""

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError


def first_nonfinite(state_dict: Mapping[str, Any]) -> str | None:
    """The name of the first floating tensor holding a nan or inf, if any."""
    for name, tensor in state_dict.items():
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not torch.isfinite(tensor).all()
        ):
            return name
    return None


def _compare(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    return {
        "missing": [key for key in own if key not in state_dict],
        "unexpected": [key for key in state_dict if key not in own],
        "shape-mismatched": [
            key for key in own if key in state_dict and state_dict[key].shape != own[key].shape
        ],
    }


def _describe(
    problems: Mapping[str, list[str]],
    own: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    shown: int = 3,
) -> str:
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
    """Load strictly, naming the first missing, unexpected and mis-shaped keys, or a tensor that is not
    finite."""
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"{source}: its weights are not a state_dict of tensors")
    if not all(isinstance(key, str) for key in state_dict):
        raise CheckpointError(f"{source}: its weights have keys that are not names: not a state_dict")
    bad = first_nonfinite(state_dict)
    if bad:
        raise CheckpointError(
            f"{source}: its weight '{bad}' holds nan or inf; resume from an earlier checkpoint"
        )
    own = model.state_dict()
    problems = _compare(own, state_dict)
    if any(problems.values()):
        raise CheckpointError(
            f"{source}: its state_dict does not fit the configured model: "
            f"{_describe(problems, own, state_dict)}"
        )
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


def check_optimizer_fits(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, path: Any) -> None:
    """A saved optimizer state for these parameters: same groups, same counts, finite state tensors of their
    shapes. A parameter without state is normal (Adam keeps none for one that never got a gradient)."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: its optimizer has {len(groups)} parameter groups, the model's has "
            f"{len(optimizer.param_groups)}"
        )
    for index, (group, own) in enumerate(zip(groups, optimizer.param_groups)):
        if len(group["params"]) != len(own["params"]):
            raise CheckpointError(
                f"{path}: its optimizer group {index} has {len(group['params'])} parameters, "
                f"the model's has {len(own['params'])}"
            )
    shapes = {
        key: parameter.shape
        for group, own in zip(groups, optimizer.param_groups)
        for key, parameter in zip(group["params"], own["params"])
    }
    states = saved["state"]
    for key, entry in states.items():
        for name, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim() > 0
                and value.shape != shapes.get(key, value.shape)
            ):
                raise CheckpointError(
                    f"{path}: its optimizer state '{name}' of parameter {key} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(shapes[key])}"
                )
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not torch.isfinite(value).all()
            ):
                raise CheckpointError(
                    f"{path}: its optimizer state '{name}' of parameter {key} is not finite"
                )
    if any(key not in shapes for key in states):
        raise CheckpointError(f"{path}: its optimizer state names parameters the model does not have")
