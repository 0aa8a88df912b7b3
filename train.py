"""Train from a config: python train.py -c configs/mnist.yaml [key.path=value ...]; resume with -r.

The composition root, and only that: parse -> build (reading files only, so bad input leaves nothing behind)
-> claim the run directory -> logging -> fit. torch and the builders load once the command line holds, so that
`--help` answers at once.
"""

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from logger import FILE_ONLY, FITTED, buffer_early_records, flush_early_records, setup_logging
from parse_config import Config, Request, parse_args
from trainer import options as project_options
from utils import distributed, user_code
from utils.errors import ConfigError, TrainingError, TrainingInterrupted, exit_after

if TYPE_CHECKING:  # torch loads only once the command line holds
    from base.base_trainer import BaseTrainer
    from logger.report import Commands

logger = logging.getLogger("train")


def lookups() -> dict[str, Any]:
    """builders.lookups(), loaded when validation first needs it."""
    import builders

    return builders.lookups()


def build_trainer(config: Config, request: Request) -> tuple[Any, dict[str, dict[str, int]], dict[str, Any]]:
    """The configured Trainer with every object the run needs, restored from the checkpoint when resuming;
    the counts of each model's init_from weights, and what each `${...}` argument resolved to."""
    import torch

    import builders
    from logger.report import chosen_hparams
    from parse_config.options import parse_monitor
    from parse_config.references import References
    from parse_config.shapes import eval_model_name
    from utils import fast_defaults
    from utils.device import check_precision, gpus_wanted, prepare_device
    from utils.seeding import seed_everything, set_determinism

    seed_everything(config["seed"])
    set_determinism(config.trainer["deterministic"])
    device, _ = prepare_device(gpus_wanted(config["n_gpu"]))
    refs = References(config.source)
    refs.add(device=device)
    train_loader, valid_loader = builders.build_data(config, refs)
    if config.trainer["overfit_batches"]:  # the same few batches, trained and validated on
        train_loader, valid_loader = builders.overfit_data(
            train_loader, config.trainer["overfit_batches"], config["seed"]
        )
    models = builders.build_models(config, refs)
    init_counts = builders.init_from(models, config) if request.checkpoint is None else {}
    options, speed = builders.fast_options(config.trainer, device, list(models.values()))
    if config["n_gpu"] == "auto":  # the header says what auto found
        found = torch.cuda.device_count()
        speed.insert(0, f"n_gpu {found} (auto: {'visible GPUs' if found else 'no GPU visible, the CPU'})")
    check_precision(options["precision"], device)
    if options["reuse_host_memory"] and not fast_defaults.keep_host_memory():
        logger.warning("trainer.reuse_host_memory is on, but this process's malloc is not glibc's: no effect")
    models = {name: builders.place_model(model, device, options) for name, model in models.items()}
    losses = {
        name: loss.to(device) if isinstance(loss, torch.nn.Module) else loss
        for name, loss in builders.build_losses(config, refs).items()
    }
    optimizers = builders.build_optimizers(config, models, refs, device, speed)
    trainer_class = config.resolve("trainer.type", config.trainer["type"], builders.lookups()["trainer"])
    trainer = trainer_class(
        models,
        losses,
        builders.build_metrics(config, refs),
        optimizers,
        train_loader,
        device=device,
        options=options,
        monitor=parse_monitor(config.trainer["monitor"]),
        valid_data_loader=valid_loader,
        schedules=builders.build_lr_schedules(config, optimizers, train_loader, refs),
        seed=config["seed"],
        config=config.data,
        eval_model=eval_model_name(config.data),
    )
    trainer.speed = speed
    trainer.hparams = chosen_hparams(config.data, config.overrides)
    if request.checkpoint is not None:
        trainer.restore(request.checkpoint, request.checkpoint_path, config.user_data, request.allow_inexact)
        # a resume with a config file that changes the run is a fine-tune: new MLflow/W&B runs naming the
        # ones they came from (overrides alone, as in training longer, continue the same runs)
        with_file = config.source != str(request.checkpoint_path)
        trainer.tracker_runs.fine_tune = with_file and request.checkpoint.get("config") != config.data
    return trainer, init_counts, refs.resolved


