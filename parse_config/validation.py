"""Validation of a whole config against the option table: every problem at once, with key paths and fixes.

Pure: resolves the `type` names (importing what they name) and inspects signatures; builds nothing. Each
section kind's own rules live with its builder (loaders.py, callables.py, schedulers.py).
"""

import copy
import re
from typing import Any, Callable

from base import BaseTrainer
from utils.errors import ConfigError

from .callables import check_callable, check_metric_name, metric_name
from .loaders import check_loader
from .options import (
    ARCH_EXTRAS,
    KNOWN_ALIASES,
    LOADER_SECTIONS,
    METRIC_KEYS,
    NETWORK_ARGS,
    REQUIRED,
    RUNTIME_ARGS,
    SECTION_KEYS,
    TOP_LEVEL,
    TRAINER,
    Option,
    parse_monitor,
    string_list,
)
from .references import check_references
from .resolution import Lookup, check_arguments, close_match, closest, resolve_type
from .schedulers import check_scheduler
from .shapes import OPTIMIZER_KEYS, SHAPE_KEYS, check_shape, entries

Checker = Callable[[str], bool]


def validate(
    data: dict,
    lookups: dict[str, Lookup],
    trusted: Checker,
    allowed: tuple[str, ...],
    project: dict[str, Option],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(errors, notices): every problem in the config as (key path, what is wrong and the fix), and every
    key kept for the project's code without being declared."""
    errors, notices = _unknown_keys(data, TOP_LEVEL, "", project)
    misspelt = {closest(key, TOP_LEVEL) for key in data if key not in TOP_LEVEL and key not in project}
    errors += [e for e in _check_options(data, TOP_LEVEL, "") if e[0] not in misspelt]  # one error per typo
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        more_errors, more_notices = _unknown_keys(trainer, TRAINER, "trainer.", project)
        errors += more_errors + _check_options(trainer, TRAINER, "trainer.")
        errors += _check_trainer_type(trainer, lookups, trusted, allowed)
        notices += more_notices
    errors += _check_project_options(data, project)
    for section in LOADER_SECTIONS:
        if isinstance(data.get(section), dict):
            errors += _check_section(section, data[section], section, lookups, trusted, allowed)
    malformed = ({path for path, _ in errors} | misspelt) & SHAPE_KEYS  # reported already: once is enough
    shape_errors = check_shape(data) if not malformed else []
    errors += shape_errors
    shape_known = not malformed and not shape_errors
    for part, kind in (("model", "arch"), ("optimizer", "optimizer"), ("scheduler", "lr_scheduler")):
        for entry in entries(data, part) if shape_known else ():
            errors += _check_section(entry.path, entry.node, kind, lookups, trusted, allowed)
    for entry in entries(data, "loss") if shape_known else ():
        errors += check_callable(
            entry.node, entry.path, lookups.get("loss"), trusted, allowed, ("type", "args")
        )
    if isinstance(data.get("metrics"), list):
        errors += _check_metrics(data["metrics"], lookups, trusted, allowed)
    errors += _check_downloads(data, trusted) + check_references(data)
    if not errors:
        errors += _check_monitor(data, lookups)
        for entry in entries(data, "scheduler"):
            errors += check_scheduler(data, entry, lookups)
    return errors, notices


def needs_trust(data: dict, lookups: dict[str, Lookup], project: dict[str, Option]) -> bool:
    """Whether resuming this config from its own checkpoint needs --trust-checkpoint-config: a type it names
    is refused when it comes from a checkpoint (a file.py type, a package outside the project)."""
    errors, _ = validate(copy.deepcopy(data), lookups, lambda path: False, (), project)
    return any("refused" in problem for _, problem in errors)


def _check_metrics(
    specs: list, lookups: dict[str, Lookup], trusted: Checker, allowed: tuple[str, ...]
) -> list[tuple[str, str]]:
    errors = []
    for index, spec in enumerate(specs):
        errors += check_callable(
            spec, f"metrics[{index}]", lookups.get("metrics"), trusted, allowed, METRIC_KEYS
        )
    names = [
        metric_name(spec)
        for spec in specs
        if isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("type"), str))
    ]
    return errors + [
        (f"metrics[{i}]", f"the name '{n}' is used twice; give one of them a `name`")
        for i, n in enumerate(names)
        if n in names[:i]
    ]


def _check_trainer_type(
    trainer: dict, lookups: dict[str, Lookup], trusted: Checker, allowed: tuple[str, ...]
) -> list[tuple[str, str]]:
    """trainer.type names a BaseTrainer subclass (trainer/trainer.py's Trainer by default)."""
    if not isinstance(trainer.get("type", "Trainer"), str) or "trainer" not in lookups:
        return []
    try:
        name = trainer.get("type", "Trainer")
        trainer_class = resolve_type(name, lookups["trainer"], trusted("trainer.type"), allowed, "trainer")
    except ConfigError as error:
        return [("trainer.type", str(error))]
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, BaseTrainer)):
        return [("trainer.type", f"{trainer['type']} is not a BaseTrainer subclass")]
    return []


def untrusted_downloads_off(data: dict, trusted: Checker) -> list[tuple[str, str]]:
    """Turn off dataset downloads a checkpoint's config asks for, in place; a notice for each."""
    notices = []
    for section in LOADER_SECTIONS:
        args = (data.get(section) or {}).get("args") if isinstance(data.get(section), dict) else None
        path = f"{section}.args.download"
        if isinstance(args, dict) and args.get("download") and not trusted(path):
            args["download"] = False
            notices.append(
                (
                    path,
                    f"turned off: a checkpoint's config may not make torchkiln download; pass "
                    f"{path}=true to allow it",
                )
            )
    return notices


