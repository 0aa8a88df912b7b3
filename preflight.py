"""The checks before a long run, beside train.py: the packages and servers the run will need, the fast dev run
(a few batches through every stage, in a temporary run directory) and the learning-rate range test. train.py
passes in how it builds a trainer and starts a run, so that the dry run is the real run made small."""

import shlex
from typing import Any, Callable

import builders
from parse_config import Config, Request
from trainer import options as project_options
from utils import distributed
from utils.errors import ConfigError


def check_services(config: Config) -> None:
    """What the run needs besides its own code, said before anything is written: the `export:` block's ONNX
    packages, and a chosen MLflow server that answers."""
    import importlib.util

    from logger.trackers import server_problem

    if config["export"] and config["export"].get("format", "both") in ("onnx", "both"):
        for package in ("onnx", "onnxscript", "onnxruntime"):
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    config.located("export.format", f'ONNX needs {package}: pip install -e ".[export]"')
                )
    problem = server_problem(config.trainer["loggers"])
    if problem:
        raise ConfigError(config.located("trainer.loggers", problem))


def fast_dev_run(config: Config, request: Request, early: Any, build: Callable, start: Callable) -> int:
    """The check before a long run: N training and validation batches, a save, a resume from it and a test
    pass, in a temporary run directory that is removed; one line per stage. The run is the config's with 2
    epochs of N batches (a schedule fixed to the run's length is sized for that); epoch 1 trains, is saved,
    and epoch 2 trains in a second trainer resumed from the checkpoint. `build` and `start` are train.py's
    build_trainer and start_run."""
    import dataclasses
    import tempfile
    import time

    from utils.checkpoint import load_checkpoint

    started, batches = time.monotonic(), request.fast_dev_run
    with tempfile.TemporaryDirectory(prefix="torchkiln-fast-dev-run-") as directory:
        # its records stay in the temporary directory: no MLflow or W&B run outlives the dry run
        quiet = {"save_dir": directory, "epochs": 2, "len_epoch": batches, "save_period": 1, "verbosity": 0,
                 "progress_bar": False, "early_stop": 0, "save_every_steps": 0,
                 "loggers": ["csv"]}  # fmt: skip
        data = {**config.data, "export": None, "trainer": {**config.trainer, **quiet}}
        config = dataclasses.replace(config, data=data)
        print(f"fast dev run: {batches} batches per stage, in {directory} (removed afterwards)")
        trainer, run = _dev_trainer(config, request, early, batches, build, start)
        trainer.epochs = 1
        trainer.fit(run, builders.commands_for(config, project_options.PROJECT_OPTIONS))
        _stage("train", f"{trainer.len_epoch} batches, loss {trainer.train_metrics.result()['loss']:.4g}")
        validated = trainer.valid_metrics.result()
        _stage("validate", f"{len(trainer.valid_data_loader)} batches, loss {validated['loss']:.4g}"
               if validated else "no validation data")  # fmt: skip
        last = run.checkpoints / "checkpoint-last.pth"
        _stage("save", f"{last.name}, {last.stat().st_size / 1024:,.0f} KiB")
        run.release()
        again = dataclasses.replace(request, checkpoint_path=last, checkpoint=load_checkpoint(last))
        trainer, run = _dev_trainer(config, again, early, batches, build, start)
        trainer.fit(run)
        _stage("resume", f"epoch 2 from {last.name}: {trainer.len_epoch} batches, step {trainer.global_step}")
        run.release()
        _stage("test", _test_pass(config, trainer, batches))
    print(f"fast dev run passed in {time.monotonic() - started:.1f} s: the config runs end to end")
    return 0


def _dev_trainer(
    config: Config, request: Request, early: Any, batches: int, build: Callable, start: Callable
) -> tuple[Any, Any]:
    from base.base_data_loader import FirstBatches

    trainer, _, references = build(config, request)
    if trainer.valid_data_loader is not None:
        trainer.valid_data_loader = FirstBatches(trainer.valid_data_loader, batches)
    return trainer, start(config, request, trainer, references, early)


def find_lr(
    config: Config, request: Request, trainer: Any, references: dict, early: Any, start: Callable
) -> int:
    """The learning-rate range test on copies of the model and optimizer; its curve goes into the run's log
    directory, and the suggested rate is printed with the override that uses it. `start` is train.py's
    start_run."""
    from base.lr_finder import range_test, suggestion, write_curve
    from parse_config.shapes import entries

    if trainer.optimizer is None or len(trainer.models) > 1 or trainer.criterion is None:
        raise ConfigError(f"{config.source}: --find-lr tests one model with one optimizer and one loss")
    run = start(config, request, trainer, references, early)
    lrs, losses, suggested, files = [], [], None, []
    try:
        if distributed.is_main():  # under DDP rank 0 alone, on a copy of its model, with the global batch
            model, optimizer, loss = trainer.unwrapped_model, trainer.optimizer, trainer.criterion
            batches = builders.global_batches(trainer.data_loader, config["seed"])
            lrs, losses = range_test(
                model, optimizer, loss, batches, trainer.device,
                autocast=trainer.step.autocast, channels_last=trainer.options["channels_last"],
            )  # fmt: skip
            suggested = suggestion(lrs, losses)
            files = write_curve(lrs, losses, suggested, run.logs)
    finally:
        distributed.any_rank(False, trainer.device)  # the other ranks wait for rank 0's test here
        run.release()
    if not distributed.is_main():
        return 0
    schedules = [e.node.get("type", "") for e in entries(config.data, "scheduler")]
    key = "lr_scheduler.args.max_lr" if any(t.endswith(("OneCycleLR", "CyclicLR")) for t in schedules) else (
        "optimizer.args.lr")  # fmt: skip
    print(f"LR range test: {len(lrs)} steps from {lrs[0]:.0e} to {lrs[-1]:.1e} on copies of the model and "
          f"optimizer, batches of {batches.batch_size} (the run's state is untouched)")  # fmt: skip
    if suggested is None:
        print("  no suggestion: the loss diverged within the first steps; lower the range's start")
    else:
        launcher = builders.commands_for(config, project_options.PROJECT_OPTIONS).train
        print(f"  suggested lr {suggested:.2e}, where the smoothed loss falls fastest")
        print(f"  to use it:  {launcher} -c {shlex.quote(config.source)} {key}={suggested:.2g}")
    print(f"  curve:      {', '.join(str(path) for path in files)}")
    return 0


def _test_pass(config: Config, trainer: Any, batches: int) -> str:
    """test.py's evaluation on the first batches of the test data, with the resumed run's models."""
    from base.base_data_loader import FirstBatches
    from utils.metrics import EpochMetrics

    if not builders.has_test_data(config):
        return "skipped: no test data (a test_data_loader section)"
    loader, section = builders.test_data(config)
    metrics = EpochMetrics(
        trainer.metric_ftns, trainer.device, tuple(trainer.valid_metrics.loss_names), False
    )
    results = type(trainer).evaluate_models(
        trainer.unwrapped_models, trainer.eval_name, trainer.criteria, FirstBatches(loader, batches), metrics,
        trainer.device, trainer.step.autocast, trainer.options["channels_last"],
    )  # fmt: skip
    shown = ", ".join(f"{key} {value:.4g}" for key, value in results.items())
    return f"{min(batches, len(loader))} batches of {section}: {shown}"


def _stage(name: str, outcome: str) -> None:
    if distributed.is_main():
        print(f"  {name:<9} ok: {outcome}", flush=True)
