"""YAML/JSON config + command line -> a validated `Config` of plain data, and the factory that builds from it.

Pure: reads the config and checkpoint files, writes nothing, so that bad input is reported before any
run directory exists. Framework-owned options are declared once, in TOP_LEVEL and TRAINER below.
"""
import argparse
import copy
import inspect
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, NamedTuple

import yaml

from base.base_model import INIT_SCHEMES
from base.monitor import parse_monitor
from utils.checkpoint import load_checkpoint
from utils.errors import ConfigError
from utils.type_lookup import check_arguments, close_match, closest, resolve_type


class FloatSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads `1e-3` as a float: YAML 1.1 would make it the string '1e-3'."""


FloatSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


# ---- the option table: (check, default, doc); a check returns what is wrong, or None ----
REQUIRED = object()


class Option(NamedTuple):
    check: Callable[[Any], str | None]
    default: Any
    doc: str


def _integer(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"must be an integer >= {minimum}, not {value!r}"
        return None

    return check


def _choice(*choices: Any) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(map(str, choices))}, not {value!r}"


def _of_type(kind: type, name: str) -> Callable[[Any], str | None]:
    return lambda value: None if isinstance(value, kind) else f"must be {name}, not {value!r}"


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else check(value)


def _string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return None
    return f"must be a list of names, not {value!r}"


def _monitor(value: Any) -> str | None:
    try:
        parse_monitor(value)
    except ValueError as error:
        return str(error)
    return None


_mapping = _of_type(dict, "a mapping")
_section = _of_type(dict, "a mapping with 'type' and 'args'")
TOP_LEVEL = {
    "name": Option(_of_type(str, "a string"), REQUIRED, "run name: the directory under save_dir/models and /log"),
    "n_gpu": Option(_integer(0), 1, "GPUs to use; fewer are used (with a warning) when fewer exist"),
    "seed": Option(_integer(0), 123, "seeds python, numpy, torch and CUDA, the data split and the data order"),
    "imports": Option(_string_list, [], "packages a checkpoint's config may name types from (see SECURITY)"),
    "arch": Option(_section, REQUIRED, "the model: type, args, optional init and init_from"),
    "data_loader": Option(_section, REQUIRED, "the training data loader: type, args"),
    "optimizer": Option(_section, REQUIRED, "type from torch.optim (or a dotted path), args"),
    "loss": Option(_of_type(str, "a function name"), REQUIRED, "loss function in model/loss.py (or a dotted path)"),
    "metrics": Option(_string_list, [], "metric functions in model/metric.py, logged as m and val_m"),
    "lr_scheduler": Option(_optional(_section), None, "type from torch.optim.lr_scheduler, args; optional"),
    "trainer": Option(_mapping, {}, "the trainer options below"),
}
TRAINER = {
    "epochs": Option(_integer(1), 10, "number of epochs to train"),
    "save_dir": Option(_of_type(str, "a path"), "saved/", "root of models/<name>/<run_id> and log/<name>/<run_id>"),
    "save_period": Option(_integer(1), 1, "write checkpoint-epoch<N>.pth every N epochs"),
    "keep_last": Option(_integer(0), 0, "keep only the newest K epoch checkpoints (0 keeps all)"),
    "save_every_steps": Option(_integer(0), 0, "write checkpoint-last.pth every N optimizer steps (0: off)"),
    "verbosity": Option(_choice(0, 1, 2), 2, "0 warnings, 1 info, 2 debug"),
    "monitor": Option(_monitor, "off", "'min val_loss', 'max val_accuracy' or 'off': picks model_best.pth"),
    "early_stop": Option(_integer(0), 0, "stop after N epochs without improvement (0: never)"),
    "tensorboard": Option(_of_type(bool, "true or false"), True, "write TensorBoard event files to the log dir"),
    "tensorboard_images": Option(_of_type(bool, "true or false"), False, "log an input image grid per epoch"),
    "tensorboard_histograms": Option(_of_type(bool, "true or false"), False, "log parameter histograms per epoch"),
    "log_step": Option(_integer(1), 10, "log the training loss and LR every N batches"),
    "len_epoch": Option(_optional(_integer(1)), None, "batches per epoch (iteration-based training); null: one pass"),
    "lr_step": Option(_choice("epoch", "batch"), "epoch", "step the LR scheduler per epoch or per batch"),
    "deterministic": Option(_of_type(bool, "true or false"), False, "deterministic algorithms, cudnn.benchmark off"),
    "progress_bar": Option(_of_type(bool, "true or false"), True, "tqdm bars (also off when stderr is not a terminal)"),
    "on_nonfinite": Option(_choice("stop", "skip"), "stop", "a nan/inf loss stops the run, or skips that step"),
}
SECTION_KEYS = {"arch": ("type", "args", "init", "init_from"), "data_loader": ("type", "args"),
                "optimizer": ("type", "args"), "lr_scheduler": ("type", "args")}
ARCH_EXTRAS = {
    "init": Option(_choice(*INIT_SCHEMES), None, "initialise Conv/Linear weights; BatchNorm to 1/0"),
    "init_from": Option(_mapping, None, "{path, strict: false, exclude: [regex]}: load matching weights"),
}
RUNTIME_ARGS = {"optimizer": 1, "lr_scheduler": 1}  # params / optimizer, passed by train.py
TRANSFORMS_KEY = "data_loader.args.transforms"


def metric_name(type_name: str) -> str:
    """The logged name of a metric: the last part of its `type` (`accuracy`, `mypkg.f1` -> `f1`)."""
    return type_name.split(":")[-1].split(".")[-1]


# ---- loading files and overrides ----
def load_config_file(path: str | Path) -> dict:
    """A config mapping from .yaml/.yml (safe loader) or .json."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: a config file must end in .yaml, .yml or .json")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" and text.strip() else yaml.load(text, Loader=FloatSafeLoader)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        hint = "; Python tags are never executed" if "python/" in str(error) else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}{hint}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML); splits on the first '=' only."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override '{text}': no '='; write key.path=value, e.g. trainer.epochs=5")
    if not key:
        raise ConfigError(f"override '{text}': no key before '='; write key.path=value")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': empty part in key path '{key}'; write key.path=value")
    try:
        value = yaml.load(raw, Loader=FloatSafeLoader) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", error)
        raise ConfigError(f"override '{text}': the value is not valid YAML: {problem}") from None
    return parts, value


