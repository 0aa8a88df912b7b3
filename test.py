"""Evaluate a checkpoint on test data: python test.py -r CHECKPOINT_OR_RUN_DIR [-c data_override.yaml]. Under
torchrun the data is sharded and the sums all-reduced: the numbers equal a single process's.

The data is the config's test_data_loader section when it has one; otherwise its data_loader with the
pytorch-template convention `training=False` (or torchvision's `train=False` for a Dataset type). What is
evaluated is the trainer class's `evaluate_models` (the evaluation model's loss and metrics by default).
"""

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from logger import buffer_early_records, flush_early_records
from parse_config import Config, Request, parse_args
from trainer import options as project_options
from utils import distributed, user_code
from utils.errors import ConfigError, TrainingError, exit_after


def lookups() -> dict[str, Any]:
    """builders.lookups(), loaded when validation first needs it."""
    import builders

    return builders.lookups()


def _flags(parser: Any) -> None:
    parser.add_argument(
        "--onnx", help="evaluate this exported ONNX file (export.py) instead; -r defaults to its checkpoint"
    )


def with_onnx_source(argv: list[str] | None) -> list[str]:
    """The command line with `-r` set to the checkpoint an --onnx file was exported from (its export.json),
    when no -r is given: the config and test data come from there."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--onnx" not in args or {"-r", "--resume"} & set(args) or args.index("--onnx") + 1 >= len(args):
        return args
    manifest = Path(args[args.index("--onnx") + 1]).parent / "export.json"
    try:
        source = json.loads(manifest.read_text())["checkpoint"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "--onnx: no export.json beside it to name its checkpoint; give -r CHECKPOINT"
        ) from None
    return [*args, "-r", source]


def evaluate(config: Config, request: Request) -> dict[str, float]:
    """Build the models with the checkpoint's weights and the test data; their loss and metrics."""
    import torch
    from tqdm import tqdm

    import builders
    from base.checkpointer import describe_checkpoint, model_weights
    from base.train_step import autocast_for
    from logger.report import describe_data, run_header, shown_path
    from parse_config.references import References
    from parse_config.shapes import eval_model_name
    from utils.device import check_precision, gpus_wanted, prepare_device
    from utils.metrics import EpochMetrics
    from utils.seeding import seed_everything
    from utils.weights import load_model_state

    seed_everything(config["seed"])
    gpus = gpus_wanted(config["n_gpu"])
    distributed.init_process_group(use_cuda=gpus > 0 and torch.cuda.is_available())
    device, _ = prepare_device(min(gpus, 1))
    refs = References(config.source)
    refs.add(device=device)
    loader, section = builders.test_data(config, refs)  # the training data too, when a reference reads it
    eval_name, models = eval_model_name(config.data), builders.build_models(config, refs)
    wanted = {"precision": "32", "channels_last": False, "deterministic": False} | config.trainer
    options, _ = builders.fast_options(wanted, device, list(models.values()))  # what `auto` is here
    precision, channels_last = options["precision"], options["channels_last"]
    for name, model in models.items():
        load_model_state(model, model_weights(request.checkpoint, name, eval_name), request.checkpoint_path)
        models[name] = model.to(device, memory_format=torch.channels_last if channels_last else None)
    onnx_file = request.extra.get("onnx")
    if onnx_file:  # the exported file in place of the evaluation model: its accuracy, not only its outputs
        from base.exporting import OnnxModel

        models[eval_name] = OnnxModel(Path(onnx_file))
    criteria, metrics = builders.build_losses(config, refs), builders.build_metrics(config, refs)
    criteria = {name: c.to(device) if isinstance(c, torch.nn.Module) else c for name, c in criteria.items()}
    check_precision(precision, device)
    if distributed.is_main():
        rows = {
            "checkpoint": describe_checkpoint(request.checkpoint),
            "data": f"{section}: {describe_data('test', loader)}",
            "device": f"{device}, precision {precision}",
        }
        if onnx_file:
            rows["model"] = f"{onnx_file} through ONNX Runtime (in place of the checkpoint's {eval_name})"
        print(run_header(f"Test {config['name']}: {shown_path(request.checkpoint_path)}", rows))
    trainer_class = config.resolve("trainer.type", config.trainer["type"], builders.lookups()["trainer"])
    batches = tqdm(loader, desc="test", leave=False, disable=not sys.stderr.isatty())
    loss_names = trainer_class.logged or ("loss", *getattr(next(iter(criteria.values())), "terms", ()))
    results = trainer_class.evaluate_models(
        models, eval_name, criteria, batches, EpochMetrics(metrics, device, loss_names), device,
        autocast_for(precision, device), channels_last,
    )  # fmt: skip
    if not results:
        section = "test_data_loader" if config["test_data_loader"] else "data_loader"
        raise TrainingError(
            f"the test data ({section} of {config.source}) yielded no batches: nothing was evaluated"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    """Prints loss and metrics and writes them to <checkpoint>.test.json. Exit 2 on bad input, 1 when the test
    data yields nothing or the user's code raises."""
    early = buffer_early_records()  # warnings (a damaged optimizer part, a device fallback) go to stderr
    try:
        config, request = parse_args(
            with_onnx_source(argv),
            lookups,
            "Evaluate a checkpoint on test data.",
            project_options.PROJECT_OPTIONS,
            evaluating=True,
            extra=_flags,
        )
        if request.checkpoint is None:
            raise ConfigError(
                "test.py evaluates a checkpoint: give it with -r CHECKPOINT (or a run directory)"
            )
        if request.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        for notice in request.notices if distributed.env_rank() == 0 else ():
            print(f"warning: {notice}", file=sys.stderr)
        results = evaluate(config, request)
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
        flush_early_records(early)
        distributed.destroy_process_group()
    if distributed.env_rank() == 0:  # every rank computed the same all-reduced results
        for key, value in results.items():
            print(f"    {key:15s}: {value:.6g}")
        evaluated = Path(request.extra["onnx"]) if request.extra.get("onnx") else request.checkpoint_path
        output = evaluated.with_name(evaluated.stem + ".test.json")
        source = {"checkpoint": str(request.checkpoint_path)}
        source.update({"onnx": str(evaluated)} if evaluated != request.checkpoint_path else {})
        output.write_text(json.dumps({**source, **results}, indent=2) + "\n")
        print(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    exit_after(main())
