"""The command line shared by train.py and test.py -> a validated `Config` and a `Request`.

The validators and the checkpoint reader (which import torch) load only after argparse has read the command
line, so that `--help` answers at once.
"""

import argparse
import copy
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

from utils.errors import ConfigError

from .compat import upgrade_legacy_schema
from .config import Config
from .loading import deep_merge, leaf_paths, load_config_file, parse_override, set_key
from .options import REQUIRED, TOP_LEVEL, TRAINER, WRITTEN_ONLY, Option
from .shapes import SHAPE_KEYS

Lookups = Mapping[str, Any]
UNFILLED = SHAPE_KEYS - {"lr_scheduler"}  # the form a config does not use stays out of config.yaml


@dataclass
class Request:
    """What the command line asks for beside the config: where the run goes and what it starts from."""

    run_id: str
    explicit_run_id: bool = False
    device_ids: str | None = None
    print_only: bool = False
    allow_inexact: bool = False
    fast_dev_run: int | None = None  # batches per stage of a dry run (train.py --fast-dev-run)
    find_lr: bool = False  # the learning-rate range test instead of training (train.py --find-lr)
    summary: bool = False  # the model's layer table on the console too (train.py --summary)
    checkpoint_path: Path | None = None
    checkpoint: dict | None = None
    notices: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # an entry script's own flags (export.py's --format)
    argv: list[str] = field(default_factory=list)  # the command line as given, for run.json


def _options_help(project: dict[str, Option]) -> str:
    lines = ["top-level keys:"] + [f"  {k:<24}{o.doc}" for k, o in TOP_LEVEL.items()]
    lines += ["trainer options (default):"] + [
        f"  {k:<24}{o.doc} ({o.default!r})" for k, o in TRAINER.items()
    ]
    if project:
        lines += ["project keys, from trainer/options.py (default):"]
        lines += [f"  {k:<24}{o.doc} ({o.default!r})" for k, o in project.items()]
    return "\n".join(lines)


