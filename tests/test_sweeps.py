"""sweep.py: Optuna sweeps whose trials are ordinary runs, continued exactly after an interruption."""
import csv
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from test_reliability import GATED, _wait_for

import sweep
from conftest import ROOT, load, tiny_config, write_config


def _sweep_file(tmp_path, base, name="s", **fields):
    data = {"name": name, "config": str(base), "objective": "min val_loss", **fields}
    path = tmp_path / f"sweep_{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _study(tmp_path, name="s"):
    url = f"sqlite:///{tmp_path / 'saved' / 'sweeps' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url)


def _ledger(tmp_path, name="s"):
    with open(tmp_path / "saved" / "sweeps" / name / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def _sweep(path, *args, cwd, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "-c", str(path), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen)


LR = {"optimizer.args.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


@pytest.mark.slow
def test_the_readme_example_sweep_finishes_with_its_ledger_summary_and_a_run_per_trial(tmp_path):
    for part in ("configs", "data"):
        (tmp_path / part).symlink_to(ROOT / part)
    done = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-c", "configs/sweeps/mnist.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _ledger(tmp_path, "mnist_sweep")
    assert [int(row["number"]) for row in rows] == list(range(5))
    assert {row["state"] for row in rows} <= {"COMPLETE", "PRUNED"} and "COMPLETE" in {row["state"] for row in rows}
    for row in rows:
        stored = yaml.safe_load((Path(tmp_path / row["run_dir"]) / "config.yaml").read_text())
        assert stored["lr_scheduler"]["args"]["max_lr"] == float(row["lr_scheduler.args.max_lr"])
        assert stored["data_loader"]["args"]["batch_size"] == int(row["data_loader.args.batch_size"])
        assert stored["trainer"]["monitor"] == "max val_accuracy" and stored["trainer"]["epochs"] == 3
    summary = (tmp_path / "saved/sweeps/mnist_sweep/summary.txt").read_text()
    best = max((row for row in rows if row["state"] == "COMPLETE"), key=lambda row: float(row["val_accuracy"]))
    assert f"best      trial {best['number']}: max val_accuracy" in summary
    assert f"retrain   python train.py -c saved/models/mnist_sweep/trial_{int(best['number']):03d}/config.yaml" in summary
    assert "importance " in summary and summary in done.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The one-trial sweep run without a stop: the weights an interrupted one must end with."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    (tmp_path / "go").touch()
    reference = _sweep(_gated_sweep(tmp_path, "reference"), cwd=tmp_path)
    assert reference.wait(timeout=300) == 0, reference.communicate()
    return load(tmp_path / "reference/saved/models/reference/trial_000/checkpoint-last.pth")


def _gated_sweep(tmp_path, label):
    """A one-trial sweep over a project's dataset that waits at sample 100 until `go` exists."""
    (tmp_path / "gated.py").write_text(GATED)
    config = tiny_config(tmp_path / label, epochs=2)
    config["data_loader"] = {"type": f"{tmp_path}/gated.py:Gated", "args": {
        "folder": str(tmp_path), "gate": 100, "batch_size": 32, "num_workers": 0}}
    config["valid_data_loader"] = {"type": f"{tmp_path}/gated.py:Gated", "args": {
        "folder": str(tmp_path), "size": 64, "batch_size": 32, "num_workers": 0}}
    base = write_config(tmp_path, config, f"{label}.yaml")
    space = {"optimizer.args.lr": {"type": "categorical", "choices": [0.003]}}
    return _sweep_file(tmp_path, base, name=label, sampler="grid", space=space)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_worker_stopped_mid_trial_continues_it_from_its_checkpoint_to_the_same_weights(tmp_path, how,
                                                                                         uninterrupted):
    path = _gated_sweep(tmp_path, "stopped")
    worker = _sweep(path, cwd=tmp_path)
    _wait_for(tmp_path / "at-gate", worker)  # the trial's run is inside its first epoch
    worker.send_signal(how)
    if how == signal.SIGKILL:
        worker.wait()  # its trial, told to stop when the worker died, saves once its batch can finish
        (tmp_path / "go").touch()
    else:
        (tmp_path / "go").touch()
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 128 + how, err
        assert f"Sweep stopped; to continue it: python sweep.py -c {path}" in err
    trial_dir = tmp_path / "stopped" / "saved" / "models" / "stopped" / "trial_000"
    again = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-c", str(path)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Trial 0: resuming the interrupted trial" in again.stdout
    assert "Resuming from" in (tmp_path / "stopped/saved/log/stopped/trial_000/info.log").read_text()
    trials = optuna.load_study(study_name="stopped", storage=f"sqlite:///{tmp_path}/stopped/saved/sweeps/stopped/study.db").trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE")]
    first = uninterrupted
    resumed = load(trial_dir / "checkpoint-last.pth")
    assert first["state_dict"].keys() == resumed["state_dict"].keys()
    assert all(torch.equal(first["state_dict"][key], resumed["state_dict"][key]) for key in first["state_dict"])
    assert resumed["global_step"] == first["global_step"] and trials[0].value == first["monitor_best"]
    assert not (tmp_path / "stopped/saved/models/stopped/trial_001").exists()


DEVICE_SEEN = '''import os
from data_loader.data_loaders import MnistDataLoader


class Recording(MnistDataLoader):
    """The bundled MNIST loader, noting which GPU ids its process was given."""

    def __init__(self, seen, **args):
        with open(seen, "a") as handle:
            handle.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset") + "\\n")
        super().__init__(**args)
'''


@pytest.mark.slow
def test_workers_on_one_sqlite_study_run_the_requested_trials_once_each(tmp_path):
    (tmp_path / "recording.py").write_text(DEVICE_SEEN)
    config = tiny_config(tmp_path, epochs=1)
    config["data_loader"]["type"] = f"{tmp_path}/recording.py:Recording"
    config["data_loader"]["args"]["seen"] = str(tmp_path / "seen.txt")
    path = _sweep_file(tmp_path, write_config(tmp_path, config), trials=4, sampler="random", space=LR)
    jobs = _sweep(path, "--jobs", "2", "--devices", "3,5", cwd=tmp_path)  # two workers, one GPU id each
    alone = _sweep(path, cwd=tmp_path)  # and one more, as on another machine
    assert jobs.wait(timeout=300) == 0 and alone.wait(timeout=300) == 0, (jobs.communicate(), alone.communicate())
    trials = _study(tmp_path).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and {t.state.name for t in trials} == {"COMPLETE"}
    runs = sorted(p.name for p in (tmp_path / "saved/models/s").iterdir())
    assert runs == [f"trial_00{n}" for n in range(4)]
    for trial in trials:
        stored = yaml.safe_load((tmp_path / f"saved/models/s/trial_00{trial.number}/config.yaml").read_text())
        assert stored["optimizer"]["args"]["lr"] == trial.params["optimizer.args.lr"]
        info = (tmp_path / f"saved/log/s/trial_00{trial.number}/info.log").read_text()
        assert info.count("Run s/trial_00") == 1  # trained once, by one worker
    seen = (tmp_path / "seen.txt").read_text().split()
    assert set(seen) <= {"3", "5", "unset"} and len(seen) >= 4  # one line per build of the loader
    assert [row["state"] for row in _ledger(tmp_path)] == ["COMPLETE"] * 4


@pytest.mark.slow
def test_a_pruner_stops_a_trial_worse_than_the_median_at_its_first_epoch(tmp_path):
    config = tiny_config(tmp_path, epochs=3)
    path = _sweep_file(tmp_path, write_config(tmp_path, config), trials=2, sampler="random", space=LR,
                       pruner={"type": "median", "args": {"n_startup_trials": 1, "n_warmup_steps": 0}},
                       first=[{"optimizer.args.lr": 0.01}, {"optimizer.args.lr": 0.0001}])
    assert sweep.main(["-c", str(path)]) == 0
    good, bad = _study(tmp_path).trials
    assert (good.state.name, bad.state.name) == ("COMPLETE", "PRUNED")
    assert bad.params == {"optimizer.args.lr": 0.0001} and bad.user_attrs["pruned_at"] == 1
    assert load(tmp_path / "saved/models/s/trial_001/checkpoint-last.pth")["epoch"] == 1
    assert "Optuna's median pruner stopped this trial at epoch 1" in (tmp_path / "saved/log/s/trial_001/info.log").read_text()
    assert [row["state"] for row in _ledger(tmp_path)] == ["COMPLETE", "PRUNED"]


def test_a_sweep_whose_base_config_or_space_changed_is_refused_naming_the_change(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    config["data_loader"]["args"]["limit"] = 96
    base = write_config(tmp_path, config)
    path = _sweep_file(tmp_path, base, trials=1, space=LR)
    assert sweep.main(["-c", str(path)]) == 0
    config["optimizer"]["args"]["weight_decay"] = 0.01
    write_config(tmp_path, config)
    capsys.readouterr()
    assert sweep.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: sweep 's' began with another definition ({base} optimizer.args.weight_decay: '<absent>' -> "
        "0.01); restore it to continue the sweep, or give this one a new name\n")
    config["optimizer"]["args"].pop("weight_decay")
    write_config(tmp_path, config)
    _sweep_file(tmp_path, base, trials=1, space={"optimizer.args.lr": {**LR["optimizer.args.lr"], "high": 0.1}})
    assert sweep.main(["-c", str(path)]) == 2
    assert "space.optimizer.args.lr.high: 0.01 -> 0.1" in capsys.readouterr().err
    _sweep_file(tmp_path, base, trials=2, space=LR)  # more trials: the same sweep, extended
    assert sweep.main(["-c", str(path)]) == 0
    assert [t.state.name for t in _study(tmp_path).trials] == ["COMPLETE", "COMPLETE"]


BAD = [
    ({"spaces": {}}, "spaces: not a sweep key (did you mean 'space'?); the keys are name, config, objective, trials, sampler, pruner, fixed, first, space\n{path}: space: missing; map key paths to ranges, e.g. optimizer.args.lr: {{type: float, low: 1e-4, high: 0.1}}"),
    ({"trials": None}, "trials: missing; say how many trials to run in all, e.g. trials: 20"),
    ({"space": {"optimizer.args.lr": {"type": "flaot", "low": 0.1, "high": 1}}},
     "space.optimizer.args.lr.type: 'flaot' is not one of float, int, categorical (did you mean 'float'?)"),
    ({"space": {"optimizer.args.lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "space.optimizer.args.lr: low 0.1 must be below high 0.01"),
    ({"space": {"optimizer.args.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}},
     "space.optimizer.args.lr: a log scale needs low > 0, not 0"),
    ({"space": {"data_loader.args.batch_size": {"type": "int", "low": 8, "high": "64"}}},
     "space.data_loader.args.batch_size: high must be an integer, not '64'"),
    ({"space": {"optimizer.args.lr": {"type": "float", "low": 0.001, "high": 0.1}}, "sampler": "grid"},
     "space.optimizer.args.lr: the grid sampler needs choices for every key; list the values to try"),
    ({"space": {"optimizer.args.lr": {"choices": [0.1, 0.01]}}, "sampler": "grid", "trials": 3},
     "trials: 3, but the grid has 2 points; set trials: 2 or fewer"),
    ({"sampler": {"type": "tpe", "args": {"n_startup_trial": 3}}},
     "sampler.args.n_startup_trial: optuna's TPESampler takes no such argument (did you mean 'n_startup_trials'?)"),
    ({"pruner": "medain"}, "pruner: 'medain' is not one of median, successive_halving, hyperband, none (did you mean 'median'?)"),
    ({"first": [{"optimizer.args.lr": 5.0}]}, "first[0].optimizer.args.lr: 5.0 lies outside space.optimizer.args.lr"),
]


@pytest.mark.parametrize("change, problem", BAD)
def test_a_bad_sweep_file_is_one_line_naming_the_key_and_nothing_is_written(tmp_path, capsys, change, problem):
    base = write_config(tmp_path, tiny_config(tmp_path))
    fields = {key: value for key, value in {"trials": 2, "space": LR, **change}.items() if value is not None}
    if "spaces" in change:
        fields.pop("space")
    path = _sweep_file(tmp_path, base, **fields)
    assert sweep.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {problem.format(path=path)}\n"
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("space, problem", [
    ({"optimiser.args.lr": {"type": "float", "low": 0.001, "high": 0.1}}, "optimiser"),
    ({"trainer.epochs": {"type": "int", "low": 0, "high": 3}}, "trainer.epochs"),
    ({"arch.args.dropuot": {"type": "float", "low": 0.0, "high": 0.5}}, "dropuot"),
])
def test_a_value_the_base_config_refuses_is_named_before_any_trial(tmp_path, capsys, space, problem):
    base = write_config(tmp_path, tiny_config(tmp_path))
    path = _sweep_file(tmp_path, base, trials=2, space=space)
    assert sweep.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    key = next(iter(space))
    assert err.startswith(f"error: {path}: space.{key}: ") and " is refused by the base config: " in err
    assert problem in err.split("refused by the base config: ")[1] and err.count("\n") == 1
    assert not (tmp_path / "saved").exists()


def test_an_objective_that_is_not_logged_is_refused_with_did_you_mean(tmp_path, capsys):
    base = write_config(tmp_path, tiny_config(tmp_path))
    path = _sweep_file(tmp_path, base, trials=2, space=LR, objective="max val_acuracy")
    assert sweep.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainer.monitor" in err and "val_accuracy" in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_trial_under_torchrun_reports_from_rank_0_and_every_rank_stops_with_the_pruner(tmp_path):
    config = tiny_config(tmp_path, epochs=3)
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    path = _sweep_file(tmp_path, write_config(tmp_path, config), trials=2, sampler="random", space=LR,
                       pruner={"type": "median", "args": {"n_startup_trials": 1, "n_warmup_steps": 0}},
                       first=[{"optimizer.args.lr": 0.01}, {"optimizer.args.lr": 0.0001}])
    done = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-c", str(path), "--launcher", launcher],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    good, bad = _study(tmp_path).trials
    assert (good.state.name, bad.state.name) == ("COMPLETE", "PRUNED")
    for number, epoch in ((0, 3), (1, 1)):
        last = load(tmp_path / f"saved/models/s/trial_00{number}/checkpoint-last.pth")
        assert last["world_size"] == 2 and last["epoch"] == epoch
    assert good.value == load(tmp_path / "saved/models/s/trial_000/checkpoint-last.pth")["monitor_best"]


@pytest.mark.parametrize("url, problem", [
    ("foo://bar", "Can't load plugin: sqlalchemy.dialects:foo"),
    ("postgresql://me:secret@127.0.0.1:1/sweeps", ""),  # no driver here; with one, no server on port 1
])
def test_a_storage_that_cannot_be_opened_is_one_line_without_its_password_and_nothing_is_written(tmp_path, capsys,
                                                                                                    url, problem):
    path = _sweep_file(tmp_path, write_config(tmp_path, tiny_config(tmp_path)), trials=1, space=LR)
    assert sweep.main(["-c", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err
    shown = url.replace(":secret@", ":***@")
    assert err.startswith(f"error: --storage {shown}: cannot open the study's database ({problem}")
    assert err.count("\n") == 1 and "secret" not in err and not (tmp_path / "saved").exists()
