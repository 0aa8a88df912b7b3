"""The sweep file: what to search, over which base config, towards which objective, with which sampler and
pruner.

Every problem is found before anything runs: the file's own shape here, each value against the base config's
validation in `check_against_base` (the same checks `train.py` applies to an override).
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from parse_config.loading import load_config_file
from parse_config.options import parse_monitor
from parse_config.resolution import close_match
from utils.errors import ConfigError

KEYS = ("name", "config", "objective", "trials", "sampler", "pruner", "fixed", "first", "space")
PARAM_KEYS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"),
              "categorical": ("choices",)}  # fmt: skip
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
PRUNERS = {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner", "none": "NopPruner"}  # fmt: skip
SCALARS = (type(None), bool, int, float, str)  # what Optuna stores as a categorical choice
Say = Callable[[str], None]  # collects one problem with the file


@dataclass(frozen=True)
class Param:
    """One searched key path and its range: float or int (optionally log-scaled or stepped) or choices."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial (the sampler decides)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        suggest = trial.suggest_float if self.kind == "float" else trial.suggest_int
        step = {} if self.step is None else {"step": self.step}
        return suggest(self.key, self.low, self.high, log=self.log, **step)

    def corners(self) -> list[Any]:
        """The values that bound the range: what validation against the base config tries."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str
    config: str
    objective: tuple[str, str]  # (min|max, metric), as trainer.monitor
    trials: int
    sampler: tuple[str, dict]
    pruner: tuple[str, dict]
    space: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    first: list[dict[str, Any]] = field(default_factory=list)

    @property
    def direction(self) -> str:
        return "minimize" if self.objective[0] == "min" else "maximize"

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's command-line overrides: the objective as the monitor, the fixed values, the trial's."""
        values = {"name": self.name, "trainer.monitor": " ".join(self.objective), **self.fixed, **params}
        return [f"{key}={json.dumps(value)}" for key, value in values.items()]

    def definition(self) -> dict[str, Any]:
        """What makes two runs of the command the same sweep (the number of trials may grow)."""
        return {
            "config": self.config,
            "objective": " ".join(self.objective),
            "sampler": list(self.sampler),
            "pruner": list(self.pruner),
            "space": {key: _plain(param) for key, param in self.space.items()},
            "fixed": self.fixed,
            "first": self.first,
        }


def _plain(param: Param) -> dict[str, Any]:
    shown = {"type": param.kind, "choices": list(param.choices)} if param.choices else {"type": param.kind}
    if param.kind != "categorical":
        shown.update(low=param.low, high=param.high, log=param.log, step=param.step)
    return shown


def load_sweep(path: str) -> SweepSpec:
    """The sweep file, checked; ConfigError listing every problem (file, key path, fix) otherwise."""
    data = load_config_file(path)
    problems: list[str] = []
    say = problems.append
    for key in data:
        if key not in KEYS:
            say(f"{key}: not a sweep key{close_match(key, KEYS)}; the keys are {', '.join(KEYS)}")
    for key in ("config", "objective", "space"):
        if key not in data:
            say(f"{key}: missing; {_REQUIRED_HELP[key]}")
    config = data.get("config")
    if "config" in data and not (isinstance(config, str) and Path(config).is_file()):
        say(f"config: no such config file {config!r}; give the base config's path (from this directory)")
    objective = _objective(data.get("objective", "min val_loss"), say)
    space = _space(data.get("space"), say)
    sampler = _component("sampler", data.get("sampler", "tpe"), SAMPLERS, say)
    pruner = _component("pruner", data.get("pruner", "none"), PRUNERS, say)
    grid = sampler[0] == "grid" and _grid_size(space, say)
    trials = data.get("trials", grid or None)
    if trials is None:
        say("trials: missing; say how many trials to run in all, e.g. trials: 20")
    elif isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        say(f"trials: must be a whole number of trials >= 1, not {trials!r}")
    elif grid and trials > grid:
        say(f"trials: {trials}, but the grid has {grid} points; set trials: {grid} or fewer")
    fixed, first = data.get("fixed") or {}, data.get("first") or []
    if not isinstance(fixed, dict):
        say(f"fixed: must map key paths to values (trainer.epochs: 3), not {fixed!r}")
    if not isinstance(first, list) or not all(isinstance(item, dict) for item in first):
        say(f"first: must be a list of mappings from searched key paths to values, not {first!r}")
    else:
        _check_first(first, space, say)
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str) or not name.replace("-", "_").replace(".", "_").isidentifier():
        say(f"name: {name!r} must be a plain name such as 'mnist_lr' (it names the sweep's directories)")
    if problems:
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in problems))
    return SweepSpec(Path(path), name, config, objective, trials, sampler, pruner, space, fixed, first)


_REQUIRED_HELP = {
    "config": "name the base config, e.g. config: configs/mnist.yaml",
    "objective": "name the metric and its direction, e.g. objective: max val_accuracy",
    "space": "map key paths to ranges, e.g. optimizer.args.lr: {type: float, low: 1e-4, high: 0.1}",
}


def _objective(value: Any, say: Say) -> tuple[str, str]:
    try:
        parsed = parse_monitor(value)
    except ValueError:
        parsed = None
    if parsed is None:
        say(f"objective: must be 'min <metric>' or 'max <metric>' (e.g. max val_accuracy), not {value!r}")
        return "min", "val_loss"
    return parsed


