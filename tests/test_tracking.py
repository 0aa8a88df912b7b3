"""Tracking: MLflow and W&B beside TensorBoard and metrics.csv, resumed with the run; run.json; compare.py."""
import csv
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_resume import MID, MID_EPOCH_2_STEP, _reference

import compare
import train
from conftest import load, run_dir, tiny_config, write_config


def _mlflow(tmp_path):
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'saved' / 'mlflow.db'}")


def _runs(client, experiment="tiny"):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _csv_points(path, tag):
    with open(path, newline="") as handle:
        return [(int(row["step"]), float(row["value"])) for row in csv.DictReader(handle) if row["tag"] == tag]


def test_an_mlflow_run_on_the_local_store_has_params_metrics_and_the_run_files(tmp_path):
    config = tiny_config(tmp_path, loggers=["csv", "mlflow"], log_step=1)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "ml", "optimizer.args.lr=0.002"]) == 0
    client = _mlflow(tmp_path)
    (run,) = _runs(client)
    assert run.info.run_name == "tiny/ml" and run.info.status == "FINISHED"
    assert run.data.tags["torchkiln.run_dir"] == str(run_dir(tmp_path, "ml"))
    assert run.data.params["optimizer.args.lr"] == "0.002" and run.data.params["trainer.epochs"] == "2"
    assert "trainer.save_dir" not in run.data.params and "trainer.verbosity" not in run.data.params
    logs = tmp_path / "saved/log/tiny/ml/metrics.csv"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == _csv_points(logs, "train/loss")
    best = load(run_dir(tmp_path, "ml") / "checkpoint-last.pth")
    assert run.data.metrics["best/val_loss"] == pytest.approx(best["monitor_best"])
    assert run.data.metrics["last/val_loss"] == pytest.approx(_csv_points(logs, "epoch/val_loss")[-1][1])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "info.log", "run.json"]
    assert best["tracker_runs"] == {"mlflow": run.info.run_id}


def test_a_resume_continues_the_same_mlflow_run_without_a_duplicate_step(tmp_path):
    reference = _reference(tmp_path, 0, log_step=1, loggers=["csv", "mlflow"])
    client = _mlflow(tmp_path)
    (run,) = _runs(client)
    before = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}
    assert max(before["train/loss"]) > MID_EPOCH_2_STEP  # the run had logged past the checkpoint resumed from
    assert train.main(["-r", str(reference / MID)]) == 0  # as after a kill at that step: into the same run
    assert train.main(["-r", str(reference), "trainer.epochs=4"]) == 0  # and trained longer
    (again,) = _runs(client)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    after = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in again.data.metrics}
    for key, steps in after.items():
        assert len(steps) == len(set(steps)), key  # no step twice
    assert after["train/loss"][: len(before["train/loss"])] == before["train/loss"]
    assert len(after["epoch/val_loss"]) == 4  # epochs 1-3, then the 4th of the longer run


def test_a_fine_tune_starts_a_new_mlflow_run_naming_the_one_it_came_from(tmp_path):
    config = tiny_config(tmp_path, loggers=["mlflow"], epochs=1)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "base"]) == 0
    config["optimizer"]["args"]["lr"] = 1e-4
    config["trainer"]["epochs"] = 2
    tuned = write_config(tmp_path, config, "tune.yaml")
    assert train.main(["-r", str(run_dir(tmp_path, "base")), "-c", str(tuned), "--run-id", "tuned"]) == 0
    client = _mlflow(tmp_path)
    runs = {run.info.run_name: run for run in _runs(client)}
    assert set(runs) == {"tiny/base", "tiny/tuned"}
    assert runs["tiny/tuned"].data.tags["torchkiln.finetuned_from"] == runs["tiny/base"].info.run_id
    assert load(run_dir(tmp_path, "tuned") / "checkpoint-last.pth")["tracker_runs"] == {"mlflow": runs["tiny/tuned"].info.run_id}


