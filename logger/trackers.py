"""Experiment trackers beside TensorBoard and metrics.csv: MLflow and Weights & Biases, chosen by
`trainer.loggers`, each behind the same four calls (scalars, hparams, artifact, close). Each package is
imported only when its tracker is chosen; validation has already said which are missing.

A tracker's run id is kept in every checkpoint (`TrackerRuns`), so `--resume` continues the same tracker run,
and a fine-tune (`-r CKPT -c new.yaml`) starts a new one that names the run it came from. Points the killed
run had already sent past its last checkpoint are not sent again: resuming is exact, so they would be the
same values at the same steps.
"""

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from utils.errors import without_password

logger = logging.getLogger(__name__)
TRACKERS = ("mlflow", "wandb")
LOGGERS = ("tensorboard", "csv", *TRACKERS)
EXTRA = {"mlflow": "mlflow", "wandb": "wandb"}  # the pyproject extra that installs each
ARGS = {"mlflow": ("tracking_uri", "experiment"), "wandb": ("project", "entity", "group", "tags")}


class TrackerRuns:
    """A checkpoint part: each tracker's run id, by tracker name. `previous` is what the checkpoint held;
    `fine_tune` (set by train.py when a config file comes with --resume) makes the new runs name it instead of
    continuing it."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.previous: dict[str, str] = {}
        self.fine_tune = False

    def state_dict(self) -> dict[str, Any]:
        return {"tracker_runs": dict(self.ids)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.previous = dict(state.get("tracker_runs") or {})  # absent before 0.2: nothing to continue

    def continued(self, name: str) -> str | None:
        return None if self.fine_tune else self.previous.get(name)

    def parent(self, name: str) -> str | None:
        return self.previous.get(name) if self.fine_tune else None


ONE_QUICK_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def server_problem(loggers: list) -> str | None:
    """Why a chosen MLflow tracking server cannot be used, or None. It is asked once, without MLflow's retries
    (minutes of back-off), before the run directory is claimed: a server that is down or a wrong address is
    one line, with nothing written. A local store (no tracking_uri, a file or database URI) is not asked."""
    for name, args in logger_specs(loggers):
        uri = str(args.get("tracking_uri") or "")
        if name != "mlflow" or not uri.startswith(("http://", "https://")):
            continue
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        before = {key: os.environ.get(key) for key in ONE_QUICK_TRY}
        os.environ.update(ONE_QUICK_TRY)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except MlflowException as error:
            server = f"the tracking server {without_password(uri)} ({_reason(error)})"
            return (
                f"mlflow cannot use {server}; start it or correct tracking_uri, or leave tracking_uri out to "
                "log to save_dir/mlflow.db"
            )
        finally:
            for key, value in before.items():
                if value is None:
                    del os.environ[key]
                else:
                    os.environ[key] = value
    return None


def _reason(error: Exception) -> str:
    """`Connection refused`, `it answered with error code 401`: the cause inside MLflow's long message."""
    text = str(error)
    refused = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    answered = re.search(r"error code (\d+)", text)
    if refused or answered:
        return refused.group(1) if refused else f"it answered with error code {answered.group(1)}"
    return text.strip().splitlines()[0][:120] if text.strip() else type(error).__name__


def logger_specs(loggers: list) -> list[tuple[str, dict]]:
    """`[tensorboard, {type: mlflow, args: {...}}]` -> [(name, args)]; validated by parse_config already."""
    return [
        (item, {}) if isinstance(item, str) else (item["type"], item.get("args") or {}) for item in loggers
    ]