def set_key(data: dict, parts: list[str], value: Any, text: str) -> None:
    """Set a nested key, creating mappings on the way; unknown keys are caught by validation."""
    node = data
    for index, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or `lr_scheduler: null` in the file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{text}': {'.'.join(parts[: index + 1])} is not a mapping")
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursively for mappings; lists and values are replaced whole."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _leaf_paths(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return {prefix}
    paths = {prefix} if prefix else set()
    for key, value in data.items():
        paths |= _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return paths


# ---- the validated config ----
@dataclass
class Config:
    """The resolved config as plain data, with where each part came from and the factory over it."""

    data: dict
    source: str
    run_id: str
    trusted_paths: set[str] = field(default_factory=set)
    trust_all: bool = True
    allowed_imports: tuple[str, ...] = ()
    checkpoint: dict | None = None
    checkpoint_path: Path | None = None
    device_ids: str | None = None
    print_only: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def trainer(self) -> dict:
        return self.data["trainer"]

    @property
    def save_dir(self) -> Path:
        return Path(self.trainer["save_dir"])

    @property
    def run_dir(self) -> Path:
        return self.save_dir / "models" / self.data["name"] / self.run_id

    @property
    def log_dir(self) -> Path:
        return self.save_dir / "log" / self.data["name"] / self.run_id

    def is_trusted(self, key_path: str) -> bool:
        return self.trust_all or key_path in self.trusted_paths

    def resolve(self, key_path: str, name: str, lookup: ModuleType | None) -> Any:
        """Resolve a `type` found at key_path, with the trust its source deserves."""
        section = key_path.removesuffix(".type")
        return resolve_type(name, lookup, self.is_trusted(key_path), self.allowed_imports, section)

    def build(self, key: str, *runtime_args: Any, lookup: ModuleType | None = None, **runtime_kwargs: Any) -> Any:
        """Instantiate section `key` from its `type` and `args`, plus what only the code can provide."""
        node = self.data[key]
        args = dict(node.get("args") or {})
        clash = sorted(set(args) & set(runtime_kwargs))
        if clash:
            raise ConfigError(f"{self.source}: {key}.args.{clash[0]} is set in the config and passed by the code; "
                              "remove it from the config")
        constructor = self.resolve(f"{key}.type", node["type"], lookup)
        try:
            return constructor(*runtime_args, **args, **runtime_kwargs)
        except (TypeError, ValueError) as error:  # e.g. Adam(lr=-1): the config's values are at fault
            raise ConfigError(f"{self.source}: {key}: {node['type']} refused its args: {error}") from None

    def init_obj(self, key: str, module: ModuleType, *args: Any, **kwargs: Any) -> Any:
        """pytorch-template's name for build()."""
        return self.build(key, *args, lookup=module, **kwargs)

    def init_ftn(self, key: str, module: ModuleType, *args: Any, **kwargs: Any) -> Callable:
        """pytorch-template's partial application of a configured function."""
        node = self.data[key]
        function = self.resolve(f"{key}.type", node["type"], module)
        return lambda *more_args, **more_kwargs: function(*args, *more_args, **node.get("args", {}), **kwargs,
                                                          **more_kwargs)