def test_wandb_offline_writes_its_run_files_with_the_scalars_config_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tmp_path, loggers=["tensorboard", {"type": "wandb", "args": {"project": "tiny-tests"}}])
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "wb"]) == 0
    run_id = load(run_dir(tmp_path, "wb") / "checkpoint-last.pth")["tracker_runs"]["wandb"]
    (record,) = (tmp_path / "saved/log/tiny/wb/wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = record.read_bytes()
    for expected in (b"train/loss", b"epoch/val_loss", b"optimizer.args.lr", b"best/val_loss", b"tiny-tests",
                     b"run.json", b"info.log"):
        assert expected in data, expected
    assert f"W&B run {run_id} started (offline" in (tmp_path / "saved/log/tiny/wb/info.log").read_text()


@pytest.mark.parametrize("logger, extra", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_chosen_logger_that_is_not_installed_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                        logger, extra):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == logger else real(name, *a))
    path = write_config(tmp_path, tiny_config(tmp_path, loggers=["csv", logger]))
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: trainer.loggers: {logger} is not installed: "
                                       f"pip install -e \".[{extra}]\"\n")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("uri, shown", [("http://127.0.0.1:1", "http://127.0.0.1:1"),
                                        ("http://ada:s3cret@127.0.0.1:1/", "http://ada:***@127.0.0.1:1/")])
def test_an_mlflow_server_that_does_not_answer_is_one_line_before_anything_is_written(tmp_path, capsys, uri, shown):
    config = tiny_config(tmp_path, loggers=["csv", {"type": "mlflow", "args": {"tracking_uri": uri}}])
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: trainer.loggers: mlflow cannot use the tracking server {shown} "
                                       "(Connection refused); start it or correct tracking_uri, or leave tracking_uri "
                                       "out to log to save_dir/mlflow.db\n")
    assert not (tmp_path / "saved").exists()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # MLflow's own retries are back for the run


def test_an_unknown_logger_or_argument_is_one_line_with_did_you_mean(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, loggers=["tensorbord"]))
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: trainer.loggers: 'tensorbord' is not one of tensorboard, csv, "
                                       "mlflow, wandb (did you mean 'tensorboard'?)\n")
    path = write_config(tmp_path, tiny_config(tmp_path, loggers=[{"type": "mlflow", "args": {"experiment_name": "x"}}]))
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: trainer.loggers: mlflow takes no argument 'experiment_name' "
                                       "(did you mean 'experiment'?) (it takes tracking_uri, experiment)\n")


def _git(tmp_path, *args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)


@pytest.mark.parametrize("dirty", [False, True])
def test_run_json_records_the_commit_the_tree_the_versions_the_data_and_the_checkpoints(tmp_path, dirty):
    (tmp_path / ".gitignore").write_text("saved/\n")
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    if dirty:
        path.write_text(path.read_text().replace("seed: 7", "seed: 8"))
    assert train.main(["-c", str(path), "--run-id", "rec"]) == 0
    run = run_dir(tmp_path, "rec")
    record = json.loads((run / "run.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == head and record["git"]["dirty"] is dirty
    assert ((run / "run.diff").read_text().count("+seed: 8") == 1) if dirty else not (run / "run.diff").exists()
    assert record["command"] == ["python", "train.py", "-c", str(path), "--run-id", "rec"]
    import torch
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["device"] == "cpu"
    assert record["determinism"]["seed"] == (8 if dirty else 7)
    assert record["data"]["length"] == 320 and record["data"]["of"] == "data and targets arrays"
    assert len(record["config_sha256"]) == 64 and record["status"] == "finished" and record["steps"] == 8
    for name, digest in record["checkpoints"].items():
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digest
    assert set(record["checkpoints"]) == {p.name for p in run.glob("*.pth")}
    text = json.dumps(record)
    assert "PATH" not in text and "HOME" not in text  # no environment variables


def test_the_data_fingerprint_changes_with_the_data_and_not_with_the_run(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "a"]) == 0
    assert train.main(["-c", str(path), "--run-id", "b", "seed=3"]) == 0
    assert train.main(["-c", str(path), "--run-id", "c", "data_loader.args.limit=300"]) == 0
    data = {run: json.loads((run_dir(tmp_path, run) / "run.json").read_text())["data"] for run in "abc"}
    assert data["a"] == data["b"] and data["a"]["sha256"] != data["c"]["sha256"]


def _seeded_runs(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=2))
    for lr in (0.001, 0.003, 0.01):
        for seed in (1, 2):
            assert train.main(["-c", str(path), "--run-id", f"lr{lr}_s{seed}", f"optimizer.args.lr={lr}",
                               f"seed={seed}"]) == 0


