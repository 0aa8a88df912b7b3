"""Evaluate a checkpoint on test data: python test.py -r CHECKPOINT [-c data_override.yaml]. Under torchrun
the data is sharded and the sums all-reduced: the numbers equal a single process's.

The data is the config's test_data_loader section when it has one; otherwise its data_loader with the
pytorch-template convention `training=False` (or torchvision's `train=False` for a Dataset type).
"""

import json
import sys
from typing import Any

import yaml

from parse_config import parse_args
from trainer import options as project_options
from utils import distributed, user_code
from utils.errors import ConfigError, TrainingError, exit_after


def lookups() -> dict[str, Any]:
    """builders.lookups(), loaded when validation first needs it."""
    import builders

    return builders.lookups()


def main(argv: list[str] | None = None) -> int:
    """Prints loss and metrics and writes them to <checkpoint>.test.json. Exit 2 on bad input, 1 when the test
    data yields nothing or the user's code raises."""
    try:
        config, request = parse_args(
            argv, lookups, "Evaluate a checkpoint on test data.", project_options.PROJECT_OPTIONS
        )
        if request.checkpoint is None:
            raise ConfigError("test.py evaluates a checkpoint: give it with -r CHECKPOINT")
        if request.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        for notice in request.notices if distributed.env_rank() == 0 else ():
            print(f"warning: {notice}", file=sys.stderr)
        import torch
        from tqdm import tqdm

        import builders
        from base.checkpointer import eval_weights
        from base.train_step import autocast_for
        from trainer.trainer import evaluate
        from utils.device import check_precision, prepare_device
        from utils.metrics import EpochMetrics
        from utils.seeding import seed_everything
        from utils.weights import load_model_state

        seed_everything(config["seed"])
        distributed.init_process_group(use_cuda=config["n_gpu"] > 0 and torch.cuda.is_available())
        device, _ = prepare_device(min(config["n_gpu"], 1))
        model = builders.build_model(config)
        load_model_state(model, eval_weights(request.checkpoint), request.checkpoint_path)
        loader = builders.test_data(config)
        criterion, metrics = builders.loss_and_metrics(config)
        batches = tqdm(loader, desc="test", leave=False, disable=not sys.stderr.isatty())
        precision = config.trainer.get("precision", "32")
        check_precision(precision, device)
        results = evaluate(
            model.to(device),
            batches,
            criterion,
            EpochMetrics(metrics, device),
            device,
            autocast_for(precision, device),
            config.trainer.get("channels_last", False),
        )
        if not results:
            raise TrainingError(
                f"the test data ({config['test_data_loader'] and 'test_data_loader' or 'data_loader'}"
                f" of {config.source}) yielded no batches: nothing was evaluated"
            )
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
        output = request.checkpoint_path.with_name(request.checkpoint_path.stem + ".test.json")
        output.write_text(
            json.dumps({"checkpoint": str(request.checkpoint_path), **results}, indent=2) + "\n"
        )
        print(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    exit_after(main())
