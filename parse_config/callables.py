"""The loss and metric sections, checked and built in one place, and the metric names a run produces.

One rule decides both: a class is built once with its args; a function is called per batch as
f(output, target, **args).
"""

import functools
import inspect
from typing import Any, Callable

from utils.errors import ConfigError

from .config import Config
from .loaders import has_validation
from .resolution import Lookup, check_arguments, close_match, resolve_type, section_kind

Checker = Callable[[str], bool]


def callable_spec(spec: str | dict) -> tuple[str, dict]:
    """(type, args) of a loss or metric given as a name or as {type, args}."""
    return (spec, {}) if isinstance(spec, str) else (spec["type"], dict(spec.get("args") or {}))


def metric_name(spec: str | dict) -> str:
    """The logged name of a metric: its `name`, else the last part of its `type` (`mypkg.f1` -> `f1`)."""
    if isinstance(spec, dict):
        return spec.get("name") or metric_name(spec["type"])
    return spec.split(":")[-1].split(".")[-1]


def _built_once(obj: Any) -> bool:
    return inspect.isclass(obj)


def check_callable(
    spec: Any, path: str, lookup: Lookup, trusted: Checker, allowed: tuple[str, ...], keys: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(key path, problem) for a loss or metric spec at `path`."""
    type_path = path if isinstance(spec, str) else f"{path}.type"
    if not isinstance(spec, (str, dict)):
        return [
            (
                path,
                "must be a function or class name, or a mapping with 'type' and optional 'args', "
                f"not {spec!r}",
            )
        ]
    if isinstance(spec, dict):
        unknown = [
            (f"{path}.{k}", f"unknown key{close_match(k, keys)}; use {', '.join(keys)}")
            for k in spec
            if k not in keys
        ]
        if unknown or not isinstance(spec.get("args") or {}, dict):
            return unknown or [(f"{path}.args", "must be a mapping of arguments")]
    name, args = callable_spec(spec)
    try:
        obj = resolve_type(name, lookup, trusted(type_path), allowed, section_kind(path))
    except ConfigError as error:
        return [(type_path, str(error))]
    problems = check_arguments(obj, args, 0 if _built_once(obj) else 2)
    return [(f"{path}.args.{key}", problem) for key, problem in problems]


def build_callable(config: Config, path: str, spec: str | dict, lookup: Lookup, refs: Any = None) -> Callable:
    """A loss or metric as something to call with (output, target); `refs` resolves `${...}` arguments."""
    name, args = callable_spec(spec)
    obj = config.resolve(f"{path}.type" if isinstance(spec, dict) else path, name, lookup)
    args = refs.substitute(args, f"{path}.args") if refs is not None else args
    if _built_once(obj):
        return config.construct(path, name, args, lookup)
    return functools.partial(obj, **args) if args else obj


def build_metrics(config: Config, lookup: Lookup, refs: Any = None) -> dict[str, Callable]:
    """The metrics by their logged names."""
    return {
        metric_name(spec): build_callable(config, f"metrics[{index}]", spec, lookup, refs)
        for index, spec in enumerate(config["metrics"])
    }


def produced_metrics(data: dict, lookups: dict[str, Lookup]) -> tuple[list[str], bool]:
    """The names an epoch's log holds, and whether it validates: what the trainer class declares in `logged`
    (the default Trainer: loss, the loss's `terms` and the metrics), and val_ of each with validation data."""
    trainer = resolve_type((data.get("trainer") or {}).get("type", "Trainer"), lookups.get("trainer"))
    produced = list(getattr(trainer, "logged", None) or ["loss", *_loss_terms(data, lookups)])
    produced += [metric_name(spec) for spec in data.get("metrics") or []]
    validating = has_validation(data, lookups.get("data_loader"))
    return produced + ([f"val_{name}" for name in produced] if validating else []), validating


def _loss_terms(data: dict, lookups: dict[str, Lookup]) -> list[str]:
    """The named terms a multi-term loss declares (`terms = ("recon", "kl")` on its class or function)."""
    if data.get("loss") is None:
        return []
    return list(getattr(resolve_type(callable_spec(data["loss"])[0], lookups.get("loss")), "terms", ()))


def check_metric_name(metric: str, key: str, data: dict, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    """A metric named by `key` (the monitor, a scheduler's) must be one the run produces."""
    known, validating = produced_metrics(data, lookups)
    if metric.startswith("val_") and not validating and metric.removeprefix("val_") in known:
        return [
            (
                key,
                f"'{metric}' needs validation data: add a valid_data_loader section or set "
                "data_loader.args.validation_split",
            )
        ]
    if metric not in known:
        listed = known if validating else known + [f"val_{name}" for name in known]
        return [
            (
                key,
                f"'{metric}' is not a produced metric{close_match(metric, listed)}; "
                f"choose from {', '.join(listed)}",
            )
        ]
    return []
