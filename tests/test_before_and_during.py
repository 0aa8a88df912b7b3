"""Before and during a long run: the fast dev run, and what the console says after a resume."""
import re
import tempfile
from pathlib import Path

import pytest
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
    assert "Done: finished 3 epochs (24 steps in all, 11 in this process, which resumed at epoch 2, batch 5) in " \
        in out

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


def test_the_layer_table_is_in_info_log_always_and_on_the_console_with_summary(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "quiet"]) == 0
    assert "layer       type" not in capsys.readouterr().out
    log = (tmp_path / "saved/log/tiny/quiet/info.log").read_text()
    assert "MnistModel: 21,840 parameters (21,840 trainable); output shapes on a real batch" in log
    assert train.main(["-c", str(path), "--run-id", "shown", "--summary"]) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines()[1:7]] == [
        ["layer", "type", "params", "output"],
        ["conv1", "Conv2d", "260", "[32,", "10,", "24,", "24]"],
        ["conv2", "Conv2d", "5,020", "[32,", "20,", "8,", "8]"],
        ["conv2_drop", "Dropout2d", "0", "[32,", "20,", "8,", "8]"],
        ["fc1", "Linear", "16,050", "[32,", "50]"],
        ["fc2", "Linear", "510", "[32,", "10]"]]


def test_a_resnet18_layer_table_at_depth_one_and_two(tmp_path, capsys):
    import torch
    import torchvision

    from base.model_summary import LayerTable

    model = torchvision.models.resnet18(num_classes=10).eval()
    table = LayerTable(model, 1)
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64))
    table.remove()
    rows = {line.split()[0]: line.split()[1:] for line in table.table().splitlines()[2:]}
    assert list(rows) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert rows["layer4"] == ["Sequential", "8,393,728", "[2,", "512,", "2,", "2]"]
    assert rows["fc"] == ["Linear", "5,130", "[2,", "10]"]
    deeper = LayerTable(model, 2)
    assert any(name == "layer1.0" for name, _ in deeper.layers) and not model(torch.zeros(1, 3, 32, 32)).isnan().any()
    deeper.remove()
    assert not any(module._forward_hooks for module in model.modules()), "no hook stays behind"


def test_n_gpu_auto_takes_what_the_machine_has_and_the_header_says_so(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    config["n_gpu"] = "auto"
    assert train.main(["-c", str(write_config(tmp_path, config))]) == 0
    captured = capsys.readouterr()
    assert "  speed    n_gpu 0 (auto: no GPU visible, the CPU); " in captured.out and "GPU(s)" not in captured.err
    config["n_gpu"] = "all"
    path = write_config(tmp_path, config, "bad.yaml")
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: n_gpu: must be auto or a count of GPUs (0 for the CPU), not 'all'\n"


@pytest.mark.slow
def test_epoch_lines_fit_an_80_column_terminal_breaking_only_between_fields(tmp_path):
    import sys

    from test_console import run_in_terminal, screen_lines

    from conftest import ROOT

    config = tiny_config(tmp_path, progress_bar=False, tensorboard=False, epochs=2)
    config["metrics"] = ["accuracy", "top_k_acc"]
    path = write_config(tmp_path, config)
    status, raw = run_in_terminal([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-id", "narrow"],
                                  tmp_path, columns=80)
    assert status == 0, raw
    shown = screen_lines(raw)
    start = next(i for i, line in enumerate(shown) if line.startswith("epoch 2/2  "))
    end = next(i for i in range(start + 1, len(shown)) if not shown[i].startswith("  ") or "best" in shown[i])
    pieces = shown[start:end]
    assert len(pieces) > 1 and all(len(line) <= 80 for line in pieces), pieces
    log = (tmp_path / "saved/log/tiny/narrow/info.log").read_text()
    whole = next(line for line in log.splitlines() if "epoch 2/2  lr" in line).split(" - INFO - ")[1]
    assert "  ".join(piece.strip() for piece in pieces) == whole, "the same fields, none cut"


@pytest.mark.slow
def test_a_piped_console_gets_progress_lines_with_eta_and_no_bar(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    config = tiny_config(tmp_path, progress_interval=1e-9, epochs=1)  # every batch, whatever the machine's pace
    path = write_config(tmp_path, config)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if re.match(r"epoch 1/1  step \d+/8  ", line)]
    assert len(lines) == 7, result.stdout  # after batches 2..8: the first batch gives no rate yet
    assert all(re.fullmatch(r"epoch 1/1  step \d/8  loss [\d.]+  [\d,]+/s  eta \d+s", line) for line in lines), lines
    assert "it/s" not in result.stdout + result.stderr and "%|" not in result.stderr, "no tqdm bar in a pipe"


def _offline(*args, **kwargs):
    import socket
    import urllib.error

    raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


def test_a_dataset_that_cannot_download_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _offline)
    config = tiny_config(tmp_path, epochs=1, monitor="off")
    config["data_loader"] = {"type": "torchvision.datasets.CIFAR10", "args": {
        "root": str(tmp_path / "cifar"), "train": True, "download": True, "transform": [{"type": "ToTensor"}],
        "batch_size": 8}}
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: data_loader.args.download: torchvision.datasets.CIFAR10 could not download its data "
        "(Name or service not known): without network access, put its files under its root yourself (or run once "
        "where the network is reachable)\n")
    assert not (tmp_path / "saved").exists()


