"""YAML/JSON config + command line -> a validated `Config` of plain data, and the factory that builds from it.

Pure: reads the config and checkpoint files, writes nothing, so that bad input is reported before any
run directory exists. The keys and their checks live in base/options.py (and the project's own in
trainer/options.py); this module loads, merges, validates and builds.
"""
import argparse
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import yaml

from base.config_validation import TRANSFORM_ARGS, untrusted_downloads_off, validate
from base.options import REQUIRED, TOP_LEVEL, TRAINER, WRITTEN_ONLY, Option, upgrade_legacy_schema
from logger import setup_logging
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, ConfigError
from utils.type_lookup import Lookup, resolve_type
from utils.user_code import raised_in_user_code
from utils.util import write_json

logger = logging.getLogger(__name__)


class FloatSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads `1e-3` as a float: YAML 1.1 would make it the string '1e-3'."""


FloatSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


# ---- loading files and overrides ----
MAX_CONFIG_BYTES = 1_000_000  # a config is a page of text; anything larger is not one
MAX_CONFIG_NODES = 100_000  # after YAML aliases are expanded: refuses "billion laughs"
MAX_CONFIG_DEPTH = 64


def load_config_file(path: str | Path) -> dict:
    """A config mapping from .yaml/.yml (safe loader) or .json, of bounded size, depth and alias expansion."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: a config file must end in .yaml, .yml or .json")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a config (at most "
                          f"{MAX_CONFIG_BYTES:,})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    try:
        data = json.loads(text) if path.suffix == ".json" and text.strip() else yaml.load(text, Loader=FloatSafeLoader)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
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
    problem = _oversized(data)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _oversized(data: Any) -> str | None:
    """Walk the loaded data as it will be used, with YAML aliases expanded: too many nodes (an alias bomb),
    too deep, or a mapping that contains itself are not configs."""
    count, stack = 0, [(data, 0, ())]
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            return f"expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases?); not a config"
        if depth > MAX_CONFIG_DEPTH:
            return f"nested more than {MAX_CONFIG_DEPTH} levels deep; not a config"
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)) and id(child) in path:
                return "contains itself (a recursive YAML alias); not a config"
            stack.append((child, depth + 1, path + (id(node),)))
    return None


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
    except RecursionError:
        raise ConfigError(f"override '{text[:40]}...': the value is nested too deeply") from None
    problem = _oversized(value)
    if problem:
        raise ConfigError(f"override '{text[:40]}': the value {problem}")
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


def leaf_paths(data: Any, prefix: str = "") -> set[str]:
    """Every key path in a nested mapping, inner nodes included."""
    if not isinstance(data, dict):
        return {prefix}
    paths = {prefix} if prefix else set()
    for key, value in data.items():
        paths |= leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return paths


