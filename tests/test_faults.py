"""Faults survived: repeated preemption, full disks, odd save directories, dying workers, signals at awkward
moments, and hostile config files. Each ends in the right exit status with a resumable state or nothing."""
import collections
import errno
import logging
import multiprocessing
import multiprocessing.resource_sharer
import os
import random
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch
import yaml
from test_distributed import COUNTING_DATASET
from test_train_step import LINEAR_NET, _assert_equal_states

import train
import utils.checkpoint
import utils.user_code
import utils.workers
from base.base_trainer import BaseTrainer
from conftest import ROOT, files_under, load, run_dir, tiny_config, write_config

PREEMPTER = '''import os, pathlib, signal, torch
COUNTER = pathlib.Path({counter!r})
STOPS = {stops!r}
def preempt(output, target):
    if torch.is_grad_enabled():  # training batches only: validation runs without gradients
        done = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
        COUNTER.write_text(str(done))
        if done in STOPS:
            os.kill(os.getpid(), signal.SIGTERM)
    return output.new_zeros(())
'''


def _counted_config(tmp_path, **trainer):
    (tmp_path / "counted.py").write_text(COUNTING_DATASET)
    (tmp_path / "net.py").write_text(LINEAR_NET)
    config = tiny_config(tmp_path, epochs=3, monitor="off", **trainer)
    config["arch"] = {"type": f"{tmp_path}/net.py:Net", "args": {}}
    config["data_loader"] = {"type": f"{tmp_path}/counted.py:Counted",
                             "args": {"size": 160, "log_dir": str(tmp_path / "seen"), "batch_size": 16}}
    (tmp_path / "seen").mkdir(exist_ok=True)
    return config


def test_five_preemptions_at_random_steps_end_where_an_uninterrupted_run_does(tmp_path):
    reference = _counted_config(tmp_path)
    assert train.main(["-c", str(write_config(tmp_path, reference, "reference.yaml")), "--run-id", "reference"]) == 0
    expected = load(run_dir(tmp_path, "reference") / "checkpoint-last.pth")
    for file in (tmp_path / "seen").iterdir():
        file.unlink()
    stops = sorted(random.Random(5).sample(range(2, 30), 5))  # 30 training batches in 3 epochs of 10
    (tmp_path / "preempt.py").write_text(PREEMPTER.format(counter=str(tmp_path / "count"), stops=stops))
    config = _counted_config(tmp_path)
    config["metrics"] = [f"{tmp_path}/preempt.py:preempt"]
    path = write_config(tmp_path, config, "preempted.yaml")
    statuses = [train.main(["-c", str(path), "--run-id", "preempted"])]
    while statuses[-1] != 0:
        statuses.append(train.main(["-r", str(run_dir(tmp_path, "preempted")), "--trust-checkpoint-config"]))
    assert statuses == [143] * 5 + [0]
    _assert_equal_states(expected, load(run_dir(tmp_path, "preempted") / "checkpoint-last.pth"))
    seen = collections.Counter(int(i) for file in (tmp_path / "seen").iterdir() for i in file.read_text().split())
    assert seen == {index: 3 for index in range(160)}, "no sample replayed or skipped in any epoch"


@pytest.mark.slow
def test_sighup_is_treated_like_sigterm(tmp_path):
    config = tiny_config(tmp_path, epochs=2)
    config["data_loader"]["args"]["limit"] = 1600
    path = write_config(tmp_path, config)
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "hup"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = run_dir(tmp_path, "hup")
    while not (run / "checkpoint-epoch1.pth").exists() and process.poll() is None:
        pass
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP and "Stopped by SIGHUP; resume with" in out, err
    assert train.main(["-r", str(run)]) == 0


