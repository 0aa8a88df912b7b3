"""Exact, crash-safe resume: stop at any moment by any means, and --resume continues bit for bit."""
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
import utils.checkpoint
from base.checkpointer import Checkpointer
from conftest import ROOT, assert_same_training_state, load, run_dir, tiny_config, write_config
from utils.checkpoint import newest_intact_checkpoint as newest_good_checkpoint

# TINY: 256 training samples in batches of 32 -> 8 steps per epoch; 3 epochs -> 24 steps.
MID_EPOCH_2_STEP = 13  # saving every 13 steps writes checkpoint-last.pth at epoch 2, batch 5
MID = "checkpoint-step13.pth"  # a copy of it: the run's end overwrites checkpoint-last.pth with its final state


def _reference(tmp_path, workers, **trainer):
    config = tiny_config(tmp_path, epochs=3, save_every_steps=MID_EPOCH_2_STEP, **trainer)
    config["data_loader"]["args"]["num_workers"] = workers
    path = write_config(tmp_path, config, "reference.yaml")
    save_step = Checkpointer.maybe_save_step

    def save_and_keep_a_copy(self, make_state, global_step):
        save_step(self, make_state, global_step)
        if global_step == MID_EPOCH_2_STEP:
            self.flush()  # written on a thread
            shutil.copy(self.run_dir / "checkpoint-last.pth", self.run_dir / MID)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "maybe_save_step", save_and_keep_a_copy)
        assert train.main(["-c", str(path), "--run-id", "reference"]) == 0
    return run_dir(tmp_path, "reference")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", ["checkpoint-epoch1.pth", MID], ids=["epoch-1", "mid-epoch-2"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, stop_at, workers):
    reference = _reference(tmp_path, workers)
    stopped = load(reference / stop_at)
    assert (stopped["epoch"], stopped["batches_in_epoch"]) == ((1, 0) if stop_at.endswith("1.pth") else (1, 5))
    assert train.main(["-r", str(reference / stop_at), "--run-id", "resumed"]) == 0
    assert_same_training_state(load(reference / "checkpoint-epoch3.pth"),
                               load(run_dir(tmp_path, "resumed") / "checkpoint-epoch3.pth"))


def test_mid_epoch_resume_with_iteration_based_epochs(tmp_path):
    reference = _reference(tmp_path, 0, len_epoch=5)  # epochs of 5 steps cut across the 8-batch passes
    stopped = load(reference / MID)
    assert (stopped["epoch"], stopped["batches_in_epoch"], stopped["data_order"]) == (2, 3, {"pass": 1,
                                                                                              "batches_done": 5})
    assert train.main(["-r", str(reference / MID), "--run-id", "resumed"]) == 0
    assert_same_training_state(load(reference / "checkpoint-epoch3.pth"),
                               load(run_dir(tmp_path, "resumed") / "checkpoint-epoch3.pth"))


def test_mid_epoch_checkpoint_holds_partial_epoch_metrics_and_data_order(tmp_path):
    checkpoint = load(_reference(tmp_path, 0) / MID)
    assert checkpoint["data_order"] == {"pass": 1, "batches_done": 5}
    assert checkpoint["metrics"]["counts"] == {"loss": 160, "accuracy": 160}
    assert checkpoint["global_step"] == 13 and set(checkpoint["rng"]) == {"python", "numpy", "torch", "cuda"}


def test_resumed_tensorboard_curve_has_no_gap_or_overlap(tmp_path):
    reference = _reference(tmp_path, 0, tensorboard=True, log_step=1)
    log_dir = tmp_path / "saved" / "log" / "tiny" / "reference"
    before = EventAccumulator(str(log_dir))
    before.Reload()
    expected = [(e.step, e.value) for e in before.Scalars("train/loss")]
    for events in log_dir.glob("events.out.tfevents.*"):  # named as if written a minute before the resume: in
        fields = events.name.split(".")  # one second and one process, the counter in the name sorts 10 before 9
        fields[3] = f"{int(fields[3]) - 60:010d}"
        events.rename(events.with_name(".".join(fields)))
    # As after a kill at step 13 (the run had logged to step 24): resume into the same run directory.
    assert train.main(["-r", str(reference / MID)]) == 0
    after = EventAccumulator(str(log_dir))
    after.Reload()
    assert [(e.step, e.value) for e in after.Scalars("train/loss")] == expected
    assert [e.step for e in after.Scalars("train/loss")] == list(range(1, 25))


