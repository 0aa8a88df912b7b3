"""Nothing lost, nothing misleading: loading bounded by what a file holds, one trainer per run, the run's most
advanced checkpoint by its own counters, the same digest rule on every route, Ctrl-C before training."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test as test_script
import train
from conftest import REHEARSING, ROOT, load, run_dir, tiny_config, write_config
from utils.checkpoint import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "good"]) == 0
    return run_dir(tmp_path, "good") / "checkpoint-epoch1.pth"


def _crafted(checkpoint, tmp_path, change, name="crafted.pth"):
    """The checkpoint changed, saved without recomputing digests (the bound is checked before them)."""
    state = load(checkpoint)
    change(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def _routes(path, tmp_path):
    init_from = write_config(tmp_path, {**tiny_config(tmp_path), "arch": {"type": "MnistModel",
                                                                         "init_from": {"path": str(path)}}})
    return {"train": lambda: train.main(["-r", str(path)]), "test": lambda: test_script.main(["-r", str(path)]),
            "init_from": lambda: train.main(["-c", str(init_from)])}


def _expanded(state):
    state["state_dict"]["fc1.weight"] = torch.zeros(1).expand(2**31)  # 8 GiB declared, 4 bytes stored


@pytest.mark.parametrize("route", ["train", "test", "init_from"])
def test_a_tensor_declaring_more_than_its_file_holds_is_refused_in_constant_memory(tmp_path, checkpoint, capsys,
                                                                                    route):
    path = _crafted(checkpoint, tmp_path, _expanded)
    assert path.stat().st_size < 1 << 20
    assert _routes(path, tmp_path)[route]() == 2
    assert capsys.readouterr().err == (
        f"error: {path}: refused: tensor state_dict.fc1.weight declares 8,589,934,592 bytes but the file stores 4 "
        "for it: a crafted file, loading it would allocate what it declares\n")


def _self_containing(state):
    state["config"]["trainer"]["again"] = state["config"]


def _alias_bomb(state):
    bomb = [0]
    for _ in range(30):
        bomb = [bomb] * 10  # 10**30 values once expanded, a few hundred bytes stored
    state["config"]["notes"] = bomb


def _deep(state):
    node = state["config"]
    for _ in range(100):
        node["deeper"] = {}
        node = node["deeper"]


@pytest.mark.parametrize("change", [_self_containing, _alias_bomb, _deep], ids=["cycle", "alias-bomb", "deep"])
def test_a_checkpoint_config_that_expands_or_nests_without_bound_is_one_line(tmp_path, checkpoint, capsys, change):
    path = _crafted(checkpoint, tmp_path, change)
    for route in ("train", "test"):
        assert _routes(path, tmp_path)[route]() == 2
        assert capsys.readouterr().err == (
            f"error: {path}: refused: it expands to more than 1,000,000 values or nests deeper than 80 levels "
            "(shared or self-containing parts): not a checkpoint torchkiln wrote\n")


def test_every_route_refuses_a_torchkiln_checkpoint_without_digests(tmp_path, checkpoint, capsys):
    path = _crafted(checkpoint, tmp_path, lambda state: state.pop("digests"))
    for route, call in _routes(path, tmp_path).items():
        assert call() == 2, route
        assert capsys.readouterr().err == (f"error: {path}: has no content digests (damaged, or not written by "
                                           "this torchkiln)\n"), route
    plain = tmp_path / "weights.pth"
    torch.save(load(checkpoint)["state_dict"], plain)  # a plain state_dict has no digests by nature
    config = write_config(tmp_path, {**tiny_config(tmp_path, epochs=1), "arch": {"type": "MnistModel",
                                                                                "init_from": {"path": str(plain)}}})
    assert train.main(["-c", str(config), "--run-id", "plain"]) == 0


def test_resume_takes_the_most_advanced_checkpoint_by_its_counters_not_its_file_time(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=3))
    assert train.main(["-c", str(path), "--run-id", "run"]) == 0
    run = run_dir(tmp_path, "run")
    shutil.copy(run / "checkpoint-epoch1.pth", tmp_path / "copy.pth")
    shutil.copy(tmp_path / "copy.pth", run / "checkpoint-epoch1.pth")  # the oldest is now the newest by time
    os.utime(run / "checkpoint-epoch1.pth")
    capsys.readouterr()
    assert train.main(["-r", str(run), "trainer.epochs=4"]) == 0
    assert f"Resuming from {run}/checkpoint-last.pth: epoch 4, batch 0" in capsys.readouterr().out
    assert load(run / "checkpoint-last.pth")["epoch"] == 4


def test_a_save_removes_only_its_own_temp_file(tmp_path):
    other = tmp_path / ".checkpoint-last.pth.4242.tmp"  # another process's save in flight
    other.write_bytes(b"partial")
    save_checkpoint({"version": 2, "state_dict": {}}, tmp_path / "checkpoint-last.pth")
    assert other.read_bytes() == b"partial" and not list(tmp_path.glob(f".*.{os.getpid()}.tmp"))


BLOCKING = """import pathlib
import time
import torch
from torch.utils.data import Dataset