# ---- the validated config ----
@dataclass
class Config:
    """The resolved config as plain data, with where each part came from and the factory over it.
    Also answers pytorch-template's ConfigParser API: item access, init_obj, init_ftn, get_logger,
    save_dir (the run's checkpoint directory), log_dir, resume."""

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
    notices: list[str] = field(default_factory=list)
    user_data: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    explicit_run_id: bool = False
    allow_inexact: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def config(self) -> dict:
        return self.data

    @property
    def trainer(self) -> dict:
        return self.data["trainer"]

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer["save_dir"]) / "models" / self.data["name"] / self.run_id

    @property
    def save_dir(self) -> Path:
        """pytorch-template's name for the run's checkpoint directory."""
        return self.run_dir

    @property
    def log_dir(self) -> Path:
        return Path(self.trainer["save_dir"]) / "log" / self.data["name"] / self.run_id

    @property
    def resume(self) -> Path | None:
        return self.checkpoint_path

    def is_trusted(self, key_path: str) -> bool:
        """Whether the user gave this key (or the list it is in, for `metrics[1].type`) rather than a checkpoint."""
        in_list = re.sub(r"\[\d+\].*$", "", key_path)
        return (self.trust_all or key_path in self.trusted_paths
                or (in_list != key_path and in_list in self.trusted_paths))

    def resolve(self, key_path: str, name: str, lookup: Lookup) -> Any:
        """Resolve a `type` found at key_path, with the trust its source deserves."""
        section = re.sub(r"\[\d+\].*$", "", key_path.removesuffix(".type"))
        section = "transform" if section.endswith(TRANSFORM_ARGS) else section
        return resolve_type(name, lookup, self.is_trusted(key_path), self.allowed_imports, section)

    def construct(self, path: str, type_name: str, args: dict, lookup: Lookup, *runtime_args: Any,
                  **runtime_kwargs: Any) -> Any:
        """Call the class or function that `type_name` names with the config's args. An exception raised in
        the user's own code propagates (their file and line, exit 1); one raised by a library on the
        config's values is a ConfigError naming the key path."""
        clash = sorted(set(args) & set(runtime_kwargs))
        if clash:
            raise ConfigError(f"{self.source}: {path}.args.{clash[0]} is set in the config and passed by the code; "
                              "remove it from the config")
        constructor = self.resolve(f"{path}.type", type_name, lookup)
        try:
            return constructor(*runtime_args, **args, **runtime_kwargs)
        except ConfigError:
            raise
        except Exception as error:  # which code raised decides who is told: the user's code, or the config
            if raised_in_user_code(error):
                raise
            key = _blamed_argument(error, args)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(_located(self.source, self.overrides, f"{path}.args{'.' + key if key else ''}",
                                       f"{type_name} refused its args: {reason}")) from None

    def build(self, key: str, *runtime_args: Any, lookup: Lookup = None, **runtime_kwargs: Any) -> Any:
        """Instantiate section `key` from its `type` and `args`, plus what only the code can provide."""
        node = self.data[key]
        return self.construct(key, node["type"], dict(node.get("args") or {}), lookup, *runtime_args,
                              **runtime_kwargs)

    def init_obj(self, key: str, module: ModuleType, *args: Any, **kwargs: Any) -> Any:
        """pytorch-template's name for build()."""
        return self.build(key, *args, lookup=module, **kwargs)

    def init_ftn(self, key: str, module: ModuleType, *args: Any, **kwargs: Any) -> Callable:
        """pytorch-template's partial application of a configured function."""
        node = self.data[key]
        function = self.resolve(f"{key}.type", node["type"], module)
        return lambda *more_args, **more_kwargs: function(*args, *more_args, **node.get("args", {}), **kwargs,
                                                          **more_kwargs)

    def get_logger(self, name: str, verbosity: int = 2) -> logging.Logger:
        """pytorch-template's logger accessor: a named logger at verbosity 0, 1 or 2."""
        levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
        if verbosity not in levels:
            raise ConfigError(f"get_logger: verbosity must be 0, 1 or 2, not {verbosity!r}")
        logger = logging.getLogger(name)
        logger.setLevel(levels[verbosity])
        return logger


def _blamed_argument(error: Exception, args: dict) -> str | None:
    """The one config arg a library's error message is about (by name or value), if it can be told."""
    message = str(error)
    by_name = [key for key in args if re.search(rf"\b{re.escape(key)}\b", message)]
    by_value = [key for key, value in args.items() if isinstance(value, (int, float, str))
                and not isinstance(value, bool) and re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message)]
    candidates = by_name or by_value
    return candidates[0] if len(candidates) == 1 else None


class ConfigParser(Config):
    """pytorch-template's ConfigParser for project code written against it. Like the original it makes the
    run directories, writes config.json there and sets up logging when constructed; torchkiln's own
    entry scripts never construct it."""

    def __init__(self, config: dict, resume: str | Path | None = None, modification: dict | None = None,
                 run_id: str | None = None):
        data = copy.deepcopy(dict(config))
        for key_path, value in (modification or {}).items():
            if value is not None:
                set_key(data, re.split(r"[;.]", key_path), value, key_path)
        super().__init__(data, "ConfigParser", run_id or datetime.now().strftime("%m%d_%H%M%S"),
                         checkpoint_path=Path(resume) if resume else None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.data, self.run_dir / "config.json")
        setup_logging(self.log_dir, self.data.get("trainer", {}).get("verbosity", 2))

    @classmethod
    def from_args(cls, args: argparse.ArgumentParser, options: Any = "") -> "ConfigParser":
        """Parse the command line the way pytorch-template's train.py did: -c, -r, -d and custom options."""
        for option in options:
            args.add_argument(*option.flags, default=None, type=option.type)
        parsed = args.parse_args() if not isinstance(args, tuple) else args
        if parsed.device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = parsed.device
        if parsed.resume is None and parsed.config is None:
            raise ConfigError("give a config file with -c FILE, or a checkpoint to resume with -r CHECKPOINT")
        resume = Path(parsed.resume) if parsed.resume else None
        data = load_config_file(resume.parent / "config.json") if resume else {}
        if parsed.config:
            data.update(load_config_file(parsed.config))
        modification = {}
        for option in options:
            name = next((f for f in option.flags if f.startswith("--")), option.flags[0]).lstrip("-")
            modification[option.target] = getattr(parsed, name.replace("-", "_"))
        return cls(data, resume, modification)