class MlflowTracker:
    """An MLflow run through MlflowClient (no global active run). With no tracking_uri, a SQLite store under
    save_dir (`mlflow ui --backend-store-uri sqlite:///saved/mlflow.db`) with artifacts beside it."""

    name = "mlflow"

    def __init__(
        self, runs: TrackerRuns, title: str, save_dir: Path, run_dir: Path, hparams: dict, **args: Any
    ):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # a new store's migrations print INFO lines

        save_dir = Path(save_dir).resolve()
        uri = args.get("tracking_uri") or f"sqlite:///{save_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = args.get("experiment") or title.split("/")[0]
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifacts = None if args.get("tracking_uri") else (save_dir / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = runs.continued(self.name)
        self.logged: dict[str, int] = {}  # the last step of each metric already in the run
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.logged[key] = max(
                    point.step for point in self.client.get_metric_history(self.run_id, key)
                )
        else:
            tags = {"torchkiln.run_dir": str(run_dir)}
            tags.update(
                {"torchkiln.finetuned_from": runs.parent(self.name)} if runs.parent(self.name) else {}
            )
            self.run_id = self.client.create_run(experiment_id, run_name=title, tags=tags).info.run_id
            params = [Param(key, str(value)[:6000]) for key, value in hparams.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])
        runs.ids[self.name] = self.run_id
        self.pending: Any = None  # the last batch handed to MLflow's background thread
        how = "continued" if runs.continued(self.name) else "started"
        logger.info("MLflow run %s %s in %s (experiment %s)", self.run_id, how, uri, experiment_name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, v, now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if points:  # written by a background thread; one batch in flight at a time bounds the queue
            if self.pending is not None:
                self.pending.wait()  # done long since, unless logging outpaces the database
            self.pending = self.client.log_batch(self.run_id, metrics=points, synchronous=False)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        self.scalars(metrics, step)

    def artifact(self, path: Path) -> None:
        if path.is_file():
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        if self.pending is not None:
            self.pending.wait()
        self.client.set_terminated(self.run_id, status.upper())


class WandbTracker:
    """A Weights & Biases run; wandb's own environment decides the rest (WANDB_MODE=offline, WANDB_API_KEY).
    Its files go into the run's log directory."""

    name = "wandb"

    def __init__(
        self, runs: TrackerRuns, title: str, save_dir: Path, log_dir: Path, hparams: dict, **args: Any
    ):
        import wandb

        previous = runs.continued(self.name)
        config = dict(hparams)
        config.update({"finetuned_from": runs.parent(self.name)} if runs.parent(self.name) else {})
        self.run = wandb.init(
            project=args.get("project") or title.split("/")[0],
            entity=args.get("entity"),
            group=args.get("group"),
            tags=args.get("tags"),
            name=title,
            dir=str(log_dir),
            config=config,
            id=previous,
            resume="allow" if previous else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.first_step = self.run.step if previous else 0  # wandb drops steps below its own; so do we
        self.files: list[Path] = []
        runs.ids[self.name] = self.run.id
        how = "continued" if previous else "started"
        where = f"offline, in {log_dir / 'wandb'}" if self.run.offline else self.run.url
        logger.info("W&B run %s %s (%s)", self.run.id, how, where)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if step >= self.first_step:
            self.run.log(values, step=step)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(metrics)

    def artifact(self, path: Path) -> None:
        if path.is_file():
            self.files.append(path)

    def close(self, status: str) -> None:
        """The run's files as one artifact (config.yaml, info.log, run.json), then the run's end."""
        import wandb

        if self.files:
            artifact = wandb.Artifact(f"run-{self.run.id}", type="run-record")
            for path in self.files:
                artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "finished" else 1)


def open_trackers(
    loggers: list, runs: TrackerRuns, title: str, save_dir: Path, run: Any, hparams: dict
) -> list[Any]:
    """The chosen MLflow and W&B runs, opened (rank 0 only: the caller decides)."""
    opened = []
    for name, args in logger_specs(loggers):
        if name == "mlflow":
            opened.append(MlflowTracker(runs, title, save_dir, run.checkpoints, hparams, **args))
        elif name == "wandb":
            opened.append(WandbTracker(runs, title, save_dir, run.logs, hparams, **args))
    return opened