class Blocking(Dataset):
    \"\"\"Touches `started` when training reads it, then waits for `release`: a run held open on an event.\"\"\"

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)

    def __len__(self):
        return 64

    def __getitem__(self, index):
        if rehearsing():
            return torch.zeros(1, 28, 28), 0
        (self.folder / "started").touch()
        while not (self.folder / "release").exists():
            time.sleep(0.01)
        return torch.zeros(1, 28, 28), 0
""" + REHEARSING


def _wait_for(path, process):
    while not path.exists():
        assert process.poll() is None, process.communicate()
        os.sched_yield()


def _held_run(tmp_path):
    """A run whose first epoch finished, resumed by a trainer that holds it until `release` exists."""
    (tmp_path / "blocking.py").write_text(BLOCKING)
    config = tiny_config(tmp_path, epochs=1, monitor="off")
    config["data_loader"] = {"type": f"{tmp_path}/blocking.py:Blocking",
                             "args": {"folder": str(tmp_path), "batch_size": 32, "num_workers": 0}}
    (tmp_path / "release").touch()
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "held"]) == 0
    (tmp_path / "release").unlink(), (tmp_path / "started").unlink()
    run = run_dir(tmp_path, "held")
    holder = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-r", str(run), "trainer.epochs=2",
                               "--trust-checkpoint-config"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "started", holder)
    return run, holder


@pytest.mark.slow
def test_a_second_trainer_on_a_run_in_use_is_refused_naming_the_holder(tmp_path):
    run, holder = _held_run(tmp_path)
    second = subprocess.run([sys.executable, str(ROOT / "train.py"), "-r", str(run), "trainer.epochs=2",
                             "--trust-checkpoint-config"], cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr == (f"error: {run}: another trainer is using this run (pid {holder.pid}); wait for it to "
                             "finish or stop it, or start a separate run\n")
    (tmp_path / "release").touch()
    assert holder.wait() == 0 and load(run / "checkpoint-last.pth")["epoch"] == 2


@pytest.mark.slow
def test_kill_9_leaves_no_stale_lock(tmp_path):
    run, holder = _held_run(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (tmp_path / "release").touch()
    assert train.main(["-r", str(run), "trainer.epochs=2", "--trust-checkpoint-config"]) == 0


class _CtrlC(torch.utils.data.Dataset):
    def __init__(self, **_):
        raise KeyboardInterrupt


def test_ctrl_c_before_training_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    import data_loader.data_loaders

    monkeypatch.setattr(data_loader.data_loaders, "CtrlC", _CtrlC, raising=False)
    config = tiny_config(tmp_path, epochs=1, monitor="off")
    config["data_loader"] = {"type": "CtrlC", "args": {"batch_size": 4}}
    assert train.main(["-c", str(write_config(tmp_path, config))]) == 130
    assert capsys.readouterr().err == "Stopped by Ctrl-C before training began\n"
    assert not Path(tmp_path / "saved").exists()


GATED = """import pathlib
import time
import torch
from torch.utils.data import Dataset


class Gated(Dataset):
    \"\"\"Deterministic blobs; loading index `gate` touches `folder/at-gate` and waits for `folder/go`.\"\"\"

    def __init__(self, folder, gate=-1, size=256):
        self.folder, self.gate, self.size = pathlib.Path(folder), gate, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index == self.gate and not (self.folder / "go").exists() and not rehearsing():
            (self.folder / "at-gate").touch()
            while not (self.folder / "go").exists():
                time.sleep(0.01)
        generator = torch.Generator().manual_seed(index)
        return torch.randn(1, 28, 28, generator=generator), index % 10