def test_mnist_full_without_network_says_what_to_do(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.mnist

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", _offline)
    config = tiny_config(tmp_path, epochs=1)
    config["data_loader"]["args"].update(data_dir=str(tmp_path / "empty"), download=True)
    assert train.main(["-c", str(write_config(tmp_path, config))]) == 2
    assert capsys.readouterr().err == (
        f"error: data_loader.args.download: MNIST could not be downloaded into '{tmp_path}/empty' (Name or service "
        "not known): without network access, copy its files there, or train on the bundled digits "
        "(configs/mnist.yaml)\n")


def test_overfit_batches_trains_and_validates_on_the_same_few_batches(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=40, overfit_batches=2, monitor="off")
    config["lr_scheduler"] = None
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "fit"]) == 0
    out = capsys.readouterr().out
    assert "  data     train 64 samples in 2 batches of 32; valid 64 samples in 2 batches of 32" in out
    val_losses = [float(re.search(r"val_loss ([\d.e-]+)", line)[1]) for line in out.splitlines()
                  if line.startswith("epoch ")]
    assert val_losses[-1] < 0.2 * val_losses[0], val_losses  # 64 samples: the model can fit them


@pytest.mark.slow
def test_new_project_leaves_the_bundled_data_out_unless_asked_and_the_copy_trains_and_tests(tmp_path, capsys):
    import subprocess
    import sys

    import new_project

    assert new_project.main([str(tmp_path / "lean")]) == 0
    assert "left out: data/ (the bundled MNIST digits), tests/, bench/ and .ci/" in capsys.readouterr().out
    lean = sorted(p.name for p in (tmp_path / "lean").iterdir())
    assert {"base", "parse_config", "utils", "logger", "trainer", "model", "data_loader", "configs", "train.py",
            "test.py", "export.py", "builders.py", "pyproject.toml", "README.md"} <= set(lean)
    assert not {"data", "tests", "bench", ".ci", "saved"} & set(lean), lean

    assert new_project.main([str(tmp_path / "full"), "--with-data"]) == 0
    full = tmp_path / "full"
    assert (full / "data/mnist-5k").is_dir() and (full / "tests/conftest.py").is_file()

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=full, capture_output=True, text=True, timeout=600)

    trained = run("train.py", "-c", "configs/mnist.yaml", "--fast-dev-run")
    assert trained.returncode == 0 and "fast dev run passed" in trained.stdout, trained.stderr
    tested = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py", "tests/test_rehearsal.py")
    assert tested.returncode == 0, tested.stdout[-2000:]