def test_sigterm_during_validation_saves_at_the_epoch_boundary(tmp_path):
    (tmp_path / "stop.py").write_text("import os, signal, torch\ntrained, sent = [], []\n"
                                      "def stop_in_validation(o, t):\n"
                                      "    trained.append(torch.is_grad_enabled())  # the rehearsal comes first\n"
                                      "    if any(trained) and not trained[-1] and not sent:\n"
                                      "        sent.append(1)\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                                      "    return o.new_zeros(())\n")
    config = tiny_config(tmp_path, epochs=2)
    reference = write_config(tmp_path, config, "reference.yaml")
    assert train.main(["-c", str(reference), "--run-id", "reference"]) == 0
    assert train.main(["-c", str(reference), "--run-id", "stopped",
                       f"metrics=[accuracy, {tmp_path}/stop.py:stop_in_validation]"]) == 143
    last = load(run_dir(tmp_path, "stopped") / "checkpoint-last.pth")
    assert (last["epoch"], last["batches_in_epoch"]) == (1, 0)
    assert train.main(["-r", str(run_dir(tmp_path, "stopped")), "metrics=[accuracy]"]) == 0
    assert torch.equal(load(run_dir(tmp_path, "stopped") / "checkpoint-last.pth")["state_dict"]["fc1.weight"],
                       load(run_dir(tmp_path, "reference") / "checkpoint-last.pth")["state_dict"]["fc1.weight"])


@pytest.mark.parametrize("background", ["false", "true"])  # written before training goes on, or beside it
def test_a_full_disk_keeps_the_last_good_checkpoint_and_rotation_spares_it(tmp_path, monkeypatch, capsys,
                                                                           background):
    real_save, calls = torch.save, []

    def full_on_the_second_epoch(obj, file):
        calls.append(file)
        if obj.get("epoch") == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, file)

    monkeypatch.setattr(utils.checkpoint.torch, "save", full_on_the_second_epoch)
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=3, keep_last=1, monitor="off"))
    assert train.main(["-c", str(path), "--run-id", "full", f"trainer.background_saves={background}"]) == 1
    run = run_dir(tmp_path, "full")
    assert capsys.readouterr().err == (f"error: could not save checkpoint {run}/checkpoint-epoch2.pth: No space left "
                                       "on device (ENOSPC); the previous one is intact\n")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-epoch1.pth", "config.yaml", "run.json"]
    assert load(run / "checkpoint-epoch1.pth")["epoch"] == 1


@pytest.mark.parametrize("background", ["false", "true"])
def test_a_failed_sync_on_the_saving_thread_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                           background):
    """The fsync of epoch 2's file fails (an I/O error) on the thread that syncs and renames it: the run stops
    with that error, before epoch 2's file gets its name or model_best.pth moves to it."""
    real_fsync, synced_files = os.fsync, []

    def failing_on_the_second_file(descriptor):
        if not os.path.isdir(f"/proc/self/fd/{descriptor}"):  # a directory's sync passes
            synced_files.append(descriptor)
            if len(synced_files) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(descriptor)

    monkeypatch.setattr(utils.checkpoint.os, "fsync", failing_on_the_second_file)
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=3, monitor="min loss"))
    assert train.main(["-c", str(path), "--run-id", "eio", f"trainer.background_saves={background}"]) == 1
    run = run_dir(tmp_path, "eio")
    assert capsys.readouterr().err == (f"error: could not save checkpoint {run}/checkpoint-epoch2.pth: Input/output "
                                       "error (EIO); the previous one is intact\n")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-epoch1.pth", "config.yaml", "model_best.pth",
                                                     "run.json"]
    assert load(run / "model_best.pth")["epoch"] == 1 and load(run / "checkpoint-epoch1.pth")["epoch"] == 1