# ---- command line ----
def _options_help(project: dict[str, Option]) -> str:
    lines = ["top-level keys:"] + [f"  {k:<24}{o.doc}" for k, o in TOP_LEVEL.items()]
    lines += ["trainer options (default):"] + [f"  {k:<24}{o.doc} ({o.default!r})" for k, o in TRAINER.items()]
    if project:
        lines += ["project keys, from trainer/options.py (default):"]
        lines += [f"  {k:<24}{o.doc} ({o.default!r})" for k, o in project.items()]
    return "\n".join(lines)


def make_arg_parser(description: str, project: dict[str, Option] | None = None) -> argparse.ArgumentParser:
    """The command line shared by train.py and test.py."""
    parser = argparse.ArgumentParser(description=description, epilog=_options_help(project or {}),
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
    parser.add_argument("--allow-inexact-resume", action="store_true",
                        help="resume from a checkpoint whose RNG or data-order state is missing or damaged (logged)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. trainer.epochs=5")
    return parser


def newest_good_checkpoint(path: Path) -> tuple[Path, dict]:
    """A checkpoint file, or a run directory's newest checkpoint that is intact: a damaged newest one is
    skipped with a warning."""
    if not path.is_dir():
        return path, load_checkpoint(path)
    for candidate in sorted(path.glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return candidate, load_checkpoint(candidate)
        except CheckpointError as error:
            logger.warning("%s; falling back to the next newest checkpoint", error)
    raise CheckpointError(f"{path}: the run directory holds no intact checkpoint-*.pth")


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_path_name(value: str) -> str | None:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        return f"'{value}' may not contain path separators or '..'; use a plain name such as 'mnist_1'"
    return None


def parse_args(argv: list[str] | None, lookups: dict[str, Lookup], description: str = "",
               project: dict[str, Option] | None = None) -> Config:
    """Command line -> validated Config, or ConfigError naming the file, key path and fix."""
    project = project or {}
    args = make_arg_parser(description, project).parse_intermixed_args(argv)  # flags and overrides in any order
    if not args.config and not args.resume:
        raise ConfigError("give a config file with -c FILE, or a checkpoint to resume with -r CHECKPOINT")
    checkpoint, checkpoint_path, data, user_data = None, None, {}, {}
    if args.resume:
        checkpoint_path, checkpoint = newest_good_checkpoint(Path(args.resume))
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
    for key in WRITTEN_ONLY:
        user_data.pop(key, None), data.pop(key, None)
    legacy = upgrade_legacy_schema(user_data) + upgrade_legacy_schema(data)
    allowed = tuple(user_data.get("imports") or ()) if isinstance(user_data.get("imports"), list) else ()
    trust_all = args.trust_checkpoint_config or not args.resume
    config = Config(deep_merge(data, user_data), source, args.run_id or "", leaf_paths(user_data), trust_all,
                    allowed, checkpoint, checkpoint_path, args.device, args.print_config, user_data=user_data,
                    overrides=overrides, explicit_run_id=bool(args.run_id),
                    allow_inexact=args.allow_inexact_resume)
    errors, notices = validate(config.data, lookups, config.is_trusted, allowed, project)
    if isinstance(config.data.get("name"), str) and _check_path_name(config.data["name"]):
        errors.append(("name", _check_path_name(config.data["name"])))
    if errors:
        raise ConfigError("\n".join(_located(source, overrides, path, problem) for path, problem in errors))
    notices += untrusted_downloads_off(config.data, config.is_trusted)
    config.notices = [f"{source}: {notice}" for notice in legacy] + [
        _located(source, overrides, path, problem) for path, problem in notices]
    config.data = with_defaults(config.data, project)
    config.run_id = config.run_id or _default_run_id(config.data, checkpoint_path)
    if _check_path_name(config.run_id):
        raise ConfigError(f"--run-id: {_check_path_name(config.run_id)}")
    return config


def with_defaults(data: dict, project: dict[str, Option] | None = None) -> dict:
    """The config as it will run: every framework and project option present, so that config.yaml and the
    checkpoint record what ran even if a later version changes a default. Undeclared keys are kept."""
    project = project or {}
    filled = {key: copy.deepcopy(data.get(key, option.default)) for key, option in TOP_LEVEL.items()
              if key in data or option.default is not REQUIRED}
    trainer = data.get("trainer", {})
    filled["trainer"] = {key: trainer.get(key, option.default) for key, option in TRAINER.items()}
    for key, option in project.items():
        node, name = (filled["trainer"], key[len("trainer."):]) if key.startswith("trainer.") else (filled, key)
        node[name] = copy.deepcopy((trainer if node is filled["trainer"] else data).get(name, option.default))
    filled.update({key: copy.deepcopy(value) for key, value in data.items() if key not in filled})
    filled["trainer"].update({key: value for key, value in trainer.items() if key not in filled["trainer"]})
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