def rehearse(config: Config, trainer: Any) -> str | None:
    """Pass one real batch through the run before anything is written; a failure that a config value explains
    is a ConfigError naming it, one in the user's code keeps its frames. Under DDP the failing rank says
    why, and the others stop with it."""
    import builders
    from base.base_data_loader import unseeded
    from base.rehearsal import RehearsalFailure
    from base.rehearsal import rehearse as rehearse_batches
    from parse_config.blame import class_count_mismatch, explain_rehearsal

    mismatch = class_count_mismatch(config, unseeded(trainer.data_loader.dataset))
    if mismatch is not None:  # before the rehearsal, which would find it only if a batch held such a label
        raise mismatch
    try:
        return rehearse_batches(trainer, config.trainer["summary_depth"])
    except RehearsalFailure as failure:
        explained = explain_rehearsal(config, failure, builders.lookups())
        if isinstance(explained, ConfigError) and distributed.env_rank() != 0:
            print(f"error: {explained}", file=sys.stderr)  # main() says a ConfigError on rank 0 only
        raise explained from None


def start_run(
    config: Config, request: Request, trainer: Any, references: dict, early: logging.Handler
) -> Any:
    """Claim the run directory, write config.yaml with what `auto` and the `${...}` arguments became, and
    start logging into it."""
    from base.base_data_loader import unseeded
    from logger.run_record import start_record
    from utils.run_directory import claim_run_directory

    run = claim_run_directory(
        config.trainer["save_dir"],
        config["name"],
        request.run_id,
        request.explicit_run_id,
        request.checkpoint_path,
        config.source,
    )
    if distributed.is_main():
        run.logs.mkdir(parents=True, exist_ok=True)
        loaders = {"data_loader": trainer.data_loader, "valid_data_loader": trainer.valid_data_loader}
        resolved = {"device": str(trainer.device)}
        chosen = ("precision", "channels_last", "background_saves", "reuse_host_memory")
        resolved.update({key: trainer.options[key] for key in chosen})
        for key, loader in loaders.items():
            if loader is not None:
                resolved[key] = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory}
                resolved[key]["persistent_workers"] = loader.persistent_workers
        resolved.update({"references": references} if references else {})
        text = yaml.safe_dump({**config.data, "resolved": resolved}, sort_keys=False)
        (run.checkpoints / "config.yaml").write_text(text)
        dataset = unseeded(trainer.data_loader.dataset)
        command = ["torchrun" if distributed.launched_by_torchrun() else "python", "train.py", *request.argv]
        start_record(run.checkpoints, command, config.data, trainer.device, dataset, request.checkpoint_path)
    setup_logging(run.logs, config.trainer["verbosity"], early, main=distributed.is_main())
    return run


def log_start(
    config: Config,
    request: Request,
    trainer: Any,
    run: Any,
    init_counts: dict[str, dict[str, int]],
    layers: str | None = None,
) -> None:
    """The header, the model's layer table (info.log; the console too with --summary) and notices."""
    from logger.report import describe_run

    for notice in request.notices:
        logger.warning("%s", notice)
    logger.info(
        "%s", layers or trainer.unwrapped_model, extra={} if request.summary and layers else FILE_ONLY
    )
    header = describe_run(trainer, run, f"Run {config['name']}/{run.run_id}", config.source)
    logger.info("%s", header, extra=FITTED)  # a long row wraps under its value's column
    if not trainer.batches.exact:
        logger.info(
            "data_loader %s is not a BaseDataLoader: resuming inside an epoch re-reads the batches "
            "already trained on, and is exact when its order and worker seeds come from torch's global "
            "RNG (a DataLoader without persistent_workers)",
            config["data_loader"]["type"],
        )
    for path, counts in init_counts.items():
        logger.info("init_from %s: %s", config.node(path)["init_from"]["path"], counts)
    if request.checkpoint is not None:
        logger.info(
            "Resuming from %s: epoch %d, batch %d",
            request.checkpoint_path,
            trainer.progress.epoch + 1,
            trainer.progress.batches_in_epoch,
        )


def log_summary(config: Config, trainer: Any, run: Any, commands: Any, request: Request) -> None:
    """Elapsed time, the best epoch and where things are, with the commands to run next."""
    import builders
    from logger.report import run_summary

    stopped_early, monitor = trainer.monitor.should_stop, trainer.monitor
    start = request.checkpoint
    resumed_at = None
    if start is not None:
        began = (start["epoch"] + 1, start.get("batches_in_epoch", 0), start.get("global_step", 0))
        resumed_at = (*began, trainer.global_step)
    summary = run_summary(
        trainer.elapsed, trainer.progress.epoch, stopped_early, monitor, run.checkpoints, run.logs,
        config.trainer["tensorboard"], commands, builders.has_test_data(config), resumed_at,
    )  # fmt: skip
    logger.info("%s", summary)
    exporter = trainer.checkpointer.exporter
    if exporter is not None:
        best = run.checkpoints / "model_best.pth"
        logger.info("  export    %s", exporter.finish(best, run.checkpoints / "checkpoint-last.pth"))


