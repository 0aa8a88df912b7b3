"""pytorch-template compatibility, in one place: its ConfigParser for project code written against it, and
the 2018-2019 config keys mapped onto today's."""

import argparse
import copy
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from utils.errors import ConfigError
from utils.util import write_json

from .config import Config
from .loading import load_config_file, set_key

FORK_SECTIONS = {
    "arch": "models",
    "optimizer": "optimizers",
    "lr_scheduler": "lr_schedulers",
    "loss": "losses",
}


def upgrade_gan_fork_keys(data: dict) -> list[str]:
    """Map the keys of pytorch-template's GAN forks onto the named forms, in place: `generator_arch` ->
    models.generator, `generator_optimizer` -> optimizers.generator (stepping that model),
    `generator_lr_scheduler` -> lr_schedulers.generator, `adversarial_loss` -> losses.adversarial,
    `train_data_loader` -> data_loader; one notice per key. Beside the single form of the same part, the key
    is refused with the form to write."""
    notices = []
    if isinstance(data.get("train_data_loader"), dict) and "data_loader" not in data:
        data["data_loader"] = data.pop("train_data_loader")
        notices.append(
            "'train_data_loader' is a GAN fork's key: read as 'data_loader'; rename it to silence this"
        )
    for key in list(data):
        part = next((p for p in FORK_SECTIONS if key.endswith(f"_{p}") and key != f"_{p}"), None)
        if part is None or not isinstance(data[key], (dict, str) if part == "loss" else dict):
            continue
        name, named = key.removesuffix(f"_{part}"), FORK_SECTIONS[part]
        if data.get(part) is not None:
            raise ConfigError(
                f"{key}: a second {part} beside '{part}': name both under {named}, e.g. {named}: "
                f"{{main: <your {part} section>, {name}: <your {key} section>}}"
            )
        data.setdefault(named, {})[name] = data.pop(key)
        notices.append(f"'{key}' is a GAN fork's key: read as '{named}.{name}'; rename it to silence this")
    return notices


def upgrade_legacy_schema(data: dict) -> list[str]:
    """Map the 2018-2019 pytorch-template keys onto today's, in place; one notice per mapped key."""
    notices = upgrade_gan_fork_keys(data)
    trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else None

    def moved(old: str, new: str) -> None:
        notices.append(
            f"'{old}' is a pytorch-template key of 2018-2019: read as '{new}'; rename it to silence this"
        )

    for section, enabled_key in (("tensorboard", "enabled"), ("visualization", "tensorboardX")):
        if isinstance(data.get(section), dict) and trainer is not None and enabled_key in data[section]:
            trainer.setdefault("tensorboard", bool(data.pop(section)[enabled_key]))
            moved(section, "trainer.tensorboard")
    if trainer is None:
        return notices
    for old, new in (("tensorboardX", "tensorboard"), ("save_freq", "save_period"), ("verbose", "verbosity")):
        if old in trainer:
            trainer.setdefault(new, trainer.pop(old))
            moved(f"trainer.{old}", f"trainer.{new}")
    if "log_dir" in trainer:
        trainer.pop("log_dir")
        notices.append(
            "'trainer.log_dir' is a pytorch-template key of 2018-2019: ignored, TensorBoard writes to "
            "save_dir/log/<name>/<run_id>; remove it to silence this"
        )
    if "monitor_mode" in trainer and isinstance(trainer.get("monitor"), str):
        trainer["monitor"] = f"{trainer.pop('monitor_mode')} {trainer['monitor']}"
        moved("trainer.monitor_mode", f"trainer.monitor: {trainer['monitor']}")
    return notices


class ConfigParser(Config):
    """pytorch-template's ConfigParser for project code written against it: item access, init_obj, init_ftn,
    get_logger, save_dir (the run's checkpoint directory), log_dir and resume. Like the original it makes the
    run directories, writes config.json there and sets up logging when constructed; torchkiln's own entry
    scripts never construct it."""

    def __init__(
        self,
        config: dict,
        resume: str | Path | None = None,
        modification: dict | None = None,
        run_id: str | None = None,
    ):
        from logger import setup_logging  # the template's side effects, paid only by projects that use it

        data = copy.deepcopy(dict(config))
        for key_path, value in (modification or {}).items():
            if value is not None:
                set_key(data, re.split(r"[;.]", key_path), value, key_path)
        super().__init__(data, "ConfigParser")
        self.run_id = run_id or datetime.now().strftime("%m%d_%H%M%S")
        self.resume = Path(resume) if resume else None
        save_dir = Path(self.trainer["save_dir"])
        self.save_dir = save_dir / "models" / self.data["name"] / self.run_id
        self.log_dir = save_dir / "log" / self.data["name"] / self.run_id
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.data, self.save_dir / "config.json")
        setup_logging(self.log_dir, self.data.get("trainer", {}).get("verbosity", 2))

    @property
    def config(self) -> dict:
        return self.data

    def get_logger(self, name: str, verbosity: int = 2) -> logging.Logger:
        """A named logger at verbosity 0, 1 or 2."""
        levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
        if verbosity not in levels:
            raise ConfigError(f"get_logger: verbosity must be 0, 1 or 2, not {verbosity!r}")
        logger = logging.getLogger(name)
        logger.setLevel(levels[verbosity])
        return logger

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