def _component(section: str, value: Any, known: dict[str, str], say: Say) -> tuple[str, dict]:
    """`tpe`, or {type: tpe, args: {...}}: the Optuna class's name and its arguments."""
    kind, args = (value, {}) if isinstance(value, str) else (None, None)
    if isinstance(value, dict):
        kind, args = value.get("type"), value.get("args") or {}
        for key in set(value) - {"type", "args"}:
            say(f"{section}.{key}: not a {section} key; give type and args")
    if kind not in known:
        say(f"{section}: {kind!r} is not one of {', '.join(known)}{close_match(str(kind), known)}")
        return "none" if section == "pruner" else "random", {}
    if not isinstance(args, dict):
        say(f"{section}.args: must be a mapping of {known[kind]}'s arguments, not {args!r}")
        return kind, {}
    import inspect

    import optuna

    module = optuna.pruners if section == "pruner" else optuna.samplers
    accepted = set(inspect.signature(getattr(module, known[kind])).parameters) - {"self", "search_space"}
    for key in args:
        if key not in accepted:
            hint = close_match(key, accepted)
            say(f"{section}.args.{key}: optuna's {known[kind]} takes no such argument{hint}")
    return kind, args


def _space(space: Any, say: Say) -> dict[str, Param]:
    if not isinstance(space, dict) or not space:
        if space:
            say(f"space: must map key paths to ranges, not {space!r}")
        elif space is not None:
            say("space: empty; search at least one key path")
        return {}
    params = {}
    for key, spec in space.items():
        where = f"space.{key}"
        if not isinstance(spec, dict):
            say(f"{where}: must be a mapping such as {{type: float, low: 0.0001, high: 0.1, log: true}}")
            continue
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        if kind not in PARAM_KEYS:
            hint = close_match(str(kind), PARAM_KEYS)
            say(f"{where}.type: {kind!r} is not one of float, int, categorical{hint}")
            continue
        for extra in set(spec) - {"type", *PARAM_KEYS[kind]}:
            takes = PARAM_KEYS[kind]
            say(f"{where}.{extra}: a {kind} range takes {', '.join(takes)}{close_match(extra, takes)}")
        param = _categorical(key, spec, say) if kind == "categorical" else _range(key, kind, spec, say)
        if param is not None:
            params[key] = param
    return params


def _categorical(key: str, spec: dict, say: Say) -> Param | None:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        say(f"space.{key}.choices: must be a non-empty list, not {choices!r}")
        return None
    if not all(isinstance(choice, SCALARS) for choice in choices):
        say(f"space.{key}.choices: each choice must be a number, string, boolean or null (as Optuna stores)")
        return None
    if len({json.dumps(choice) for choice in choices}) < len(choices):
        say(f"space.{key}.choices: {choices} repeats a choice; list each once")
        return None
    return Param(key, "categorical", choices=tuple(choices))


def _range(key: str, kind: str, spec: dict, say: Say) -> Param | None:
    where, low, high = f"space.{key}", spec.get("low"), spec.get("high")
    log, step = spec.get("log", False), spec.get("step")
    number = int if kind == "int" else (int, float)
    bounds = (("low", low), ("high", high))
    bad = [name for name, value in bounds if isinstance(value, bool) or not isinstance(value, number)]
    if bad:
        say(f"{where}: {' and '.join(bad)} must be {'an integer' if kind == 'int' else 'a number'}, not "
            f"{', '.join(repr(spec.get(name)) for name in bad)}")  # fmt: skip
        return None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        say(f"{where}: low {low} must be below high {high}")
        return None
    if not isinstance(log, bool):
        say(f"{where}.log: must be true or false, not {log!r}")
        return None
    if log and low <= 0:
        say(f"{where}: a log scale needs low > 0, not {low}")
        return None
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0 or log):
        fix = "drop step or log" if log else f"a positive {'integer' if kind == 'int' else 'number'}"
        say(f"{where}.step: {step!r}: {fix}")
        return None
    return Param(key, kind, low, high, log, step)


def _grid_size(space: dict[str, Param], say: Say) -> int:
    ranges = [key for key, param in space.items() if param.kind != "categorical"]
    for key in ranges:
        say(f"space.{key}: the grid sampler needs choices for every key; list the values to try")
    return 0 if ranges or not space else math.prod(len(param.choices) for param in space.values())


def _check_first(first: list[dict], space: dict[str, Param], say: Say) -> None:
    for index, params in enumerate(first):
        for key, value in params.items():
            if key not in space:
                say(f"first[{index}].{key}: not a searched key{close_match(key, space)}")
            elif not _inside(space[key], value):
                say(f"first[{index}].{key}: {value!r} lies outside space.{key}")


def _inside(param: Param, value: Any) -> bool:
    if param.kind == "categorical":
        return value in param.choices
    number = int if param.kind == "int" else (int, float)
    return isinstance(value, number) and not isinstance(value, bool) and param.low <= value <= param.high


def check_against_base(spec: SweepSpec, validate: Callable[[list[str]], Any]) -> Any:
    """Validate the base config with each fixed value and each bound or choice of every range, one key at a
    time, as train.py would (`validate(overrides)` raises ConfigError); returns the base config as a trial
    with the first bounds would run (the save directory and seed come from it)."""
    base = validate(spec.overrides({}))
    for index, params in enumerate(spec.first):
        _validated(spec, validate, params, f"first[{index}]")
    for key, param in spec.space.items():
        for value in param.corners():
            _validated(spec, validate, {key: value}, f"space.{key}: {value!r}")
    return base


def _validated(spec: SweepSpec, validate: Callable[[list[str]], Any], params: dict, where: str) -> None:
    try:
        validate(spec.overrides(params))
    except ConfigError as error:
        detail = str(error).replace("\n", "; ")
        raise ConfigError(f"{spec.path}: {where} is refused by the base config: {detail}") from None