def test_compare_groups_three_configs_over_two_seeds_as_mean_and_std_and_plots(tmp_path, capsys):
    _seeded_runs(tmp_path)
    capsys.readouterr()
    assert compare.main(["saved/models/tiny/*", "--csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [row["run"] for row in rows] == [f"tiny/lr{lr}_s{s}" for lr in ("0.001", "0.003", "0.01") for s in (1, 2)]
    assert set(rows[0]) == {"run", "optimizer.args.lr", "seed", "best val_loss", "last val_loss", "epochs", "wall s",
                            "steps/s"}
    best = {row["run"]: load(run_dir(tmp_path, row["run"].split("/")[1]) / "checkpoint-last.pth")["monitor_best"]
            for row in rows}
    assert all(float(row["best val_loss"]) == pytest.approx(best[row["run"]], rel=1e-3) for row in rows)
    assert compare.main(["saved/models/tiny/*", "--group-by", "seed", "--md", "--plot", "curves.png"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| runs | optimizer.args.lr | best val_loss | last val_loss | epochs | wall s | steps/s |"
    import statistics
    pair = [best["tiny/lr0.003_s1"], best["tiny/lr0.003_s2"]]
    cells = out[3].split(" | ")
    assert cells[:2] == ["| 2 runs", "0.003"]
    assert cells[2] == f"{statistics.mean(pair):.4g} ± {statistics.stdev(pair):.2g}" and cells[4] == "2 ± 0"
    assert out[-1] == "val_loss curves written to curves.png"
    assert Path("curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_what_is_not_a_run_and_an_unknown_group_key(tmp_path, capsys, monkeypatch):
    _seeded_runs(tmp_path)
    capsys.readouterr()
    assert compare.main(["saved/models/tiny/*", "--group-by", "sead"]) == 2
    assert capsys.readouterr().err == ("error: --group-by sead: not a key whose value differs between these runs "
                                       "(those are: optimizer.args.lr, seed)\n")
    assert compare.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: not a run directory")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert compare.main(["saved/models/tiny/*", "--plot", "x.png"]) == 2
    assert capsys.readouterr().err == 'error: --plot needs matplotlib: pip install -e ".[plot]"\n'


def test_hparams_hold_the_keys_that_vary_and_the_command_lines_and_the_best_epochs_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = tiny_config(tmp_path, epochs=2, tensorboard=True)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "hp", "trainer.log_step=3"]) == 0
    events = EventAccumulator(str(tmp_path / "saved/log/tiny/hp"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    keys = set(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    assert {"optimizer.type", "optimizer.args.lr", "lr_scheduler.args.gamma", "data_loader.args.batch_size",
            "trainer.epochs", "seed", "arch.type", "trainer.log_step"} <= keys
    assert not keys & {"trainer.save_dir", "trainer.verbosity", "data_loader.args.data_dir", "trainer.progress_bar"}
    checkpoint = load(run_dir(tmp_path, "hp") / "checkpoint-last.pth")
    assert events.Scalars("hparams/best/val_loss")[0].value == pytest.approx(checkpoint["monitor_best"])
    assert events.Scalars("hparams/best/epoch")[0].value == checkpoint["monitor_best_epoch"]


def test_a_resume_continues_the_same_wandb_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reference = _reference(tmp_path, 0, loggers=["csv", "wandb"])
    run_id = load(reference / MID)["tracker_runs"]["wandb"]
    assert train.main(["-r", str(reference / MID)]) == 0  # as after a kill: into the same run
    assert load(reference / "checkpoint-last.pth")["tracker_runs"] == {"wandb": run_id}
    assert sorted((tmp_path / "saved/log/tiny/reference/wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert f"W&B run {run_id} continued" in (tmp_path / "saved/log/tiny/reference/info.log").read_text()
