"""Evaluate a checkpoint on test data: python test.py -r CHECKPOINT [-c data_override.yaml]. Under torchrun the
data is sharded and the sums all-reduced: the numbers equal a single process's.

The data is the config's test_data_loader section when it has one; otherwise its data_loader with the
pytorch-template convention `training=False` (or torchvision's `train=False` for a Dataset type).
"""
import json
import sys

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from base.train_step import autocast_for, check_precision
from parse_config import Config, parse_args
from train import accepts, build_loader, build_model, exit_after, loss_and_metrics, lookups
from trainer import evaluate
from trainer import options as project_options
from utils import distributed, user_code
from utils.checkpoint import load_model_state
from utils.device import prepare_device
from utils.errors import ConfigError, TrainingError
from utils.metrics import EpochMetrics
from utils.seeding import seed_everything

EVALUATION_ARGS = {"shuffle": False, "validation_split": 0.0}


def evaluation_loader(config: Config) -> DataLoader:
    """The test data, in a fixed order and whole."""
    if config["test_data_loader"]:
        return build_loader(config, "test_data_loader", **EVALUATION_ARGS)
    loader_type = config.resolve("data_loader.type", config["data_loader"]["type"], lookups()["data_loader"])
    split = next((name for name in ("training", "train") if accepts(loader_type, name)), None)
    if split is None:
        raise ConfigError(f"{config.source}: data_loader.type: {config['data_loader']['type']} takes no `training` "
                          "or `train` argument to select test data: add a test_data_loader section")
    return build_loader(config, "data_loader", **EVALUATION_ARGS, **{split: False})


def main(argv: list[str] | None = None) -> int:
    """Prints loss and metrics and writes them to <checkpoint>.test.json. Exit 2 on bad input, 1 when the test
    data yields nothing or the user's code raises."""
    try:
        config = parse_args(argv, lookups(), "Evaluate a checkpoint on test data.", project_options.PROJECT_OPTIONS)
        if config.checkpoint is None:
            raise ConfigError("test.py evaluates a checkpoint: give it with -r CHECKPOINT")
        if config.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        for notice in config.notices if distributed.env_rank() == 0 else ():
            print(f"warning: {notice}", file=sys.stderr)
        seed_everything(config["seed"])
        distributed.init_process_group(use_cuda=config["n_gpu"] > 0 and torch.cuda.is_available())
        device, _ = prepare_device(min(config["n_gpu"], 1))
        model = build_model(config)
        weights = config.checkpoint.get("eval_weights", "state_dict")  # the EMA weights when training kept them
        load_model_state(model, config.checkpoint[weights], config.checkpoint_path)
        loader = evaluation_loader(config)
        criterion, metrics = loss_and_metrics(config)
        batches = tqdm(loader, desc="test", leave=False, disable=not sys.stderr.isatty())
        precision = config.trainer.get("precision", "32")
        check_precision(precision, device)
        results = evaluate(model.to(device), batches, criterion, EpochMetrics(metrics, device), device,
                           autocast_for(precision, device), config.trainer.get("channels_last", False))
        if not results:
            raise TrainingError(f"the test data ({config['test_data_loader'] and 'test_data_loader' or 'data_loader'}"
                                f" of {config.source}) yielded no batches: nothing was evaluated")
    except ConfigError as error:
        if distributed.env_rank() == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # raised in the user's model, dataset, loss or metric: show their frames
        print(user_code.describe(error), file=sys.stderr)
        return 1
    finally:
        distributed.destroy_process_group()
    if distributed.env_rank() == 0:  # every rank computed the same all-reduced results
        for key, value in results.items():
            print(f"    {key:15s}: {value:.6g}")
        output = config.checkpoint_path.with_name(config.checkpoint_path.stem + ".test.json")
        output.write_text(json.dumps({"checkpoint": str(config.checkpoint_path), **results}, indent=2) + "\n")
        print(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    exit_after(main())
