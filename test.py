"""Evaluate a checkpoint on the test split: python test.py -r CHECKPOINT [-c data_override.yaml]."""
import json
import sys

import yaml
from tqdm import tqdm

import data_loader.data_loaders as module_data
from parse_config import parse_args
from train import build_model, loss_and_metrics, lookups
from trainer import evaluate
from utils.checkpoint import load_model_state
from utils.device import prepare_device
from utils.errors import ConfigError
from utils.metrics import MetricTracker
from utils.seeding import seed_everything


def main(argv: list[str] | None = None) -> int:
    """Prints loss and metrics and writes them to <checkpoint>.test.json. Exit 2 on bad input."""
    try:
        config = parse_args(argv, lookups(), "Evaluate a checkpoint on the test split of its dataset.")
        if config.checkpoint is None:
            raise ConfigError("test.py evaluates a checkpoint: give it with -r CHECKPOINT")
        if config.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        seed_everything(config["seed"])
        device, _ = prepare_device(min(config["n_gpu"], 1))
        model = build_model(config)
        load_model_state(model, config.checkpoint["state_dict"], config.checkpoint_path)
        config["data_loader"].setdefault("args", {}).update(training=False, shuffle=False, validation_split=0.0)
        loader = config.build("data_loader", lookup=module_data)
        criterion, metrics = loss_and_metrics(config)
        batches = tqdm(loader, desc="test", leave=False, disable=not sys.stderr.isatty())
        results = evaluate(model.to(device), batches, criterion, metrics, device, MetricTracker("loss", *metrics))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, value in results.items():
        print(f"    {key:15s}: {value}")
    output = config.checkpoint_path.with_name(config.checkpoint_path.stem + ".test.json")
    output.write_text(json.dumps({"checkpoint": str(config.checkpoint_path), **results}, indent=2) + "\n")
    print(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