def make_arg_parser(
    description: str,
    project: dict[str, Option] | None = None,
    evaluating: bool = False,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """train.py's command line, or test.py's (`evaluating`): a checkpoint to evaluate, no training flags."""
    epilog = (
        "-r takes a checkpoint file, or a run directory: its model_best.pth, else its newest intact "
        "checkpoint.\n"
        "-c and key.path=value override the checkpoint's config (e.g. the test_data_loader section)."
        if evaluating
        else _options_help(project or {})
    )
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", help="config file (.yaml, .yml or .json)")
    what = "its best" if evaluating else "its newest"
    parser.add_argument("-r", "--resume", help=f"checkpoint file, or a run directory ({what} checkpoint)")
    parser.add_argument("-d", "--device", help="GPU ids to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    if not evaluating:
        parser.add_argument(
            "--run-id", help="run directory name (default: a timestamp; on resume, the resumed run)"
        )
        parser.add_argument(
            "--fast-dev-run",
            nargs="?",
            const=2,
            type=int,
            metavar="N",
            help="check the config end to end before a long run: N (2) training and validation batches, a "
            "save, a resume from it and a test pass, in a temporary run directory that is removed",
        )
        parser.add_argument(
            "--find-lr",
            action="store_true",
            help="run the learning-rate range test on a copy of the model, plot it into the run's log "
            "directory and print the suggested lr",
        )
        parser.add_argument(
            "--summary", action="store_true", help="print the model's layer table (it is in info.log always)"
        )
        parser.add_argument("--lr", type=float, help="shortcut for optimizer.args.lr=LR")
        parser.add_argument("--bs", type=int, help="shortcut for data_loader.args.batch_size=BS")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--trust-checkpoint-config",
        action="store_true",
        help="let the config inside the checkpoint name any type; only for checkpoints you made",
    )
    if not evaluating:
        parser.add_argument(
            "--allow-inexact-resume",
            action="store_true",
            help="resume from a checkpoint whose RNG or data-order state is missing or damaged (logged)",
        )
    if extra is not None:
        extra(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. trainer.epochs=5")
    training_only = {"fast_dev_run": None, "find_lr": False, "summary": False, "allow_inexact_resume": False}
    parser.set_defaults(run_id=None, lr=None, bs=None, **training_only)
    return parser


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_path_name(value: str) -> str | None:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        return f"'{value}' may not contain path separators or '..'; use a plain name such as 'mnist_1'"
    return None


def _bare_fast_dev_run(argv: list[str]) -> list[str]:
    """`--fast-dev-run` then an override rather than a count: argparse would read the override as N."""
    argv = list(argv)
    for index, token in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if token == "--fast-dev-run" and not following.isdigit():
            argv[index] = "--fast-dev-run=2"
    return argv


def parse_args(
    argv: list[str] | None,
    lookups: Lookups | Callable[[], Lookups],
    description: str = "",
    project: dict[str, Option] | None = None,
    evaluating: bool = False,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, Request]:
    """Command line -> (validated Config, Request), or ConfigError naming the file, key path and fix.
    `lookups` (or a function returning them) says where short type names are found; `evaluating` is
    test.py's command line, where a run directory means its best checkpoint; `extra` adds an entry script's
    own flags, whose values come back in `Request.extra`."""
    project = project or {}
    # flags and overrides in any order
    parser = make_arg_parser(description, project, evaluating, extra)
    args = parser.parse_intermixed_args(_bare_fast_dev_run(sys.argv[1:] if argv is None else argv))
    if not args.config and not args.resume:
        raise ConfigError("give a config file with -c FILE, or a checkpoint to resume with -r CHECKPOINT")
    from utils.checkpoint import (
        best_checkpoint,
        newest_intact_checkpoint,
        stored_config,
    )  # torch: past --help

    from .validation import untrusted_downloads_off, validate

    request = Request("", bool(args.run_id), args.device, args.print_config, args.allow_inexact_resume)
    request.argv = list(sys.argv[1:] if argv is None else argv)
    if args.fast_dev_run is not None and args.fast_dev_run < 1:
        raise ConfigError(f"--fast-dev-run: {args.fast_dev_run} batches; give 1 or more")
    request.fast_dev_run, request.find_lr, request.summary = args.fast_dev_run, args.find_lr, args.summary
    if extra is not None:
        own = make_arg_parser("", project, evaluating)  # the standard flags: the rest are the script's
        standard = {action.dest for action in own._actions}
        request.extra = {key: value for key, value in vars(args).items() if key not in standard}
    data, user_data = {}, {}
    if args.resume:
        choose = best_checkpoint if evaluating else newest_intact_checkpoint
        request.checkpoint_path, request.checkpoint = choose(Path(args.resume))
        data = stored_config(request.checkpoint, request.checkpoint_path)
    if args.config:
        user_data = load_config_file(args.config)
    source = args.config or str(request.checkpoint_path)
    shortcuts = {"optimizer.args.lr": args.lr, "data_loader.args.batch_size": args.bs}
    overrides = [f"{key}={value!r}" for key, value in shortcuts.items() if value is not None] + args.overrides
    for text in overrides:
        set_key(user_data, *parse_override(text), text)
    for key in WRITTEN_ONLY:
        user_data.pop(key, None), data.pop(key, None)
    try:
        legacy = upgrade_legacy_schema(user_data) + upgrade_legacy_schema(data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    allowed = tuple(user_data.get("imports") or ()) if isinstance(user_data.get("imports"), list) else ()
    trusted = None if args.trust_checkpoint_config or not args.resume else leaf_paths(user_data)
    config = Config(deep_merge(data, user_data), source, user_data, trusted, allowed, overrides)
    errors, notices = validate(
        config.data, lookups() if callable(lookups) else lookups, config.is_trusted, allowed, project
    )
    if isinstance(config.data.get("name"), str) and _check_path_name(config.data["name"]):
        errors.append(("name", _check_path_name(config.data["name"])))
    if errors:
        raise ConfigError("\n".join(config.located(path, problem) for path, problem in errors))
    notices += untrusted_downloads_off(config.data, config.is_trusted)
    request.notices = [f"{source}: {notice}" for notice in legacy] + [
        config.located(path, problem) for path, problem in notices
    ]
    config.data = with_defaults(config.data, project)
    request.run_id = args.run_id or _default_run_id(config.data, request.checkpoint_path)
    if _check_path_name(request.run_id):
        raise ConfigError(f"--run-id: {_check_path_name(request.run_id)}")
    return config, request


def with_defaults(data: dict, project: dict[str, Option] | None = None) -> dict:
    """The config as it will run: every framework and project option present, so that config.yaml and the
    checkpoint record what ran even if a later version changes a default. Undeclared keys are kept."""
    project = project or {}
    filled = {
        key: copy.deepcopy(data.get(key, option.default))
        for key, option in TOP_LEVEL.items()
        if key in data or (option.default is not REQUIRED and key not in UNFILLED)
    }
    trainer = data.get("trainer", {})
    filled["trainer"] = {key: trainer.get(key, option.default) for key, option in TRAINER.items()}
    for key, option in project.items():
        node, name = (
            (filled["trainer"], key[len("trainer.") :]) if key.startswith("trainer.") else (filled, key)
        )
        node[name] = copy.deepcopy((trainer if node is filled["trainer"] else data).get(name, option.default))
    filled.update({key: copy.deepcopy(value) for key, value in data.items() if key not in filled})
    filled["trainer"].update({key: value for key, value in trainer.items() if key not in filled["trainer"]})
    return filled


def _default_run_id(data: dict, checkpoint_path: Path | None) -> str:
    """A resumed run continues in its own directory when the checkpoint lies in one; else a timestamp."""
    if checkpoint_path is not None:
        runs = Path(data["trainer"]["save_dir"]) / "models" / data["name"]
        if checkpoint_path.parent.parent.resolve() == runs.resolve():
            return checkpoint_path.parent.name
    return datetime.now().strftime("%m%d_%H%M%S")
