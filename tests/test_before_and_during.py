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


def test_the_lr_range_test_suggests_a_sensible_rate_and_leaves_the_run_untouched(tmp_path):
    import copy

    import torch

    from base.lr_finder import range_test, suggestion, write_curve
    from conftest import DATA_DIR, ROOT
    from parse_config import parse_args
    from utils.seeding import rng_state

    config, request = parse_args(["-c", str(ROOT / "configs/mnist.yaml"), f"trainer.save_dir={tmp_path}",
                                  f"data_loader.args.data_dir={DATA_DIR}"], train.lookups())
    trainer, _, _ = train.build_trainer(config, request)
    weights, moments = copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())
    rngs = rng_state()
    lrs, losses = range_test(trainer.model, trainer.optimizer, trainer.criterion, trainer.data_loader,
                             trainer.device)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer.state_dict() == moments, "its lr and moments as the schedule left them"
    assert torch.equal(rng_state()["torch"], rngs["torch"]) and rng_state()["python"] == rngs["python"]
    suggested = suggestion(lrs, losses)
    assert 1e-3 <= suggested <= 1e-1, suggested  # MNIST's LeNet trains well with Adam from ~1e-3 to ~3e-2
    files = write_curve(lrs, losses, suggested, tmp_path / "curve")
    assert [path.name for path in files] == ["lr_find.csv", "lr_find.png"]
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_find_lr_prints_the_suggestion_and_the_override_that_uses_it(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config["lr_scheduler"] = None
    assert train.main(["-c", str(write_config(tmp_path, config)), "--find-lr", "--run-id", "lr"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"  suggested lr [\d.]+e-0\d, where the smoothed loss falls fastest", out), out
    assert re.search(rf"  to use it:  python train.py -c {tmp_path}/config.yaml optimizer.args.lr=[\d.e-]+\n", out)
    assert (tmp_path / "saved/log/tiny/lr/lr_find.png").is_file()
    assert not list(run_dir(tmp_path, "lr").glob("*.pth")), "nothing trained"
