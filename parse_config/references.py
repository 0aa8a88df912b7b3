"""Run-time arguments: a constructor argument that takes its value from an object built before it.

    loss:
      type: CrossEntropyLoss
      args: {weight: "${dataset.class_weights()}"}         # a method of the training dataset, called
    arch:
      args: {num_classes: "${len:dataset.classes}"}        # len() of an attribute
    lr_scheduler:
      args: {steps_per_epoch: "${len:data_loader}"}

A reference is `${root.attribute...}`, optionally `len:` before it and `()` after it (a method without
arguments). Roots are what exists when the section is built: `device` and the data first
(`data_loader`, `dataset`: the training loader's own dataset, `valid_data_loader`), then the models
(`model`, or `models.<name>`), then the optimizers (`optimizer`, or `optimizers.<name>`) for schedulers.
The config keeps the reference, so a resume computes the value again; config.yaml records what it was.
Pure here: syntax and availability are checked before anything is built; attributes when resolved.
"""

import re
from typing import Any, Mapping

from utils.errors import ConfigError

from .resolution import close_match, section_kind

REFERENCE = re.compile(r"\$\{(?:(?P<len>len):)?(?P<path>[A-Za-z_]\w*(?:\.\w+)*)(?P<call>\(\))?\}")
DATA = ("device", "data_loader", "dataset", "valid_data_loader")
MODELS = ("model", "models")
OPTIMIZERS = ("optimizer", "optimizers")
AVAILABLE = {  # the roots each kind of section may refer to: what is built before it
    "data_loader": ("device",),
    "valid_data_loader": DATA,
    "test_data_loader": DATA,
    "arch": DATA,
    "loss": DATA + MODELS,
    "metrics": DATA + MODELS,
    "optimizer": DATA + MODELS,
    "lr_scheduler": DATA + MODELS + OPTIMIZERS,
}


def references_in(value: Any, path: str) -> list[tuple[str, re.Match]]:
    """(key path, match) of every reference in a config value."""
    if isinstance(value, str):
        match = REFERENCE.fullmatch(value.strip())
        return [(path, match)] if match else []
    if isinstance(value, Mapping):
        return [found for key, item in value.items() for found in references_in(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [
            found for index, item in enumerate(value) for found in references_in(item, f"{path}[{index}]")
        ]
    return []


def needs_data(data: dict) -> bool:
    """Whether any reference reads the training data (test.py then builds it as training does)."""
    roots = {
        match["path"].split(".")[0] for key, value in data.items() for _, match in references_in(value, key)
    }
    return bool(roots & {"data_loader", "dataset", "valid_data_loader"})


def check_references(data: dict) -> list[tuple[str, str]]:
    """(key path, problem) for every `${...}` that names no root, or one not built before its section."""
    errors = []
    for key, value in data.items():
        if key == "trainer" or not isinstance(value, (dict, list, str)):
            continue
        for path, match in references_in(value, key):
            root, available = (
                match["path"].split(".")[0],
                AVAILABLE.get(section_kind(path.split(".args")[0]), ()),
            )
            if root not in available:
                known = [r for roots in AVAILABLE.values() for r in roots]
                hint = close_match(root, available) or ("" if root in known else close_match(root, known))
                errors.append(
                    (
                        path,
                        f"{match[0]}: '{root}' is not built before this section{hint}; it may refer "
                        f"to {', '.join(available) or 'no built object'}",
                    )
                )
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            errors += _malformed(value, key)
    return errors


def _malformed(value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(value, str) and "${" in value and not REFERENCE.fullmatch(value.strip()):
        return [
            (
                path,
                f"'{value}' is not a reference: write ${{root.attribute}}, ${{len:root.attribute}} or "
                "${root.method()}",
            )
        ]
    if isinstance(value, Mapping):
        return [error for key, item in value.items() for error in _malformed(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [error for index, item in enumerate(value) for error in _malformed(item, f"{path}[{index}]")]
    return []


class References:
    """The objects built so far, by root name, and what each reference resolved to (for config.yaml)."""

    def __init__(self, source: str = ""):
        self.source, self.objects, self.resolved = source, {}, {}

    def add(self, **objects: Any) -> None:
        self.objects.update(objects)

    def substitute(self, args: Any, path: str) -> Any:
        """`args` with every reference replaced by its value."""
        if isinstance(args, str) and REFERENCE.fullmatch(args.strip()):
            value = self._resolve(REFERENCE.fullmatch(args.strip()), path)
            self.resolved[path] = short(value)
            return value
        if isinstance(args, Mapping):
            return {key: self.substitute(item, f"{path}.{key}") for key, item in args.items()}
        if isinstance(args, list):
            return [self.substitute(item, f"{path}[{index}]") for index, item in enumerate(args)]
        return args

    def _resolve(self, match: re.Match, path: str) -> Any:
        root, *attributes = match["path"].split(".")
        if root not in self.objects:
            raise ConfigError(f"{self.source}: {path}: {match[0]}: '{root}' is not built before this section")
        value, walked = self.objects[root], root
        for attribute in attributes:
            if not hasattr(value, attribute):
                public = [name for name in dir(value) if not name.startswith("_")]
                raise ConfigError(
                    f"{self.source}: {path}: {match[0]}: {walked} ({type(value).__name__}) has no attribute "
                    f"'{attribute}'{close_match(attribute, public)}"
                )
            value, walked = getattr(value, attribute), f"{walked}.{attribute}"
        if match["call"]:
            value = value()
        return len(value) if match["len"] else value


def short(value: Any) -> Any:
    """A value as config.yaml records it: numbers and short lists as they are, a tensor by its shape and its
    first values, anything else by its type."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) <= 16
        and all(isinstance(v, (int, float, str)) for v in value)
    ):
        return list(value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "flatten"):
        head = [round(float(v), 6) for v in value.flatten()[:8].tolist()]
        more = " ..." if value.numel() > 8 else ""
        return f"{type(value).__name__}{list(value.shape)} {value.dtype}: {head}{more}"
    return f"<{type(value).__name__}>"