def _check_downloads(data: dict, trusted: Checker) -> list[tuple[str, str]]:
    """A checkpoint's config may not make torchkiln reach the network (pretrained weights, dataset
    downloads)."""
    errors = []
    for entry in entries(data, "model"):
        args = entry.node.get("args") if isinstance(entry.node, dict) else None
        for key in NETWORK_ARGS:
            path = f"{entry.path}.args.{key}"
            if isinstance(args, dict) and args.get(key) not in (None, False) and not trusted(path):
                errors.append(
                    (
                        path,
                        f"{args[key]!r} would download, and it comes from a checkpoint's config: "
                        f"refused; set it yourself ({path}=false, or {path}={args[key]!r} if you want "
                        "the download) or pass --trust-checkpoint-config",
                    )
                )
    return errors


def _unknown_keys(
    data: dict, table: dict[str, Option], prefix: str, project: dict[str, Option]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A key neither the framework nor the project declares: a misspelling (error) or a project's own key."""
    errors, notices = [], []
    what = "trainer option" if prefix else "top-level key"
    for key in data:
        path = f"{prefix}{key}"
        if key in table or path in project:
            continue
        alias = KNOWN_ALIASES.get(key)
        keep = f"; if '{path}' is your own key, declare it in trainer/options.py"
        if alias:
            errors.append(
                (path, f"unknown {what} (did you mean '{alias}'? that is torchkiln's name for it){keep}")
            )
        elif closest(key, table):
            errors.append((path, f"unknown {what}{close_match(key, table)}{keep}"))
        else:
            notices.append(
                (
                    path,
                    "not a torchkiln key: kept for your code; declare it in trainer/options.py to "
                    "have it checked and listed by --help",
                )
            )
    return errors, notices


def _check_options(data: dict, table: dict[str, Option], prefix: str) -> list[tuple[str, str]]:
    errors = []
    for key, option in table.items():
        if key not in data:
            if option.default is REQUIRED:
                errors.append((f"{prefix}{key}", f"is required: add it ({option.doc})"))
            continue
        problem = option.check(data[key])
        if problem:
            errors.append((f"{prefix}{key}", problem))
    return errors


def _check_project_options(data: dict, project: dict[str, Option]) -> list[tuple[str, str]]:
    top = {key: option for key, option in project.items() if not key.startswith("trainer.")}
    nested = {
        key.removeprefix("trainer."): option for key, option in project.items() if key.startswith("trainer.")
    }
    trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
    return _check_options(data, top, "") + _check_options(trainer, nested, "trainer.")


def _check_section(
    path: str, node: Any, kind: str, lookups: dict[str, Lookup], trusted: Checker, allowed: tuple[str, ...]
) -> list[tuple[str, str]]:
    """A {type, args} section at `path` of one kind: arch, optimizer, lr_scheduler or a data section."""
    if not isinstance(node, dict):
        return [(path, f"must be a mapping with 'type' and 'args', not {node!r}")]
    keys = OPTIMIZER_KEYS if path.startswith("optimizers.") else SECTION_KEYS[kind]
    errors = [
        (f"{path}.{k}", f"unknown key{close_match(k, keys)}; a section holds {', '.join(keys)}")
        for k in node
        if k not in keys
    ]
    if kind == "arch":
        errors += _check_options({k: v for k, v in node.items() if v is not None}, ARCH_EXTRAS, f"{path}.")
        errors += _check_init_from(node.get("init_from"), path)
    if kind == "optimizer" and not all(isinstance(g, dict) for g in node.get("param_groups") or []):
        errors.append(
            (f"{path}.param_groups", "must be a list of mappings {model, module, ...hyperparameters}")
        )
    args = node.get("args", {}) or {}
    if not isinstance(args, dict):
        return errors + [(f"{path}.args", f"must be a mapping of constructor arguments, not {args!r}")]
    lookup = lookups.get("data_loader" if kind in LOADER_SECTIONS else kind)
    try:
        obj = resolve_type(node.get("type"), lookup, trusted(f"{path}.type"), allowed, kind)
    except ConfigError as error:
        return errors + [(f"{path}.type", str(error))]
    if kind in LOADER_SECTIONS:
        return errors + check_loader(path, obj, args, lookups.get("transforms"), trusted, allowed)
    problems = check_arguments(obj, args, RUNTIME_ARGS.get(kind, 0))
    return errors + [(f"{path}.args.{key}", problem) for key, problem in problems]


def _check_init_from(spec: Any, path: str) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return []
    known, where = ("path", "strict", "exclude"), f"{path}.init_from"
    errors = [(f"{where}.{k}", f"unknown key{close_match(k, known)}") for k in spec if k not in known]
    if not isinstance(spec.get("path"), str):
        errors.append((f"{where}.path", "is required: the checkpoint or state_dict file to load from"))
    if not isinstance(spec.get("strict", False), bool):
        errors.append((f"{where}.strict", "must be true or false"))
    if string_list(spec.get("exclude", [])):
        errors.append((f"{where}.exclude", "must be a list of regular expressions"))
    for pattern in spec.get("exclude", []) if isinstance(spec.get("exclude"), list) else []:
        try:
            re.compile(pattern)
        except re.error as error:
            errors.append((f"{where}.exclude", f"'{pattern}' is not a regular expression: {error}"))
    return errors


def _check_monitor(data: dict, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    """Monitor names are known up front: loss, each metric m, and val_ of each when validating."""
    monitor = parse_monitor(data.get("trainer", {}).get("monitor", "off"))
    return [] if monitor is None else check_metric_name(monitor[1], "trainer.monitor", data, lookups)