@pytest.mark.parametrize("kind", ["a-file", "dangling-symlink", "read-only"])
def test_an_unwritable_save_dir_is_refused_before_training(tmp_path, capsys, kind):
    target = tmp_path / "target"
    if kind == "a-file":
        target.write_text("not a directory")
    elif kind == "dangling-symlink":
        target.symlink_to(tmp_path / "nowhere" / "deeper")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories: a read-only save_dir cannot be made here")
        target.mkdir(mode=0o500)
    path = write_config(tmp_path, tiny_config(tmp_path))
    before = files_under(tmp_path)
    assert train.main(["-c", str(path), f"trainer.save_dir={target}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: trainer.save_dir: cannot write under '{target}' (") and err.count("\n") == 1
    assert files_under(tmp_path) == before


DYING = """import os, torch
class Dying(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, index):
        if index == 40:
            os._exit(3)
        return torch.zeros(1, 28, 28), 0
"""


@pytest.mark.slow
def test_a_dying_worker_is_one_line_and_no_hang(tmp_path):
    (tmp_path / "dying.py").write_text(DYING)
    config = tiny_config(tmp_path, save_every_steps=1)
    config["data_loader"] = {"type": f"{tmp_path}/dying.py:Dying", "args": {"batch_size": 8, "num_workers": 2}}
    config["trainer"]["monitor"] = "off"
    path = write_config(tmp_path, config)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "dies"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DataLoader worker (pid") and "exited unexpectedly" in lines[0]
    assert not list(run_dir(tmp_path, "dies").glob(".*.tmp"))
    for checkpoint in run_dir(tmp_path, "dies").glob("*.pth"):
        load(checkpoint)  # every file that exists is whole


class _DiesMidHandoff:
    """Batches from a 'worker' that exits with status 3 while its batch's handoff connection is refused: what
    the training process sees when a DataLoader worker dies after queueing a batch but before it has exited
    (torch then finds every worker alive and passes the bare ConnectionRefusedError on)."""

    def __init__(self, socket_path):
        self.socket_path = socket_path

    def __iter__(self):
        self.worker = multiprocessing.Process(target=os._exit, args=(3,))
        self.worker.start()
        return self._batches()

    def _batches(self):
        yield torch.zeros(1)
        with socket.socket(socket.AF_UNIX) as unlistened:
            unlistened.bind(str(self.socket_path))
            multiprocessing.resource_sharer._resource_sharer.get_connection((str(self.socket_path), 0))


def test_a_worker_that_dies_mid_handoff_is_reported_as_its_death_not_a_connection_error(tmp_path):
    loader = _DiesMidHandoff(tmp_path / "handoff.sock")
    batches = utils.workers.shielded_iter(loader)
    next(batches)
    with pytest.raises(RuntimeError) as raised:
        next(batches)
    pid = loader.worker.pid
    assert str(raised.value) == f"DataLoader worker (pid(s) {pid}) exited unexpectedly with exit code 3"
    assert utils.user_code.worker_death(raised.value).startswith(
        f"DataLoader worker (pid(s) {pid}) exited unexpectedly with exit code 3; the last good checkpoint is kept")


def _bomb(levels=9):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\nname: x\n"


HOSTILE = [  # (file name, content, expected after "error: <path>: ")
    ("bomb.yaml", _bomb(), "expands to more than 100,000 values (YAML aliases?); not a config"),
    ("recursive.yaml", "name: &loop [*loop]\n", "contains itself (a recursive YAML alias); not a config"),
    ("deep.yaml", "a: " + "[" * 10000 + "]" * 10000 + "\n", "nested too deeply to be a config"),
    ("deep.json", '{"a": ' + "[" * 10000 + "]" * 10000 + "}", "nested too deeply to be a config"),
    ("utf16.yaml", "name: x\n".encode("utf-16"), "not UTF-8 text (byte 0); save the file as UTF-8"),
    ("latin1.yaml", "name: caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 9); save the file as UTF-8"),
    ("huge.yaml", b"# " + b"x" * 100_000_000 + b"\n", "100,000,003 bytes is too large for a config (at most "
                                                        "1,000,000)"),
]


@pytest.mark.parametrize("name, content, expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_config_files_are_refused_quickly_with_one_line(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert train.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1
    assert expected in err or (name == "recursive.yaml" and "not valid YAML" in err), err
    assert files_under(tmp_path) == [path]


def _mutations(config, rng):
    """A random damage to a config mapping: delete, rename, retype a key, null, huge or negative numbers,
    deep nesting, a list for a mapping."""
    paths = []

    def walk(node, prefix):
        for key, value in node.items():
            paths.append(prefix + [key])
            if isinstance(value, dict):
                walk(value, prefix + [key])

    walk(config, [])
    path = rng.choice(paths)
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    kind = rng.choice(["delete", "rename", "retype", "null", "huge", "negative", "deep", "list", "string"])
    if kind == "delete":
        del parent[key]
    elif kind == "rename":
        parent[key + rng.choice(["s", "_", "x"])] = parent.pop(key)
    else:
        parent[key] = {"retype": rng.choice([[1, 2], "text", 3.5, True]), "null": None, "huge": 10**30,
                       "negative": -rng.randint(1, 10**6), "deep": _nested(rng.randint(2, 40)),
                       "list": [parent[key]], "string": str(parent[key])}[kind]


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.slow
def test_fuzzed_configs_are_one_line_errors_or_valid(tmp_path, capsys):
    base = yaml.safe_load((ROOT / "configs/mnist.yaml").read_text())
    base["data_loader"]["args"]["data_dir"] = str(ROOT / "data/mnist-5k")
    rng = random.Random(2026)
    outcomes = collections.Counter()
    for case in range(220):
        config = yaml.safe_load(yaml.safe_dump(base))
        for _ in range(rng.randint(1, 3)):
            if isinstance(config, dict) and config:
                _mutations(config, rng)
        path = write_config(tmp_path, config, f"fuzz{case}.yaml")
        status = train.main(["-c", str(path), "--print-config"])
        out, err = capsys.readouterr()
        assert status in (0, 2), (case, err)
        assert "Traceback" not in out + err
        if status == 2:
            assert err.startswith("error: ") and all(line.startswith((str(path), "error: ")) for line in
                                                      err.splitlines()), (case, err)
        outcomes[status] += 1
    assert not (tmp_path / "saved").exists(), "nothing written"
    assert outcomes[2] >= 100 and outcomes[0] >= 10, outcomes
    print(f"fuzzed configs: {sum(outcomes.values())}, refused with exit 2: {outcomes[2]}, valid: {outcomes[0]}")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 700 KiB filesystem: room for two MNIST checkpoints, not three."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); the simulated "
                    "ENOSPC test covers the writer")
    yield mount_point
    for handler in logging.root.handlers:  # info.log on the tmpfs is still open in this process
        handler.close()
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_a_real_full_filesystem(tmp_path, small_tmpfs, capsys):
    config = tiny_config(tmp_path, epochs=6, monitor="off")
    config["trainer"]["save_dir"] = str(small_tmpfs / "saved")
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "small"]) == 1
    run = small_tmpfs / "saved/models/tiny/small"
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not save checkpoint {run}/checkpoint-epoch") and err.endswith(
        ": No space left on device (ENOSPC); the previous one is intact\n"), err
    assert not list(run.glob(".*.tmp")), "no temp file left"
    saved = sorted(run.glob("checkpoint-epoch*.pth"))
    assert saved and load(saved[-1])["epoch"] == len(saved)


