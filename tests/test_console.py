"""What a person sees: a clean terminal, a header and a summary, run directories that never collide, and a
record of every scalar (metrics.csv, TensorBoard's HParams, text and custom-scalars plugins)."""
import csv
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import MID, _reference

import train
from conftest import DATA_DIR, ROOT, files_under, load, run_dir, tiny_config, write_config
from parse_config import parse_args
from utils.run_directory import claim_run_directory


def run_in_terminal(argv, cwd, timeout=120.0, columns=120):
    """Run a command on a pseudo-terminal `columns` wide; (exit status, the raw bytes it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while select.select([master], [], [], timeout)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=timeout), b"".join(chunks).decode()


def screen_lines(raw):
    """The lines left on the screen: each carriage return moves back to the start of the line and what
    follows overwrites it, as a terminal does."""
    lines = []
    for line in raw.split("\n"):
        shown = ""
        for part in line.rstrip("\r").split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return [line for line in lines if line]


@pytest.mark.slow
@pytest.mark.parametrize("verbosity", [0, 1, 2])
def test_terminal_shows_clean_lines_at_every_verbosity(tmp_path, verbosity):
    config = tiny_config(tmp_path, progress_bar=True, verbosity=verbosity, log_step=2, tensorboard=False)
    path = write_config(tmp_path, config)
    status, raw = run_in_terminal([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "tty"],
                                  tmp_path)
    assert status == 0, raw
    assert "%|" in raw and "it/s" in raw, "progress bars were drawn"
    shown = screen_lines(raw)
    assert not [line for line in shown if "%|" in line or "it/s" in line], "no bar fragment is left on the screen"
    epoch_lines, pieces, inside = [], [], False  # each epoch line with the lines it wrapped into
    for line in shown:
        inside = line.startswith("epoch ") or (inside and line.startswith("  "))
        if line.startswith("epoch "):
            epoch_lines.append(line)
        elif inside:
            epoch_lines[-1] += line
        pieces += [line] if inside else []
    assert all(len(line) <= 120 for line in pieces), "wrapped to the terminal's width"
    if verbosity == 0:
        assert shown == [], "verbosity 0 shows warnings only"
        return
    assert [line.split("  ")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(r"s  [\d,]+/s data \d+%(  \*)?$", line) for line in epoch_lines), epoch_lines
    assert shown[0] == "Run tiny/tty" and shown[-7].startswith("Done: finished 2 epochs in ")
    speed = next(index for index, line in enumerate(shown) if line.startswith("  speed    "))
    assert shown[speed + 1].startswith(" " * 11) and not shown[speed + 1].startswith(" " * 12), "under its value"
    assert f"{shown[speed]} {shown[speed + 1].strip()}" == ("  speed    precision 32, channels_last off, "
                                                            "background_saves off (auto: fastest on the CPU); "
                                                            "reuse_host_memory on (auto: glibc's malloc)")
    assert all(len(line) <= 120 for line in shown[:speed + 2])
    assert not [line for line in shown if "Train epoch" in line], "step lines go to info.log only"
    log = (tmp_path / "saved/log/tiny/tty/info.log").read_text()
    assert "Train epoch 1 [2/8] loss: " in log and "epoch 2/2  lr " in log


def test_header_and_summary(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=2)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "h"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[out.index("Run tiny/h"):][:10]
    assert header[1:] == [
        f"  config   {tmp_path}/config.yaml",
        "  data     train 256 samples in 8 batches of 32; valid 64 samples in 2 batches of 32",
        "  length   2 epochs x 8 steps = 16 optimizer steps",
        "  device   cpu, precision 32; workers 0, pin_memory false",
        "  speed    precision 32, channels_last off, background_saves off (auto: fastest on the CPU); "
        "reuse_host_memory on (auto: glibc's malloc)",
        "  model    MnistModel, 21,840 parameters (21,840 trainable)",
        "  monitor  min val_loss (* marks a new best)",
        "  run dir  saved/models/tiny/h",
        "  log dir  saved/log/tiny/h (info.log, metrics.csv)"]
    best = load(run_dir(tmp_path, "h") / "model_best.pth")
    summary = out[-7:]
    assert summary[0].startswith("Done: finished 2 epochs in ")
    assert summary[1] == (f"  best      val_loss {best['monitor_best']:.4g} at epoch {best['monitor_best_epoch']}: "
                          "saved/models/tiny/h/model_best.pth")
    assert summary[2:] == [
        "  last      saved/models/tiny/h/checkpoint-last.pth",
        "  test      python test.py --resume saved/models/tiny/h/model_best.pth",
        "  deploy    python export.py --resume saved/models/tiny/h/model_best.pth",
        "  curves    (TensorBoard is off); every scalar is also in saved/log/tiny/h/metrics.csv",
        "  continue  python train.py --resume saved/models/tiny/h trainer.epochs=4"]


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
    run = run_dir(tmp_path, "done")
    assert train.main(["-c", str(write_config(tmp_path, tiny_config(tmp_path))), "--run-id", "done"]) == 0
    capsys.readouterr()
    before = [(p, p.stat().st_mtime_ns) for p in files_under(tmp_path)]
    assert train.main(["--resume", str(run)]) == 0
    assert capsys.readouterr().out == (f"{run}/checkpoint-last.pth: this run is finished (2 of 2 epochs). To train "
                                       "longer: python train.py --resume saved/models/tiny/done trainer.epochs=4\n")
    assert [(p, p.stat().st_mtime_ns) for p in files_under(tmp_path)] == before
    assert train.main(["--resume", str(run), "trainer.epochs=3"]) == 0
    assert load(run / "checkpoint-last.pth")["epoch"] == 3


def test_run_ids_never_collide(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    config, request = parse_args(["-c", str(path)], train.lookups())
    first = claim_run_directory(config.trainer["save_dir"], config["name"], request.run_id)
    second = claim_run_directory(config.trainer["save_dir"], config["name"], request.run_id)  # the same second
    assert second.run_id == f"{first.run_id}_2" and first.checkpoints.is_dir() and second.checkpoints.is_dir()
    assert train.main(["-c", str(path), "--run-id", first.run_id]) == 2
    assert capsys.readouterr().err == (f"error: --run-id {first.run_id}: {first.checkpoints} already exists; choose "
                                       f"another id, or continue that run with --resume {first.checkpoints}\n")


@pytest.mark.slow
def test_two_processes_started_together_get_two_run_directories(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1, tensorboard=True))
    command = [sys.executable, str(ROOT / "train.py"), "-c", str(path)]
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    runs = sorted((tmp_path / "saved/models/tiny").iterdir())
    assert len(runs) == 2 and all((run / "config.yaml").is_file() for run in runs)
    assert all(len(list((tmp_path / "saved/log/tiny" / run.name).glob("events.out.tfevents.*"))) == 1
               for run in runs)


def test_flags_and_overrides_in_any_order(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    config, _ = parse_args(["-c", str(path), "trainer.epochs=1", "--lr", "1e-3", "trainer.verbosity=2", "--bs", "8",
                            "seed=3"], train.lookups())
    assert (config.trainer["epochs"], config.trainer["verbosity"], config["seed"]) == (1, 2, 3)
    assert config["optimizer"]["args"]["lr"] == 1e-3 and config["data_loader"]["args"]["batch_size"] == 8


def test_info_log_holds_early_warnings_and_the_traceback_of_a_crash(tmp_path):
    (tmp_path / "crash.py").write_text("import torch\ndef broken(output, target):\n"
                                       "    if torch.is_grad_enabled():  # in training, past the rehearsal\n"
                                       "        raise RuntimeError('metric exploded')\n    return 0.0\n")
    config = tiny_config(tmp_path, epochs=1)
    config["n_gpu"] = 2  # more than this machine has: a warning (one asked on a machine with none is quiet)
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path), "--run-id", "c", f"metrics=[{tmp_path}/crash.py:broken]"]) == 1
    log = (tmp_path / "saved/log/tiny/c/info.log").read_text()
    assert "utils.device - WARNING - n_gpu is 2 but 0 GPU(s) are available here; training on the CPU" in log
    assert "ERROR - The run crashed\nTraceback (most recent call last):" in log
    assert "RuntimeError: metric exploded" in log


def test_metrics_csv_continues_across_a_resume_without_duplicate_rows(tmp_path):
    reference = _reference(tmp_path, 0, log_step=1)
    csv_path = tmp_path / "saved/log/tiny/reference/metrics.csv"
    with csv_path.open(newline="") as file:
        expected = list(csv.reader(file))
    assert expected[0] == ["step", "tag", "value"] and len(expected) == 1 + 24 * 2 + 3 * 5
    assert train.main(["-r", str(reference / MID)]) == 0  # as after a kill at step 13: resume into the same run
    with csv_path.open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows == expected, "the same rows, in the same order, none twice"


def test_tensorboard_has_hparams_config_text_and_a_train_valid_layout(tmp_path):
    config = tiny_config(tmp_path, epochs=1, tensorboard=True)
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "tb"]) == 0
    events = EventAccumulator(str(tmp_path / "saved/log/tiny/tb"))
    events.Reload()
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                          "_hparams_/session_end_info"}
    assert list(events.PluginTagToContent("text")) == ["config/text_summary"]
    assert list(events.PluginTagToContent("custom_scalars")) == ["custom_scalars__config__"]
    assert events.Scalars("hparams/best/val_loss")[0].value == pytest.approx(load(
        run_dir(tmp_path, "tb") / "checkpoint-last.pth")["monitor_best"])
    assert events.Scalars("hparams/last/val_loss")[0].value == events.Scalars("epoch/val_loss")[-1].value
    assert DATA_DIR in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_scalars_reach_tensorboard_one_event_per_call_at_the_epoch_end_or_on_close(tmp_path, monkeypatch):
    from logger import writer as run_writer

    monkeypatch.setattr(run_writer, "HAND_OVER_S", float("inf"))
    writer = run_writer.RunWriter(tmp_path, tensorboard=True, csv=True)
    handed, hand = [], writer._writer.file_writer.add_summary
    monkeypatch.setattr(writer._writer.file_writer, "add_summary",
                        lambda summary, step, *rest: (handed.append((step, len(summary.value))), hand(summary, step, *rest)))
    logged_at = []
    for step in (1, 2, 3):
        before = time.time()
        writer.add_scalars("train", {"loss": 1 / step, "lr": 0.1}, step)
        logged_at.append((before, time.time()))
    assert handed == [], "nothing wakes TensorBoard's writer thread during an epoch"
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3 * 2, "metrics.csv has each row at once"
    writer.add_scalars("epoch", {"loss": 0.4, "val_loss": 0.5}, 3)
    writer.hand_over()
    assert handed == [(1, 2), (2, 2), (3, 2), (3, 2)], "one event per call, every tag in it"
    monkeypatch.setattr(run_writer, "HAND_OVER_S", 0.0)
    writer.add_scalars("train", {"loss": 0.2, "lr": 0.1}, 4)
    assert handed[-1] == (4, 2), "held no longer than HAND_OVER_S"
    monkeypatch.setattr(run_writer, "HAND_OVER_S", float("inf"))
    writer.add_scalars("train", {"loss": 0.1, "lr": 0.1}, 5)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(point.step, point.value) for point in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, pytest.approx(0.2)), (5, pytest.approx(0.1))]
    assert [point.step for point in events.Scalars("epoch/val_loss")] == [3]
    for point, (before, after) in zip(events.Scalars("train/loss"), logged_at):
        assert before <= point.wall_time <= after, "each point keeps the time it was logged at, not handed over"


def test_a_long_header_row_wraps_under_its_value_and_never_splits_a_path():
    from logger.logger import fitted

    assert fitted("  log dir  /tmp/saved/log/Mnist_LeNet/1130_223112 (info.log, metrics.csv, TensorBoard)", 80) == [
        "  log dir  /tmp/saved/log/Mnist_LeNet/1130_223112 (info.log, metrics.csv,",
        "           TensorBoard)"]
    path = "/data/" + "x" * 90
    assert fitted(f"  run dir  {path}", 80) == ["  run dir", f"           {path}"], "a path too long stays whole"