""" + REHEARSING


def _gated_config(tmp_path, workers, gate_in):
    (tmp_path / "gated.py").write_text(GATED)
    config = tiny_config(tmp_path, epochs=2)
    gated = {"folder": str(tmp_path), "gate": 100}
    config["data_loader"] = {"type": f"{tmp_path}/gated.py:Gated", "args": {
        "batch_size": 32, "num_workers": workers, **(gated if gate_in == "training" else {"folder": str(tmp_path)})}}
    config["valid_data_loader"] = {"type": f"{tmp_path}/gated.py:Gated", "args": {
        "batch_size": 32, "num_workers": workers, "size": 64, **(gated | {"gate": 40} if gate_in == "validation"
                                                                   else {"folder": str(tmp_path)})}}
    return config


@pytest.mark.slow
@pytest.mark.parametrize("workers, gate_in", [(0, "training"), (2, "training"), (2, "validation")])
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path, workers, gate_in):
    config = _gated_config(tmp_path, workers, gate_in)
    (tmp_path / "go").touch()
    reference = write_config(tmp_path, config, "reference.yaml")
    assert train.main(["-c", str(reference), "--run-id", "reference"]) == 0
    (tmp_path / "go").unlink()
    path = write_config(tmp_path, config, "stopped.yaml")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "stopped"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    _wait_for(tmp_path / "at-gate", process)
    os.killpg(process.pid, signal.SIGTERM)  # as Slurm and systemd do: the trainer and its workers
    (tmp_path / "go").touch()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    stopped = run_dir(tmp_path, "stopped")
    shown = (stopped / "checkpoint-last.pth").relative_to(tmp_path)
    assert f"Stopped by SIGTERM; resume with: python train.py --resume {shown}" in out + err
    assert train.main(["-r", str(stopped / "checkpoint-last.pth"), "--trust-checkpoint-config"]) == 0
    final, again = load(run_dir(tmp_path, "reference") / "checkpoint-epoch2.pth"), load(stopped / "checkpoint-epoch2.pth")
    assert all(torch.equal(final["state_dict"][key], again["state_dict"][key]) for key in final["state_dict"])
    assert final["global_step"] == again["global_step"] and final["monitor_best"] == again["monitor_best"]


@pytest.mark.slow
def test_sigterm_to_a_torchrun_process_group_with_workers_saves_and_resumes_exactly(tmp_path):
    config = _gated_config(tmp_path, 2, "training")
    path = write_config(tmp_path, config)

    def torchrun(*args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"),
                   *args]
        return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    (tmp_path / "go").touch()
    assert torchrun("-c", str(path), "--run-id", "reference").wait(timeout=300) == 0
    (tmp_path / "go").unlink()
    process = torchrun("-c", str(path), "--run-id", "stopped")
    _wait_for(tmp_path / "at-gate", process)
    os.killpg(process.pid, signal.SIGTERM)  # torchrun, both ranks and their workers, as Slurm does
    (tmp_path / "go").touch()
    out, err = process.communicate(timeout=300)
    stopped = run_dir(tmp_path, "stopped")
    resume = "resume with: torchrun --nproc_per_node 2 train.py --resume saved/models/tiny/stopped/checkpoint-last.pth"
    assert resume + " --trust-checkpoint-config" in out + err and (stopped / "checkpoint-last.pth").is_file(), err
    resumed = torchrun("-r", str(stopped / "checkpoint-last.pth"), "--trust-checkpoint-config")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    final, again = load(run_dir(tmp_path, "reference") / "checkpoint-epoch2.pth"), load(stopped / "checkpoint-epoch2.pth")
    assert all(torch.equal(final["state_dict"][key], again["state_dict"][key]) for key in final["state_dict"])


WRONG_RETURNS = """import torch.nn.functional as F


def per_sample(output, target):
    return F.nll_loss(output, target, reduction="none")


def as_float(output, target):
    return F.nll_loss(output, target).item()


def nothing(output, target):
    return None