def trial_reporter(epochs: int) -> Any:
    """The Optuna trial this run is, when sweep.py started it (else None)."""
    from sweeps.reporter import from_environment

    return from_environment(epochs)


def export_job(config: Config, commands: "Commands") -> Any:
    from base.export_job import ExportJob

    block = config["export"]
    return ExportJob(block.get("format", "both"), block.get("when", "best"), commands.flags.split())


def nothing_to_train(trainer: "BaseTrainer", resumed_from: Path, commands: "Commands") -> str | None:
    """Why fit() would train nothing after resuming `resumed_from`, with how to train longer; None if it
    would train."""
    run, done = resumed_from.parent, trainer.progress.epoch
    if trainer.monitor.should_stop:
        return (
            f"{resumed_from}: this run stopped early at epoch {done} ({trainer.monitor.early_stop} epochs "
            f"without improvement). To train on: {commands.resume(run, 'trainer.early_stop=0')}"
        )
    if done >= trainer.epochs and trainer.progress.batches_in_epoch == 0:
        return (
            f"{resumed_from}: this run is finished ({done} of {trainer.epochs} epochs). To train longer: "
            f"{commands.train_longer(run, resumed_from, done + trainer.epochs)}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 training failed or the user's code raised, 2 bad input (nothing written),
    128+N stopped by signal N."""
    early, run = buffer_early_records(), None
    try:
        config, request = parse_args(
            argv, lookups, "Train a model from a YAML or JSON config.", project_options.PROJECT_OPTIONS
        )
        if request.print_only:
            print(yaml.safe_dump(config.data, sort_keys=False), end="")
            return 0
        if request.device_ids is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = request.device_ids
        import torch

        import builders
        import preflight
        from utils.device import gpus_wanted

        gpus = gpus_wanted(config["n_gpu"])
        if gpus > 1 and torch.cuda.device_count() > 1 and not distributed.launched_by_torchrun():
            return distributed.launch_local_processes(
                min(gpus, torch.cuda.device_count()), sys.argv[1:] if argv is None else argv
            )
        distributed.init_process_group(use_cuda=gpus > 0 and torch.cuda.is_available())
        trainer, init_counts, references = build_trainer(config, request)  # reads files only, writes nothing
        commands = builders.commands_for(config, project_options.PROJECT_OPTIONS)
        done = request.checkpoint is not None and nothing_to_train(trainer, request.checkpoint_path, commands)
        if done:
            if distributed.is_main():
                print(done)
            return 0
        trainer.monitor.judge = trial_reporter(trainer.epochs)  # in a sweep, Optuna may prune the run
        layers = rehearse(config, trainer)  # one real batch through the run's code; still nothing written
        if request.fast_dev_run:
            return preflight.fast_dev_run(config, request, early, build_trainer, start_run)
        if request.find_lr:
            return preflight.find_lr(config, request, trainer, references, early, start_run)
        preflight.check_services(config)  # export's packages, the MLflow server: before anything is written
        run = start_run(config, request, trainer, references, early)
        log_start(config, request, trainer, run, init_counts, layers)
        if config["export"] and distributed.is_main():
            trainer.checkpointer.exporter = export_job(config, commands)
        trainer.fit(run, commands)
        log_summary(config, trainer, run, commands, request)
    except ConfigError as error:
        if distributed.env_rank() == 0:  # every rank finds the same error: say it once
            print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        logger.error("%s", error, extra=FILE_ONLY)
        print(" ".join([f"error: {error}", *getattr(error, "__notes__", [])]), file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        logger.warning("%s", stop)
        return stop.exit_status
    except KeyboardInterrupt:  # before training began (importing, building): nothing to save
        print("Stopped by Ctrl-C before training began", file=sys.stderr)
        return 130
    except Exception as error:  # raised in the user's model, dataset, loss or metric: show their frames
        logger.error("The run crashed", exc_info=error, extra=FILE_ONLY)
        one_line = user_code.compile_failure(error) or user_code.worker_death(error)
        print(f"error: {one_line}" if one_line else user_code.describe(error), file=sys.stderr)
        return 1
    finally:
        flush_early_records(early)
        distributed.destroy_process_group()
        if run is not None:
            run.release()
    return 0


if __name__ == "__main__":
    exit_after(main())
