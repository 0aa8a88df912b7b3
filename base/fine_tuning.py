"""The fine-tuning policy of a resume: an optimizer or scheduler whose type changed since the checkpoint
starts fresh, and an argument the user's own config changes replaces the restored one's, with a log line.
Part keys are the checkpoint's: `optimizer` and `lr_scheduler` for the single form, `optimizers.<name>` and
`lr_schedulers.<name>` for named ones."""

import logging
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)
SINGLE = "optimizer"  # the name of the one optimizer (and its scheduler) of the single form


def part_key(kind: str, name: str) -> str:
    """The checkpoint key of optimizer or lr_scheduler `name`."""
    return kind if name == SINGLE else f"{kind}s.{name}"


def tuned(key: str) -> tuple[str, str] | None:
    """(kind, optimizer name) of an optimizer or scheduler part: what fine-tuning may keep or change."""
    kind, _, name = key.partition(".")
    kind = kind.removesuffix("s")
    return (kind, name or SINGLE) if kind in ("optimizer", "lr_scheduler") else None


def _section(config: Mapping[str, Any], kind: str, name: str) -> dict:
    """The config section of an optimizer or scheduler: single (`optimizer`) or named
    (`optimizers.<name>`)."""
    named = config.get(f"{kind}s")
    return (named.get(name) if isinstance(named, dict) else config.get(kind)) or {}


def fresh_parts(keys: Iterable[str], previous: Mapping[str, Any], config: Mapping[str, Any]) -> set[str]:
    """The optimizer and scheduler parts among `keys` whose type differs between the checkpoint's config
    (`previous`) and this run's: they start fresh, each with a warning."""
    fresh = {
        key
        for key in keys
        if tuned(key)
        and _section(previous, *tuned(key)).get("type") != _section(config, *tuned(key)).get("type")
    }
    for key in sorted(fresh):
        logger.warning("%s type changed since the checkpoint: its state starts fresh", key)
    return fresh


def apply_changed_args(parts: Mapping[str, Any], key: str, previous: dict, user_data: dict) -> None:
    """Set on restored part `key` every argument the user's config gives a value other than the checkpoint's
    config did."""
    kind, name = tuned(key)
    old_args = _section(previous, kind, name).get("args") or {}
    for arg, value in (_section(user_data, kind, name).get("args") or {}).items():
        if old_args.get(arg) != value:
            logger.info(
                "Fine-tuning: %s.args.%s is %r in the checkpoint, %r now: using %r",
                key,
                arg,
                old_args.get(arg),
                value,
                value,
            )
            _set_hyperparameter(parts, key, arg, value)


def _set_hyperparameter(parts: Mapping[str, Any], key: str, arg: str, value: Any) -> None:
    kind, name = tuned(key)
    optimizer = parts[part_key("optimizer", name)]
    scheduler = getattr(parts.get(part_key("lr_scheduler", name)), "scheduler", None)
    if kind == "optimizer" and all(arg in group for group in optimizer.param_groups):
        for group in optimizer.param_groups:
            group[arg] = value
            if arg == "lr" and "initial_lr" in group:  # what a scheduler scales from
                group["initial_lr"] = value
        if arg == "lr" and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [value] * len(optimizer.param_groups)
    elif kind == "lr_scheduler" and hasattr(scheduler, arg):
        setattr(scheduler, arg, value)
    else:
        logger.warning(
            "Fine-tuning: %s.args.%s cannot be changed on a restored %s; it keeps the checkpoint's value",
            key,
            arg,
            key,
        )
