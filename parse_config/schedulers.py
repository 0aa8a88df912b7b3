"""The lr_scheduler section, checked and built in one place: when it steps (per epoch, per batch, or on a
metric for ReduceLROnPlateau) and whether a fixed-length schedule fits the run."""

import logging
from typing import Any

from base.schedule import Schedule
from utils.errors import ConfigError

from .callables import check_metric_name
from .config import Config
from .loaders import has_validation
from .options import parse_monitor
from .resolution import Lookup
from .shapes import Entry

logger = logging.getLogger(__name__)
PLATEAU = "ReduceLROnPlateau"
PER_BATCH_SCHEDULERS = ("OneCycleLR", "CyclicLR")


def _type_name(node: dict) -> str:
    return node["type"].split(".")[-1]


def scheduler_monitor(data: dict, node: dict, loaders: Lookup) -> tuple[str, str]:
    """(mode, metric) that a ReduceLROnPlateau section steps on: its `monitor`, else the trainer's monitor,
    else val_loss (or loss without validation data), minimised."""
    if node.get("monitor"):
        return (node.get("args") or {}).get("mode", "min"), node["monitor"]
    monitor = parse_monitor(data.get("trainer", {}).get("monitor", "off"))
    return monitor or ("min", "val_loss" if has_validation(data, loaders) else "loss")


def check_scheduler(data: dict, entry: Entry, lookups: dict[str, Lookup]) -> list[tuple[str, str]]:
    """(key path, problem) for one scheduler section, once the rest of the config is valid."""
    node, path = entry.node, entry.path
    if not isinstance(node.get("type"), str):
        return []
    name = _type_name(node)
    if name != PLATEAU:
        if node.get("monitor") is not None:
            return [(f"{path}.monitor", f"only ReduceLROnPlateau steps on a metric, not {name}; remove it")]
        return []
    if data.get("trainer", {}).get("lr_step", "epoch") == "batch":
        return [("trainer.lr_step", "ReduceLROnPlateau steps on an epoch's metric: set lr_step: epoch")]
    if node.get("monitor") is not None:
        if not isinstance(node["monitor"], str):
            return [(f"{path}.monitor", f"must be a metric name such as val_loss, not {node['monitor']!r}")]
        return check_metric_name(node["monitor"], f"{path}.monitor", data, lookups)
    mode, metric = scheduler_monitor(data, node, lookups.get("data_loader"))
    scheduler_mode = (node.get("args") or {}).get("mode", "min")
    if scheduler_mode != mode:
        return [
            (
                f"{path}.args.mode",
                f"is '{scheduler_mode}' but trainer.monitor wants {mode} {metric}: set "
                f"mode: {mode}, or name another metric in {path}.monitor",
            )
        ]
    return []


def build_schedule(
    config: Config,
    entry: Entry,
    optimizer: Any,
    steps_per_epoch: int,
    lookup: Lookup,
    loaders: Lookup,
    refs: Any = None,
) -> Schedule:
    """The LR scheduler of one scheduler section and when it steps; a fixed-length schedule is checked
    against the run's length before anything is written."""
    node, trainer = entry.node, config.trainer
    name, per_batch = _type_name(node), trainer["lr_step"] == "batch"
    if name in PER_BATCH_SCHEDULERS and not per_batch:
        logger.warning(
            "%s is a per-batch schedule but trainer.lr_step is epoch: it will step %d times, once per "
            "epoch; set trainer.lr_step: batch to step it every batch",
            name,
            trainer["epochs"],
        )
    metric = scheduler_monitor(config.data, node, loaders)[1] if name == PLATEAU else None
    if name != "OneCycleLR":
        return Schedule(config.build(entry.path, optimizer, lookup=lookup, refs=refs), per_batch, metric)
    run_steps = trainer["epochs"] * (steps_per_epoch if per_batch else 1)
    length = f"{trainer['epochs']} epochs" + (f" x {steps_per_epoch} optimizer steps" if per_batch else "")
    args = _fit_one_cycle(config, entry, refs, run_steps, length)
    return Schedule(config.construct(entry.path, node["type"], args, lookup, optimizer), per_batch, metric)


def _fit_one_cycle(config: Config, entry: Entry, refs: Any, run_steps: int, length: str) -> dict:
    """The args OneCycleLR is built with. `total_steps: auto` (or no length) is the run's length; the config
    keeps `auto`, so that a resume computes it again (and a resume that would change it is refused when the
    scheduler's state is restored). A length that differs from the run's is an error."""
    args = dict(entry.node.get("args") or {})
    args = refs.substitute(args, f"{entry.path}.args") if refs is not None else args
    if args.get("total_steps") == "auto" or ("total_steps" not in args and "epochs" not in args):
        return {
            **{k: v for k, v in args.items() if k not in ("epochs", "steps_per_epoch")},
            "total_steps": run_steps,
        }
    given = args.get("total_steps") or args.get("epochs", 0) * (args.get("steps_per_epoch") or 1)
    if given != run_steps:
        key = "total_steps" if "total_steps" in args else "epochs"
        raise ConfigError(
            f"{config.source}: {entry.path}.args.{key}: OneCycleLR would run {given} steps but this "
            f"run takes {run_steps} ({length}); set total_steps: auto"
        )
    return args