def _start(tmp_path, name, **trainer):
    config = tiny_config(tmp_path, **trainer)
    config["data_loader"]["args"]["limit"] = 1600
    path = write_config(tmp_path, config, f"{name}.yaml")
    command = [sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", name]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), path


def _wait_for(path, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def _wait_for_saves(path, process, saves, timeout=120.0):
    """Until `path` has been replaced `saves` times (each atomic save is a new file), counted by its inode."""
    deadline, seen, inode = time.monotonic() + timeout, 0, None
    while seen < saves and process.poll() is None and time.monotonic() < deadline:
        try:
            current = path.stat().st_ino
        except FileNotFoundError:
            current = inode
        seen, inode = seen + (current != inode), current
        time.sleep(0.0005)


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_after_the_step_and_says_how_to_resume(tmp_path, signal_number, status):
    process, config_path = _start(tmp_path, "stopped", log_step=1)
    run = run_dir(tmp_path, "stopped")
    _wait_for(run / "checkpoint-epoch1.pth", process)
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    last = run / "checkpoint-last.pth"
    shown = last.relative_to(tmp_path)  # as typed where the run was started
    assert f"Stopped by {signal.Signals(signal_number).name}; resume with: python train.py --resume {shown}" in out
    assert "Traceback" not in out + err
    stopped = load(last)
    assert stopped["epoch"] == 1 and 0 <= stopped["batches_in_epoch"] < 40, "stopped during epoch 2"
    assert train.main(["-r", str(last)]) == 0
    assert train.main(["-c", str(config_path), "--run-id", "reference"]) == 0
    assert_same_training_state(load(run_dir(tmp_path, "reference") / "checkpoint-epoch2.pth"),
                               load(run / "checkpoint-epoch2.pth"))


def test_a_second_ctrl_c_kills_at_once_but_a_repeated_sigterm_does_not(tmp_path):
    """Launchers repeat SIGTERM (to the process group, then torchrun's own): only a person's second Ctrl-C kills."""
    script = ("import os, signal\nfrom utils.signals import StopRequest\nwith StopRequest() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('noted', stop.signal, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n    print('still running')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == -signal.SIGINT
    assert result.stdout == f"noted {int(signal.SIGTERM)}\n"
    assert result.stderr == "\nStopped at once by a second Ctrl-C; the last saved checkpoint is kept\n"


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_the_last_checkpoint(tmp_path):
    """Saves every step, so many kills land mid-save; each run must resume to the reference result."""
    rng = random.Random(2026)
    config = tiny_config(tmp_path, save_every_steps=1)
    config["data_loader"]["args"]["limit"] = 1600
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "reference"]) == 0
    expected = load(run_dir(tmp_path, "reference") / "checkpoint-epoch2.pth")
    killed_mid_save = 0
    for trial in range(5):
        process, _ = _start(tmp_path, f"kill{trial}", save_every_steps=1)
        run = run_dir(tmp_path, f"kill{trial}")
        _wait_for_saves(run / "checkpoint-last.pth", process, rng.randint(1, 40))  # of 96: then inside a step
        process.kill()  # or the next save, wherever the trainer is when the replacement is seen
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        killed_mid_save += any(run.glob(".*.tmp"))
        newest_good_checkpoint(run)  # the newest intact checkpoint loads
        assert train.main(["-r", str(run)]) == 0
        assert_same_training_state(expected, load(run / "checkpoint-epoch2.pth"))
        assert not list(run.glob(".*.tmp")), "a later successful save removes stray temp files"
    print(f"kill -9 trials: 5, killed while a temp file existed: {killed_mid_save}")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_until_disk_full(obj, file):
        calls.append(file)
        if len(calls) == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, file)

    monkeypatch.setattr(utils.checkpoint.torch, "save", save_until_disk_full)
    path = write_config(tmp_path, tiny_config(tmp_path, save_every_steps=4, monitor="off"))
    assert train.main(["-c", str(path), "--run-id", "full"]) == 1
    last = run_dir(tmp_path, "full") / "checkpoint-last.pth"
    assert capsys.readouterr().err == (f"error: could not save checkpoint {last}: No space left on device "
                                       "(ENOSPC); "
                                       "the previous one is intact\n")
    assert load(last)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["checkpoint-last.pth", "config.yaml", "run.json"]