def test_sigterm_in_the_first_step_leaves_a_resumable_state(tmp_path):
    (tmp_path / "first.py").write_text("import os, signal, torch\nsent = []\ndef stop_first(o, t):\n"
                                       "    if torch.is_grad_enabled() and not sent:  # training, past the rehearsal\n"
                                       "        sent.append(1)\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                                       "    return o.new_zeros(())\n")
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert train.main(["-c", str(path), "--run-id", "reference"]) == 0
    assert train.main(["-c", str(path), "--run-id", "first", f"metrics=[accuracy, {tmp_path}/first.py:stop_first]"]) \
        == 143
    assert load(run_dir(tmp_path, "first") / "checkpoint-last.pth")["global_step"] == 1
    assert train.main(["-r", str(run_dir(tmp_path, "first")), "metrics=[accuracy]"]) == 0
    assert torch.equal(load(run_dir(tmp_path, "first") / "checkpoint-last.pth")["state_dict"]["fc2.weight"],
                       load(run_dir(tmp_path, "reference") / "checkpoint-last.pth")["state_dict"]["fc2.weight"])


@pytest.mark.parametrize("background", ["false", "true"])
def test_sigterm_during_a_checkpoint_save_finishes_the_save_then_stops(tmp_path, monkeypatch, background):
    real_save, calls = torch.save, []

    def save_and_get_signalled(obj, file):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while this checkpoint is being written
        real_save(obj, file)

    monkeypatch.setattr(utils.checkpoint.torch, "save", save_and_get_signalled)
    path = write_config(tmp_path, tiny_config(tmp_path, save_every_steps=2))
    assert train.main(["-c", str(path), "--run-id", "saving", f"trainer.background_saves={background}"]) == 143
    run = run_dir(tmp_path, "saving")
    # in the background, step 4's file is written while training goes on: the stop comes after the step the
    # training thread is on when it sees the signal, at the latest step 6, whose save waits for step 4's to end
    steps = [4] if background == "false" else [4, 5, 6]
    assert not list(run.glob(".*.tmp")) and load(run / "checkpoint-last.pth")["global_step"] in steps


def test_a_checkpoint_written_while_training_goes_on_holds_its_own_step_bit_for_bit(tmp_path, monkeypatch):
    """Epoch 1's file is held back on its thread until training is two steps into epoch 2 (8 steps an epoch):
    it holds epoch 1's weights and optimizer state all the same, as a file written before training went on
    does (background_saves: false, auto's choice on the CPU)."""
    config = tiny_config(tmp_path, epochs=2)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "waited",
                       "trainer.background_saves=false"]) == 0
    real_save, epoch_2_underway = torch.save, threading.Event()

    def held_back_save(obj, file):
        if obj["epoch"] == 1:
            assert epoch_2_underway.wait(timeout=120), "the save held up training"
        real_save(obj, file)

    after_step = BaseTrainer.after_optimizer_step

    def noting_step_10(self, *args):
        after_step(self, *args)
        if self.global_step == 10:
            epoch_2_underway.set()

    monkeypatch.setattr(utils.checkpoint.torch, "save", held_back_save)
    monkeypatch.setattr(BaseTrainer, "after_optimizer_step", noting_step_10)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "background",
                       "trainer.background_saves=true"]) == 0  # auto is off on the CPU
    waited, background = (load(run_dir(tmp_path, run) / "checkpoint-epoch1.pth") for run in ("waited", "background"))
    _assert_equal_states(waited, background)
    assert _same(waited["metrics"], background["metrics"]) and _same(waited["rng"], background["rng"])


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.slow
def test_sigterm_during_startup_leaves_nothing_half_written(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "early"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.send_signal(signal.SIGTERM)  # Popen returns once train.py is exec'd: the signal lands in its startup
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM, "stopped by the signal, as any program is before it trains"
    assert not (tmp_path / "saved").exists(), "nothing written: the run directory comes after the build"
