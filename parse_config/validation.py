"""Validation of a whole config against the option table: every problem at once, with key paths and fixes.

Pure: resolves the `type` names (importing what they name) and inspects signatures; builds nothing. Each
section kind's own rules live with its builder (loaders.py, callables.py, schedulers.py).
"""

import re
from typing import Any, Callable

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
from .resolution import Lookup, check_arguments, close_match, closest, resolve_type
from .schedulers import check_scheduler

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
    misspelt = {closest(key, TOP_LEVEL) for key in data if key not in TOP_LEVEL}
    errors += [e for e in _check_options(data, TOP_LEVEL, "") if e[0] not in misspelt]  # one error per typo
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        more_errors, more_notices = _unknown_keys(trainer, TRAINER, "trainer.", project)
        errors, notices = (
            errors + more_errors + _check_options(trainer, TRAINER, "trainer."),
            notices + more_notices,
        )
    errors += _check_project_options(data, project)
    for section, keys in SECTION_KEYS.items():
        if isinstance(data.get(section), dict):
            errors += _check_section(data, section, keys, lookups, trusted, allowed)
    if isinstance(data.get("loss"), (str, dict)):
        errors += check_callable(
            data["loss"], "loss", lookups.get("loss"), trusted, allowed, ("type", "args")
        )
    if isinstance(data.get("metrics"), list):
        for index, spec in enumerate(data["metrics"]):
            errors += check_callable(
                spec, f"metrics[{index}]", lookups.get("metrics"), trusted, allowed, METRIC_KEYS
            )
        names = [
            metric_name(spec)
            for spec in data["metrics"]
            if isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("type"), str))
        ]
        errors += [
            (f"metrics[{i}]", f"the name '{n}' is used twice; give one of them a `name`")
            for i, n in enumerate(names)
            if n in names[:i]
        ]
    errors += _check_downloads(data, trusted)
    if not errors:
        errors += _check_monitor(data, lookups) + check_scheduler(data, lookups.get("data_loader"))
    return errors, notices


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
    for section in ("arch",):
        args = (data.get(section) or {}).get("args") if isinstance(data.get(section), dict) else None
        for key in NETWORK_ARGS:
            path = f"{section}.args.{key}"
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
        if alias:
            errors.append((path, f"unknown {what} (did you mean '{alias}'? that is torchkiln's name for it)"))
        elif closest(key, table):
            errors.append((path, f"unknown {what}{close_match(key, table)}"))
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
    data: dict,
    section: str,
    keys: tuple[str, ...],
    lookups: dict[str, Lookup],
    trusted: Checker,
    allowed: tuple[str, ...],
) -> list[tuple[str, str]]:
    node = data[section]
    errors = [
        (f"{section}.{k}", f"unknown key{close_match(k, keys)}; a section holds {', '.join(keys)}")
        for k in node
        if k not in keys
    ]
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
        return errors + check_loader(section, obj, args, lookups.get("transforms"), trusted, allowed)
    problems = check_arguments(obj, args, RUNTIME_ARGS.get(section, 0))
    return errors + [(f"{section}.args.{key}", problem) for key, problem in problems]


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


def _check_monitor(data: dict, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    """Monitor names are known up front: loss, each metric m, and val_ of each when validating."""
    monitor = parse_monitor(data.get("trainer", {}).get("monitor", "off"))
    return (
        []
        if monitor is None
        else check_metric_name(monitor[1], "trainer.monitor", data, lookups.get("data_loader"))
    )
