"""Before and during a long run: the fast dev run, and what the console says after a resume."""
import re
import tempfile
from pathlib import Path

from test_resume import MID, _reference

import train
from conftest import run_dir, tiny_config, write_config


def _leftover_dev_dirs():
    return set(Path(tempfile.gettempdir()).glob("torchkiln-fast-dev-run-*"))


def test_fast_dev_run_checks_each_stage_and_leaves_nothing(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=50)
    config["lr_scheduler"] = {"type": "OneCycleLR", "args": {"max_lr": 0.01, "total_steps": "auto"}}
    config["trainer"]["lr_step"] = "batch"  # a schedule fixed to the run's length resumes too
    before = _leftover_dev_dirs()
    assert train.main(["-c", str(write_config(tmp_path, config)), "--fast-dev-run", "3"]) == 0
    out = capsys.readouterr().out
    stages = [line.split()[0] for line in out.splitlines() if re.match(r"  \w+ +ok: ", line)]
    assert stages == ["train", "validate", "save", "resume", "test"], out
    assert "  train     ok: 3 batches, loss " in out and "  validate  ok: 2 batches, loss " in out
    assert "  resume    ok: epoch 2 from checkpoint-last.pth: 3 batches, step 6" in out
    assert "  test      ok: 3 batches of data_loader with training=False: loss " in out
    assert out.splitlines()[-1].startswith("fast dev run passed in ")
    assert not (tmp_path / "saved").exists() and _leftover_dev_dirs() == before


def test_a_fast_dev_run_that_fails_says_where_and_removes_its_directory(tmp_path, capsys):
    (tmp_path / "crash.py").write_text("import torch\ndef broken(output, target):\n"
                                       "    if torch.is_grad_enabled():\n"
                                       "        raise RuntimeError('metric exploded')\n    return 0.0\n")
    before = _leftover_dev_dirs()
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert train.main(["-c", str(path), "--fast-dev-run", f"metrics=[{tmp_path}/crash.py:broken]"]) == 1
    assert "RuntimeError: metric exploded" in capsys.readouterr().err
    assert not (tmp_path / "saved").exists() and _leftover_dev_dirs() == before


def test_after_a_mid_epoch_resume_the_epoch_line_shows_the_epochs_learning_rate(tmp_path, capsys):
    reference = _reference(tmp_path, 0, lr_step="batch", verbosity=1)
    capsys.readouterr()
    assert train.main(["-r", str(reference / MID), "--run-id", "resumed"]) == 0
    out = capsys.readouterr().out
    assert "Done: finished 3 epochs (this process resumed at epoch 2, batch 5) in " in out

    def epoch_two(run):
        log = (tmp_path / "saved/log/tiny" / run / "info.log").read_text()
        return next(line for line in log.splitlines() if "epoch 2/3  lr " in line).split("epoch 2/3  ")[1]

    assert epoch_two("resumed").split("  ")[0] == epoch_two("reference").split("  ")[0]
    assert run_dir(tmp_path, "resumed").is_dir()


def test_one_gpu_asked_on_a_machine_without_one_is_quiet(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    config["n_gpu"] = 1
    assert train.main(["-c", str(write_config(tmp_path, config))]) == 0
    captured = capsys.readouterr()
    assert "GPU" not in captured.out + captured.err and "  device   cpu" in captured.out