NAN_LOSS = """import torch, torch.nn.functional as F
calls = 0
def nan_at_fourth_batch(output, target):
    global calls
    calls += torch.is_grad_enabled()  # training batches: not the rehearsal's or validation's
    loss = F.nll_loss(output, target)
    return loss * float("nan") if calls == 4 else loss
"""


def test_nonfinite_loss_stops_with_epoch_and_batch(tmp_path, capsys):
    (tmp_path / "nanloss.py").write_text(NAN_LOSS)
    path = write_config(tmp_path, tiny_config(tmp_path, save_every_steps=1))
    assert train.main(["-c", str(path), "--run-id", "nan", f"loss={tmp_path}/nanloss.py:nan_at_fourth_batch"]) == 1
    assert capsys.readouterr().err == ("error: non-finite loss at epoch 1 batch 3; the last good checkpoint is kept "
                                       "(set trainer.on_nonfinite: skip to skip such steps)\n")
    last = load(run_dir(tmp_path, "nan") / "checkpoint-last.pth")
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_a_failure_on_the_saving_thread_is_logged_under_the_error_that_ends_the_run(tmp_path, monkeypatch, capsys):
    from base.checkpointer import Checkpointer

    def unpermitted(self):
        raise PermissionError(13, "Permission denied", str(self.run_dir))

    monkeypatch.setattr(Checkpointer, "_prune", unpermitted)  # epoch 1's file is published, then this fails
    (tmp_path / "nanloss.py").write_text(NAN_LOSS.replace("calls == 4", "calls == 12"))
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert train.main(["-c", str(path), "--run-id", "nan", f"loss={tmp_path}/nanloss.py:nan_at_fourth_batch"]) == 1
    run = run_dir(tmp_path, "nan")
    shown = capsys.readouterr()
    assert shown.err == ("error: non-finite loss at epoch 2 batches 2-7; the last good checkpoint is kept (set "
                         "trainer.on_nonfinite: skip to skip such steps)\n")
    assert f"while finishing the checkpoints' files: [Errno 13] Permission denied: '{run}'" in shown.out
    assert load(run / "checkpoint-epoch1.pth")["epoch"] == 1


def test_nonfinite_loss_skip_mode_skips_and_counts(tmp_path, capsys):
    (tmp_path / "nanloss.py").write_text(NAN_LOSS.replace("nan_at_fourth_batch", "nan_loss"))
    path = write_config(tmp_path, tiny_config(tmp_path, on_nonfinite="skip"))
    assert train.main(["-c", str(path), "--run-id", "skip", f"loss={tmp_path}/nanloss.py:nan_loss"]) == 0
    assert load(run_dir(tmp_path, "skip") / "checkpoint-epoch1.pth")["metrics"]["counts"]["loss"] == 256 - 32
    final = load(run_dir(tmp_path, "skip") / "checkpoint-epoch2.pth")
    assert final["skipped_steps"] == 1 and final["global_step"] == 16
    assert all(torch.isfinite(t).all() for t in final["state_dict"].values())
    assert "Non-finite loss at epoch 1 batch 3: step skipped (1 so far)" in capsys.readouterr().out


class _CountingDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.loaded = []

    def __len__(self):
        return 40

    def __getitem__(self, index):
        self.loaded.append(index)
        return torch.tensor(index)


def test_resumed_batches_are_skipped_without_loading_them():
    from base.base_data_loader import BaseDataLoader, BatchStream

    dataset = _CountingDataset()
    stream = BatchStream(BaseDataLoader(dataset, 4, num_workers=0, seed=3))
    first_pass = [next(stream) for _ in range(10)]
    dataset.loaded.clear()
    stream.load_state_dict({"pass": 0, "batches_done": 7})
    assert torch.equal(next(stream), first_pass[7])
    assert len(dataset.loaded) == 4, "only the next batch is loaded"