def validate(data: dict, lookups: dict[str, ModuleType], trusted: Callable[[str], bool],
             allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every problem in the config as (key path, what is wrong and the fix)."""
    errors: list[tuple[str, str]] = []
    for key in data:
        if key not in TOP_LEVEL:
            errors.append((key, f"unknown top-level key{close_match(key, TOP_LEVEL)}"))
    misspelt = {closest(key, TOP_LEVEL) for key in data if key not in TOP_LEVEL}
    errors += [e for e in _check_options(data, TOP_LEVEL, "") if e[0] not in misspelt]  # one error per typo
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        errors += [(f"trainer.{key}", f"unknown trainer option{close_match(key, TRAINER)}")
                   for key in trainer if key not in TRAINER]
        errors += _check_options(trainer, TRAINER, "trainer.")
    for section, keys in SECTION_KEYS.items():
        if isinstance(data.get(section), dict):
            errors += _check_section(data, section, keys, lookups, trusted, allowed)
    for key in ("loss", "metrics"):
        names = data.get(key) if isinstance(data.get(key), list) else [data.get(key)]
        for index, name in enumerate(names if isinstance(data.get(key), (str, list)) else []):
            path = f"{key}[{index}]" if key == "metrics" else key
            try:
                resolve_type(name, lookups.get(key), trusted(key), allowed, key)
            except ConfigError as error:
                errors.append((path, str(error)))
    if not errors:
        errors += _check_monitor(data, lookups)
    return errors


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


def _check_section(data: dict, section: str, keys: tuple[str, ...], lookups: dict[str, ModuleType],
                   trusted: Callable[[str], bool], allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    node = data[section]
    errors = [(f"{section}.{k}", f"unknown key{close_match(k, keys)}; a section holds {', '.join(keys)}")
              for k in node if k not in keys]
    if section == "arch":
        errors += _check_options({k: v for k, v in node.items() if v is not None}, ARCH_EXTRAS, "arch.")
        errors += _check_init_from(node.get("init_from"))
    args = node.get("args", {}) or {}
    if not isinstance(args, dict):
        return errors + [(f"{section}.args", f"must be a mapping of constructor arguments, not {args!r}")]
    try:
        obj = resolve_type(node.get("type"), lookups.get(section), trusted(f"{section}.type"), allowed, section)
    except ConfigError as error:
        return errors + [(f"{section}.type", str(error))]
    problems = check_arguments(obj, args, RUNTIME_ARGS.get(section, 0))
    errors += [(f"{section}.args.{key}", problem) for key, problem in problems]
    if section == "data_loader" and TRANSFORMS_KEY in lookups and isinstance(args.get("transforms"), list):
        errors += _check_transforms(args["transforms"], lookups[TRANSFORMS_KEY], trusted(TRANSFORMS_KEY), allowed)
    return errors


def _check_transforms(items: list, lookup: ModuleType, trusted: bool,
                      allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    errors = []
    for index, item in enumerate(items):
        path = f"{TRANSFORMS_KEY}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("args", {}), dict):
            errors.append((path, "must be a mapping with 'type' and optional 'args'"))
            continue
        try:
            obj = resolve_type(item.get("type"), lookup, trusted, allowed, "transform")
        except ConfigError as error:
            errors.append((f"{path}.type", str(error)))
            continue
        errors += [(f"{path}.args.{key}", problem) for key, problem in check_arguments(obj, item.get("args", {}))]
    return errors


def _check_init_from(spec: Any) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return []
    known = ("path", "strict", "exclude")
    errors = [(f"arch.init_from.{k}", f"unknown key{close_match(k, known)}") for k in spec if k not in known]
    if not isinstance(spec.get("path"), str):
        errors.append(("arch.init_from.path", "is required: the checkpoint or state_dict file to load from"))
    if not isinstance(spec.get("strict", False), bool):
        errors.append(("arch.init_from.strict", "must be true or false"))
    if _string_list(spec.get("exclude", [])):
        errors.append(("arch.init_from.exclude", "must be a list of regular expressions"))
    for pattern in spec.get("exclude", []) if isinstance(spec.get("exclude"), list) else []:
        try:
            re.compile(pattern)
        except re.error as error:
            errors.append(("arch.init_from.exclude", f"'{pattern}' is not a regular expression: {error}"))
    return errors


def _check_monitor(data: dict, lookups: dict[str, ModuleType]) -> list[tuple[str, str]]:
    """Monitor names are known up front: loss, each metric m, and val_ of each when validating."""
    monitor = parse_monitor(data.get("trainer", {}).get("monitor", "off"))
    if monitor is None:
        return []
    produced = ["loss"] + [metric_name(name) for name in data.get("metrics", [])]
    has_validation = _validation_split(data, lookups) not in (0, 0.0, None)
    known = produced + [f"val_{name}" for name in produced]
    metric = monitor[1]
    if metric not in known:
        return [("trainer.monitor", f"'{metric}' is not a produced metric{close_match(metric, known)}; "
                                    f"choose from {', '.join(known)}")]
    if metric.startswith("val_") and not has_validation:
        return [("trainer.monitor", f"'{metric}' needs validation data: set data_loader.args.validation_split")]
    return []


def _validation_split(data: dict, lookups: dict[str, ModuleType]) -> Any:
    args = data["data_loader"].get("args") or {}
    if "validation_split" in args:
        return args["validation_split"]
    try:
        loader = resolve_type(data["data_loader"]["type"], lookups.get("data_loader"))
        parameter = inspect.signature(loader).parameters.get("validation_split")
    except (ConfigError, TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


# ---- command line ----
def _options_help() -> str:
    lines = ["top-level keys:"] + [f"  {k:<24}{o.doc}" for k, o in TOP_LEVEL.items()]
    lines += ["trainer options (default):"] + [f"  {k:<24}{o.doc} ({o.default!r})" for k, o in TRAINER.items()]
    return "\n".join(lines)


def make_arg_parser(description: str) -> argparse.ArgumentParser:
    """The command line shared by train.py and test.py."""
    parser = argparse.ArgumentParser(description=description, epilog=_options_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (.yaml, .yml or .json)")
    parser.add_argument("-r", "--resume", help="checkpoint file, or a run directory (its newest checkpoint)")
    parser.add_argument("-d", "--device", help="GPU ids to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--run-id", help="run directory name (default: a timestamp; on resume, the resumed run)")
    parser.add_argument("--lr", type=float, help="shortcut for optimizer.args.lr=LR")
    parser.add_argument("--bs", type=int, help="shortcut for data_loader.args.batch_size=BS")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--trust-checkpoint-config", action="store_true",
                        help="let the config inside the checkpoint name any type; only for checkpoints you made")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. trainer.epochs=5")
    return parser


def newest_checkpoint(path: Path) -> Path:
    """A run directory resolves to its most recently written checkpoint."""
    if not path.is_dir():
        return path
    candidates = sorted(path.glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"{path}: the run directory holds no checkpoint-*.pth")
    return candidates[-1]


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_path_name(value: str) -> str | None:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        return f"'{value}' may not contain path separators or '..'; use a plain name such as 'mnist_1'"
    return None


def parse_args(argv: list[str] | None, lookups: dict[str, ModuleType], description: str = "") -> Config:
    """Command line -> validated Config, or ConfigError naming the file, key path and fix."""
    args = make_arg_parser(description).parse_args(argv)
    if not args.config and not args.resume:
        raise ConfigError("give a config file with -c FILE, or a checkpoint to resume with -r CHECKPOINT")
    checkpoint, checkpoint_path, data, user_data = None, None, {}, {}
    if args.resume:
        checkpoint_path = newest_checkpoint(Path(args.resume))
        checkpoint = load_checkpoint(checkpoint_path)
        data = checkpoint.get("config") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{checkpoint_path}: its 'config' is not a mapping")
    if args.config:
        user_data = load_config_file(args.config)
    source = args.config or str(checkpoint_path)
    shortcuts = {"optimizer.args.lr": args.lr, "data_loader.args.batch_size": args.bs}
    overrides = [f"{key}={value!r}" for key, value in shortcuts.items() if value is not None] + args.overrides
    for text in overrides:
        set_key(user_data, *parse_override(text), text)
    allowed = tuple(user_data.get("imports") or ()) if isinstance(user_data.get("imports"), list) else ()
    trust_all = args.trust_checkpoint_config or not args.resume
    config = Config(deep_merge(data, user_data), source, args.run_id or "", _leaf_paths(user_data), trust_all,
                    allowed, checkpoint, checkpoint_path, args.device, args.print_config)
    errors = validate(config.data, lookups, config.is_trusted, allowed)
    if isinstance(config.data.get("name"), str) and _check_path_name(config.data["name"]):
        errors.append(("name", _check_path_name(config.data["name"])))
    if errors:
        raise ConfigError("\n".join(_located(source, overrides, path, problem) for path, problem in errors))
    config.data = with_defaults(config.data)
    config.run_id = config.run_id or _default_run_id(config.data, checkpoint_path)
    if _check_path_name(config.run_id):
        raise ConfigError(f"--run-id: {_check_path_name(config.run_id)}")
    return config


def with_defaults(data: dict) -> dict:
    """The config as it will run: every framework option present, so that config.yaml and the checkpoint
    record what ran even if a later version changes a default."""
    filled = {key: copy.deepcopy(data.get(key, option.default)) for key, option in TOP_LEVEL.items()
              if key in data or option.default is not REQUIRED}
    filled["trainer"] = {key: data.get("trainer", {}).get(key, option.default) for key, option in TRAINER.items()}
    return filled


def _located(source: str, overrides: list[str], path: str, problem: str) -> str:
    for text in overrides:
        key = text.partition("=")[0]
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):
            return f"override '{text}': {path}: {problem}"
    return f"{source}: {path}: {problem}"


def _default_run_id(data: dict, checkpoint_path: Path | None) -> str:
    """A resumed run continues in its own directory when the checkpoint lies in one; else a timestamp."""
    if checkpoint_path is not None:
        runs = Path(data["trainer"]["save_dir"]) / "models" / data["name"]
        if checkpoint_path.parent.parent.resolve() == runs.resolve():
            return checkpoint_path.parent.name
    return datetime.now().strftime("%m%d_%H%M%S")