"""


@pytest.mark.parametrize("key, value, expected", [
    ("loss", "per_sample", "the loss per_sample (wrong.py:4) returned a tensor of shape [32]: a loss returns a "
     "scalar tensor (the .mean() of a per-sample loss), or a dict of named terms with the total under 'loss'"),
    ("loss", "as_float", "the loss as_float (wrong.py:8) returned float "),
    ("metrics", "nothing", "the metric nothing (wrong.py:12) returned None: a metric returns a number or a "
     "one-element tensor"),
], ids=["per-sample-loss", "float-loss", "none-metric"])
def test_a_wrong_return_names_the_users_function_and_file(tmp_path, capsys, key, value, expected):
    (tmp_path / "wrong.py").write_text(WRONG_RETURNS)
    config = tiny_config(tmp_path, epochs=1)
    config[key] = f"{tmp_path}/wrong.py:{value}" if key == "loss" else [f"{tmp_path}/wrong.py:{value}"]
    assert train.main(["-c", str(write_config(tmp_path, config))]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err


def test_a_library_refusing_a_value_passed_through_the_users_constructor_blames_the_config_key(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "data_loader.args.batch_size=0"]) == 2
    assert capsys.readouterr().err == (
        "error: override 'data_loader.args.batch_size=0': data_loader.args.batch_size: MnistDataLoader refused its "
        "args: batch_size should be a positive integer value, but got batch_size=0\n")
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_the_first_ctrl_c_on_a_hung_step_shows_where_each_process_is(tmp_path, workers):
    config = _gated_config(tmp_path, workers, "training")
    path = write_config(tmp_path, config)
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "hung"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    _wait_for(tmp_path / "at-gate", process)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the trainer and its workers
    seen = []
    while not any("gated.py" in line and "__getitem__" in line for line in seen):  # the hung line's stack
        line = process.stderr.readline()
        assert line, "".join(seen)
        seen.append(line)
    assert any(line.startswith("Ctrl-C: finishing the current step, then saving") for line in seen), "".join(seen)
    (tmp_path / "go").touch()
    rest = process.stderr.read()  # after readline, through the same buffer (communicate() would skip it)
    process.wait(timeout=300)
    if workers:  # which batch the hung worker loads, with the gated sample among its indices (the other worker,
        # when caught loading its own batch, has a line too, in either order)
        printed = "".join(seen) + rest
        hung = re.findall(r"DataLoader worker pid \d+ is loading batch \d+ \(now sample 100\): \[([\d, ]+)\]\n", printed)
        assert len(hung) == 1, printed
        assert "100" in hung[0].split(", "), hung[0]
    assert process.returncode == 130 and (run_dir(tmp_path, "hung") / "checkpoint-last.pth").is_file()


def test_a_whole_pickled_model_gives_its_weights_to_init_from_and_is_refused_as_a_checkpoint(tmp_path, capsys):
    from model.model import MnistModel

    model = MnistModel()
    path = tmp_path / "whole.pth"
    torch.save(model, path)  # pickles the class: loading it the usual way would run model.model's code
    config = write_config(tmp_path, {**tiny_config(tmp_path, epochs=1), "arch": {"type": "MnistModel",
                                                                                "init_from": {"path": str(path)}}})
    assert train.main(["-c", str(config), "--run-id", "whole"]) == 0
    assert "init_from " + str(path) + ": {'loaded': 8, 'excluded': 0, 'missing': 0" in capsys.readouterr().out
    for entry in (train.main, test_script.main):
        assert entry(["-r", str(path)]) == 2
        assert capsys.readouterr().err == (
            f"error: {path}: holds a whole pickled model (torch.save(model)), not a checkpoint: start a run from "
            f"its weights with arch.init_from.path={path}\n")


def test_a_state_dict_with_keys_that_are_not_names_is_one_line(tmp_path, capsys):
    path = tmp_path / "numbered.pth"
    torch.save({0: torch.zeros(3)}, path)
    config = write_config(tmp_path, {**tiny_config(tmp_path, epochs=1), "arch": {"type": "MnistModel",
                                                                                "init_from": {"path": str(path)}}})
    assert train.main(["-c", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: its state_dict has a key that is not a name (0): not a "
                                       "model's\n")
