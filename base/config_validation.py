"""Validation of a whole config against the option table: every problem at once, with key paths and fixes.

Pure: resolves the `type` names (importing what they name) and inspects signatures; builds nothing.
"""
import inspect
import re
from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset

from utils.errors import ConfigError
from utils.type_lookup import Lookup, check_arguments, close_match, closest, resolve_type

from .base_data_loader import BaseDataLoader, split_loader_args
from .monitor import parse_monitor
from .options import (ARCH_EXTRAS, KNOWN_ALIASES, LOADER_SECTIONS, METRIC_KEYS, NETWORK_ARGS, REQUIRED, RUNTIME_ARGS,
                      SECTION_KEYS, TOP_LEVEL, TRAINER, Option, string_list)

Checker = Callable[[str], bool]
TRANSFORM_ARGS = ("transforms", "transform", "target_transform")
PLATEAU = "ReduceLROnPlateau"
PER_BATCH_SCHEDULERS = ("OneCycleLR", "CyclicLR")


def metric_name(spec: str | dict) -> str:
    """The logged name of a metric: its `name`, else the last part of its `type` (`mypkg.f1` -> `f1`)."""
    if isinstance(spec, dict):
        return spec.get("name") or metric_name(spec["type"])
    return spec.split(":")[-1].split(".")[-1]


def callable_spec(spec: str | dict) -> tuple[str, dict]:
    """(type, args) of a loss or metric given as a name or as {type, args}."""
    return (spec, {}) if isinstance(spec, str) else (spec["type"], dict(spec.get("args") or {}))


def validate(data: dict, lookups: dict[str, Lookup], trusted: Checker, allowed: tuple[str, ...],
             project: dict[str, Option]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(errors, notices): every problem in the config as (key path, what is wrong and the fix), and every
    key kept for the project's code without being declared."""
    errors, notices = _unknown_keys(data, TOP_LEVEL, "", project)
    misspelt = {closest(key, TOP_LEVEL) for key in data if key not in TOP_LEVEL}
    errors += [e for e in _check_options(data, TOP_LEVEL, "") if e[0] not in misspelt]  # one error per typo
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        more_errors, more_notices = _unknown_keys(trainer, TRAINER, "trainer.", project)
        errors, notices = errors + more_errors + _check_options(trainer, TRAINER, "trainer."), notices + more_notices
    errors += _check_project_options(data, project)
    for section, keys in SECTION_KEYS.items():
        if isinstance(data.get(section), dict):
            errors += _check_section(data, section, keys, lookups, trusted, allowed)
    if isinstance(data.get("loss"), (str, dict)):
        errors += _check_callable(data["loss"], "loss", lookups.get("loss"), trusted, allowed, ("type", "args"))
    if isinstance(data.get("metrics"), list):
        for index, spec in enumerate(data["metrics"]):
            errors += _check_callable(spec, f"metrics[{index}]", lookups.get("metrics"), trusted, allowed, METRIC_KEYS)
        names = [metric_name(spec) for spec in data["metrics"]
                 if isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("type"), str))]
        errors += [(f"metrics[{i}]", f"the name '{n}' is used twice; give one of them a `name`")
                   for i, n in enumerate(names) if n in names[:i]]
    errors += _check_downloads(data, trusted)
    if not errors:
        errors += _check_monitor(data, lookups) + _check_scheduler(data, lookups)
    return errors, notices


def untrusted_downloads_off(data: dict, trusted: Checker) -> list[tuple[str, str]]:
    """Turn off dataset downloads a checkpoint's config asks for, in place; a notice for each."""
    notices = []
    for section in LOADER_SECTIONS:
        args = (data.get(section) or {}).get("args") if isinstance(data.get(section), dict) else None
        path = f"{section}.args.download"
        if isinstance(args, dict) and args.get("download") and not trusted(path):
            args["download"] = False
            notices.append((path, f"turned off: a checkpoint's config may not make torchkiln download; pass "
                                  f"{path}=true to allow it"))
    return notices


def _check_downloads(data: dict, trusted: Checker) -> list[tuple[str, str]]:
    """A checkpoint's config may not make torchkiln reach the network (pretrained weights, dataset downloads)."""
    errors = []
    for section in ("arch",):
        args = (data.get(section) or {}).get("args") if isinstance(data.get(section), dict) else None
        for key in NETWORK_ARGS:
            path = f"{section}.args.{key}"
            if isinstance(args, dict) and args.get(key) not in (None, False) and not trusted(path):
                errors.append((path, f"{args[key]!r} would download, and it comes from a checkpoint's config: "
                                     f"refused; set it yourself ({path}=false, or {path}={args[key]!r} if you want "
                                     "the download) or pass --trust-checkpoint-config"))
    return errors


def _unknown_keys(data: dict, table: dict[str, Option], prefix: str,
                  project: dict[str, Option]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A key neither the framework nor the project declares: a misspelling (error) or a project's own key."""
    errors, notices = [], []
    what = "trainer option" if prefix else "top-level key"
    for key in data:
        path = f"{prefix}{key}"
        if key in table or path in project:
            continue
        alias = KNOWN_ALIASES.get(key)
        if alias:
            errors.append((path, f"unknown {what} (did you mean '{alias}'? that is torchkiln's name for it)"))
        elif closest(key, table):
            errors.append((path, f"unknown {what}{close_match(key, table)}"))
        else:
            notices.append((path, "not a torchkiln key: kept for your code; declare it in trainer/options.py to "
                                  "have it checked and listed by --help"))
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
    nested = {key.removeprefix("trainer."): option for key, option in project.items() if key.startswith("trainer.")}
    trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
    return _check_options(data, top, "") + _check_options(trainer, nested, "trainer.")


def _check_section(data: dict, section: str, keys: tuple[str, ...], lookups: dict[str, Lookup],
                   trusted: Checker, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    node = data[section]
    errors = [(f"{section}.{k}", f"unknown key{close_match(k, keys)}; a section holds {', '.join(keys)}")
              for k in node if k not in keys]
    if section == "arch":
        errors += _check_options({k: v for k, v in node.items() if v is not None}, ARCH_EXTRAS, "arch.")
        errors += _check_init_from(node.get("init_from"))
    args = node.get("args", {}) or {}
    if not isinstance(args, dict):
        return errors + [(f"{section}.args", f"must be a mapping of constructor arguments, not {args!r}")]
    lookup = lookups.get("data_loader" if section in LOADER_SECTIONS else section)
    try:
        obj = resolve_type(node.get("type"), lookup, trusted(f"{section}.type"), allowed, section)
    except ConfigError as error:
        return errors + [(f"{section}.type", str(error))]
    if section in LOADER_SECTIONS:
        return errors + _check_loader(section, obj, args, lookups, trusted, allowed)
    problems = check_arguments(obj, args, RUNTIME_ARGS.get(section, 0))
    return errors + [(f"{section}.args.{key}", problem) for key, problem in problems]


def _check_loader(section: str, obj: Any, args: dict, lookups: dict[str, Lookup], trusted: Checker,
                  allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """A DataLoader (subclass or factory) takes the args; a Dataset takes its own and BaseDataLoader the rest."""
    if inspect.isclass(obj) and issubclass(obj, Dataset) and not issubclass(obj, DataLoader):
        dataset_args, loader_args = split_loader_args(args)
        problems = check_arguments(obj, dataset_args) + check_arguments(BaseDataLoader, loader_args, 1)
    elif inspect.isclass(obj) and not issubclass(obj, DataLoader):
        return [(f"{section}.type", f"{obj.__qualname__} is neither a DataLoader nor a Dataset class")]
    else:
        problems = check_arguments(obj, args)
    errors = [(f"{section}.args.{key}", problem) for key, problem in problems]
    for key in TRANSFORM_ARGS:
        if isinstance(args.get(key), list) and "transforms" in lookups:
            errors += _check_transforms(args[key], f"{section}.args.{key}", lookups["transforms"], trusted, allowed)
    return errors


def _check_transforms(items: list, path: str, lookup: Lookup, trusted: Checker,
                      allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    errors = []
    for index, item in enumerate(items):
        item_path = f"{path}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("args", {}), dict):
            errors.append((item_path, "must be a mapping with 'type' and optional 'args'"))
            continue
        try:
            obj = resolve_type(item.get("type"), lookup, trusted(f"{item_path}.type"), allowed, "transform")
        except ConfigError as error:
            errors.append((f"{item_path}.type", str(error)))
            continue
        errors += [(f"{item_path}.args.{key}", problem) for key, problem in check_arguments(obj, item.get("args", {}))]
    return errors


def _check_callable(spec: Any, path: str, lookup: Lookup, trusted: Checker, allowed: tuple[str, ...],
                    keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """A loss or metric: a class is built once with its args; a function is called as f(output, target, **args)."""
    type_path = path if isinstance(spec, str) else f"{path}.type"
    if not isinstance(spec, (str, dict)):
        return [(path, f"must be a function or class name, or a mapping with 'type' and optional 'args', not {spec!r}")]
    if isinstance(spec, dict):
        unknown = [(f"{path}.{k}", f"unknown key{close_match(k, keys)}; use {', '.join(keys)}") for k in spec
                   if k not in keys]
        if unknown or not isinstance(spec.get("args") or {}, dict):
            return unknown or [(f"{path}.args", "must be a mapping of arguments")]
    name, args = callable_spec(spec)
    try:
        obj = resolve_type(name, lookup, trusted(type_path), allowed, path.split("[")[0])
    except ConfigError as error:
        return [(type_path, str(error))]
    problems = check_arguments(obj, args, 0 if inspect.isclass(obj) else 2)
    return [(f"{path}.args.{key}", problem) for key, problem in problems]


def _check_init_from(spec: Any) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return []
    known = ("path", "strict", "exclude")
    errors = [(f"arch.init_from.{k}", f"unknown key{close_match(k, known)}") for k in spec if k not in known]
    if not isinstance(spec.get("path"), str):
        errors.append(("arch.init_from.path", "is required: the checkpoint or state_dict file to load from"))
    if not isinstance(spec.get("strict", False), bool):
        errors.append(("arch.init_from.strict", "must be true or false"))
    if string_list(spec.get("exclude", [])):
        errors.append(("arch.init_from.exclude", "must be a list of regular expressions"))
    for pattern in spec.get("exclude", []) if isinstance(spec.get("exclude"), list) else []:
        try:
            re.compile(pattern)
        except re.error as error:
            errors.append(("arch.init_from.exclude", f"'{pattern}' is not a regular expression: {error}"))
    return errors


def produced_metrics(data: dict, lookups: dict[str, Lookup]) -> tuple[list[str], bool]:
    """The names an epoch's log holds (loss, metrics, and val_ of each when there is validation data)."""
    produced = ["loss"] + [metric_name(spec) for spec in data.get("metrics") or []]
    validating = has_validation(data, lookups)
    return produced + ([f"val_{name}" for name in produced] if validating else []), validating


def _check_metric_name(metric: str, key: str, data: dict, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    known, validating = produced_metrics(data, lookups)
    if metric.startswith("val_") and not validating and metric.removeprefix("val_") in known:
        return [(key, f"'{metric}' needs validation data: add a valid_data_loader section or set "
                      "data_loader.args.validation_split")]
    if metric not in known:
        listed = known if validating else known + [f"val_{name}" for name in known]
        return [(key, f"'{metric}' is not a produced metric{close_match(metric, listed)}; "
                      f"choose from {', '.join(listed)}")]
    return []


def _check_monitor(data: dict, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    """Monitor names are known up front: loss, each metric m, and val_ of each when validating."""
    monitor = parse_monitor(data.get("trainer", {}).get("monitor", "off"))
    return [] if monitor is None else _check_metric_name(monitor[1], "trainer.monitor", data, lookups)


def scheduler_monitor(data: dict, lookups: dict[str, Lookup]) -> tuple[str, str]:
    """(mode, metric) that ReduceLROnPlateau steps on: lr_scheduler.monitor, else the trainer's monitor,
    else val_loss (or loss without validation data), minimised."""
    node = data.get("lr_scheduler") or {}
    if node.get("monitor"):
        return (node.get("args") or {}).get("mode", "min"), node["monitor"]
    monitor = parse_monitor(data.get("trainer", {}).get("monitor", "off"))
    return monitor or ("min", "val_loss" if has_validation(data, lookups) else "loss")


def _check_scheduler(data: dict, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    node = data.get("lr_scheduler")
    if not node or not isinstance(node.get("type"), str):
        return []
    name = node["type"].split(".")[-1]
    lr_step = data.get("trainer", {}).get("lr_step", "epoch")
    if name != PLATEAU:
        if node.get("monitor") is not None:
            return [("lr_scheduler.monitor", f"only ReduceLROnPlateau steps on a metric, not {name}; remove it")]
        return []
    if lr_step == "batch":
        return [("trainer.lr_step", "ReduceLROnPlateau steps on an epoch's metric: set lr_step: epoch")]
    if node.get("monitor") is not None:
        if not isinstance(node["monitor"], str):
            return [("lr_scheduler.monitor", f"must be a metric name such as val_loss, not {node['monitor']!r}")]
        return _check_metric_name(node["monitor"], "lr_scheduler.monitor", data, lookups)
    mode, metric = scheduler_monitor(data, lookups)
    scheduler_mode = (node.get("args") or {}).get("mode", "min")
    if scheduler_mode != mode:
        return [("lr_scheduler.args.mode", f"is '{scheduler_mode}' but trainer.monitor wants {mode} {metric}: set "
                                           f"mode: {mode}, or name another metric in lr_scheduler.monitor")]
    return []


def has_validation(data: dict, lookups: dict[str, Lookup]) -> bool:
    """Whether the run will have validation data: a section, a split, or a split_validation() override."""
    if data.get("valid_data_loader"):
        return True
    args = data["data_loader"].get("args") or {}
    if args.get("validation_split") not in (None, 0, 0.0):
        return True
    try:
        loader = resolve_type(data["data_loader"]["type"], lookups.get("data_loader"))
    except ConfigError:
        return False
    own_split = getattr(loader, "split_validation", None)
    if own_split is not None and own_split is not BaseDataLoader.split_validation:
        return True
    try:
        parameter = inspect.signature(loader).parameters.get("validation_split")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default not in (parameter.empty, None, 0, 0.0)
