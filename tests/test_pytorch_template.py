"""pytorch-template projects run on torchkiln: its helpers, its old config schemas, its checkpoints, and a whole
ported project trained, resumed and tested in a fresh copy of the template."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

import builders
import new_project
import parse_config
import test as test_script
import train
from conftest import DATA_DIR, files_under, load, run_dir, tiny_config, write_config
from model.model import MnistModel


def test_template_helpers_import_and_behave_like_the_template(tmp_path):
    from parse_config import ConfigParser
    from utils import MetricTracker, inf_loop, prepare_device, read_json, write_json

    write_json(OrderedDict(b=1, a=[1, 2]), tmp_path / "x.json")
    assert list(read_json(tmp_path / "x.json")) == ["b", "a"]
    assert list(zip(range(5), inf_loop([1, 2]))) == [(0, 1), (1, 2), (2, 1), (3, 2), (4, 1)]
    assert prepare_device(0) == (torch.device("cpu"), [])
    tracker = MetricTracker("loss", "accuracy", writer=None)
    tracker.update("loss", torch.tensor(1.0), n=2)
    tracker.update("loss", 4.0, n=1)
    tracker.update("accuracy", 0.5)
    assert tracker.avg("loss") == pytest.approx(2.0) and tracker.result() == {"loss": 2.0, "accuracy": 0.5}

    config = ConfigParser(tiny_config(tmp_path), modification={"optimizer;args;lr": 0.5, "seed": None}, run_id="p")
    assert config["optimizer"]["args"]["lr"] == 0.5 and config.resume is None
    assert config.save_dir == tmp_path / "saved/models/tiny/p" and (config.save_dir / "config.json").is_file()
    assert config.log_dir == tmp_path / "saved/log/tiny/p" and config.log_dir.is_dir()
    model = config.init_obj("arch", __import__("model.model").model)
    assert isinstance(model, MnistModel)
    optimizer = config.init_obj("optimizer", torch.optim, model.parameters())
    assert optimizer.defaults["lr"] == 0.5
    assert config.init_ftn("lr_scheduler", torch.optim.lr_scheduler)(optimizer).gamma == 0.5
    assert config.get_logger("trainer", 1).level == 20


@pytest.mark.parametrize("variant, notices", [
    ({"tensorboard": {"enabled": False, "modules": ["tensorboardX"]}}, ["'tensorboard' is a pytorch-template key"]),
    ({"trainer": {"tensorboardX": False, "log_dir": "saved/runs"}},
     ["'trainer.tensorboardX' is a pytorch-template key", "'trainer.log_dir' is a pytorch-template key"]),
    ({"visualization": {"tensorboardX": False, "log_dir": "saved/runs"},
      "trainer": {"save_freq": 2, "monitor": "val_loss", "monitor_mode": "min"}},
     ["'visualization' is a pytorch-template key", "'trainer.save_freq' is a pytorch-template key",
      "'trainer.monitor_mode' is a pytorch-template key"]),
], ids=["2019-06", "2019-04", "2018-11"])
def test_old_config_schemas_are_mapped_with_a_notice(tmp_path, capsys, variant, notices):
    config = tiny_config(tmp_path, epochs=1)
    del config["trainer"]["tensorboard"]
    config.update({key: value for key, value in variant.items() if key != "trainer"})
    config["trainer"].update(variant.get("trainer", {}))
    path = write_config(tmp_path, config, "old.json")
    parsed, request = parse_config.parse_args(["-c", str(path)], train.lookups())
    assert parsed.trainer["tensorboard"] is False and "tensorboard" not in parsed.data
    assert [notice.split(": ", 1)[1][: len(expected)] for notice, expected in zip(request.notices, notices)] == notices
    if "save_freq" in str(variant):
        assert parsed.trainer["save_period"] == 2 and parsed.trainer["monitor"] == "min val_loss"
    assert train.main(["-c", str(path), "--run-id", "old"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{path}: {notice}" in printed for notice in notices)


def _pytorch_template_checkpoint(path, monkeypatch, state_dict, config, extra=None, zipped=True):
    """A checkpoint as pytorch-template writes it: its ConfigParser pickled whole, Path objects and numpy
    scalars inside, model weights under a DataParallel 'module.' prefix; `zipped=False`: as torch < 1.6 wrote
    it."""
    class ConfigParser:
        pass

    ConfigParser.__module__, ConfigParser.__qualname__ = "parse_config", "ConfigParser"
    parser = ConfigParser()
    parser.__dict__.update(_config=OrderedDict(config), resume=None, log_levels={0: 30, 1: 20, 2: 10},
                           _save_dir=pathlib.PosixPath("saved/models/x"), _log_dir=pathlib.PosixPath("saved/log/x"))
    monkeypatch.setattr(parse_config, "ConfigParser", ConfigParser)
    torch.save({"arch": "MnistModel", "epoch": 7, "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
                "optimizer": {}, "monitor_best": np.float64(0.05), "config": parser, **(extra or {})}, path,
               _use_new_zipfile_serialization=zipped)
    monkeypatch.undo()


class _Payload:
    """Pickles as a call to `function(argument)`: loading it for real would make that call."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "pre-1.6"])
def test_pytorch_template_checkpoints_load_weights_without_running_code(tmp_path, monkeypatch, capsys, zipped):
    weights = MnistModel().state_dict()
    config = tiny_config(tmp_path, epochs=1)
    old = tmp_path / "model_best.pth"
    victim = tmp_path / "victim"
    victim.mkdir()
    _pytorch_template_checkpoint(old, monkeypatch, weights, config, {"payload": _Payload(shutil.rmtree, str(victim))},
                                 zipped)
    assert zipfile.is_zipfile(old) == zipped
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(old, weights_only=True)

    assert test_script.main(["-r", str(old)]) == 0
    assert set(json.loads((tmp_path / "model_best.test.json").read_text())) == {"checkpoint", "loss", "accuracy"}
    init = write_config(tmp_path, {**config, "arch": {"type": "MnistModel", "args": {}, "init_from": {"path": str(old)}}})
    assert train.main(["-c", str(init), "--run-id", "from_old", "optimizer.args.lr=0"]) == 0
    trained = load(run_dir(tmp_path, "from_old") / "checkpoint-epoch1.pth")["state_dict"]
    assert all(torch.equal(trained[key], weights[key]) for key in weights)
    capsys.readouterr()
    assert train.main(["-r", str(old)]) == 2
    assert capsys.readouterr().err == (f"error: {old}: a pytorch-template checkpoint holds weights but no training "
                                       f"state to resume; start a run from its weights with arch.init_from.path={old}\n")
    assert victim.is_dir(), "shutil.rmtree named in the file was never called"
    shell = tmp_path / "shell.pth"
    _pytorch_template_checkpoint(shell, monkeypatch, weights, config, {"payload": _Payload(os.system, "touch pwned")},
                                 zipped)
    assert test_script.main(["-r", str(shell)]) == 2
    assert "refused: not a torchkiln checkpoint, or unsafe" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


# A small project written against victoresque/pytorch-template, as people port them: the template's own
# data_loaders.py, metrics returning floats, a loss class with arguments, a separate validation loader,
# its own config keys, and imports of the template's helpers.
TEMPLATE_DATA_LOADERS = '''from torchvision import datasets, transforms
from base import BaseDataLoader


class MnistDataLoader(BaseDataLoader):
    """
    MNIST data loading demo using BaseDataLoader
    """
    def __init__(self, data_dir, batch_size, shuffle=True, validation_split=0.0, num_workers=1, training=True):
        trsfm = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.1307,), (0.3081,))
        ])
        self.data_dir = data_dir
        self.dataset = datasets.MNIST(self.data_dir, train=training, download=True, transform=trsfm)
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers)
'''
TEMPLATE_METRICS = '''import torch


def accuracy(output, target):
    with torch.no_grad():
        pred = torch.argmax(output, dim=1)
        assert pred.shape[0] == len(target)
        correct = 0
        correct += torch.sum(pred == target).item()
    return correct / len(target)


def top_k_acc(output, target, k=3):
    with torch.no_grad():
        pred = torch.topk(output, k, dim=1)[1]
        assert pred.shape[0] == len(target)
        correct = 0
        for i in range(k):
            correct += torch.sum(pred[:, i] == target).item()
    return correct / len(target)
'''
PROJECT_LOSS = '''import torch
import torch.nn as nn
import torch.nn.functional as F
from parse_config import ConfigParser
from utils import MetricTracker, inf_loop, prepare_device, read_json, write_json


def nll_loss(output, target):
    return F.nll_loss(output, target)


class FocalNLL(nn.Module):
    def __init__(self, gamma=2.0, reduction="mean"):
        super().__init__()
        self.gamma, self.reduction = gamma, reduction

    def forward(self, output, target):
        log_p = output.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        return loss.mean() if self.reduction == "mean" else loss.sum()
'''


def _ported_config():
    return {
        "name": "Ported", "n_gpu": 1, "num_classes": 10,
        "arch": {"type": "MnistModel", "args": {"num_classes": 10}},
        "data_loader": {"type": "MnistDataLoader", "args": {"data_dir": "data/mnist-5k", "batch_size": 128,
                                                            "shuffle": True, "validation_split": 0.0,
                                                            "num_workers": 0}},
        "valid_data_loader": {"type": "MnistDataLoader", "args": {"data_dir": "data/mnist-5k", "batch_size": 500,
                                                                  "training": False, "num_workers": 0}},
        "optimizer": {"type": "Adam", "args": {"lr": 0.002, "weight_decay": 0, "amsgrad": True}},
        "loss": {"type": "FocalNLL", "args": {"gamma": 1.0}},
        "metrics": ["accuracy", "top_k_acc"],
        "lr_scheduler": {"type": "StepLR", "args": {"step_size": 50, "gamma": 0.1}},
        "trainer": {"epochs": 2, "save_dir": "saved/", "save_period": 1, "verbosity": 2,
                    "monitor": "max val_accuracy", "early_stop": 10, "tensorboard": True, "warmup": 0},
    }


@pytest.mark.slow
def test_a_ported_pytorch_template_project_trains_resumes_and_tests(tmp_path):
    project = tmp_path / "Ported"
    assert new_project.main([str(project), "--with-data"]) == 0
    (project / "data_loader/data_loaders.py").write_text(TEMPLATE_DATA_LOADERS)
    (project / "model/metric.py").write_text(TEMPLATE_METRICS)
    (project / "model/loss.py").write_text(PROJECT_LOSS)
    (project / "config.json").write_text(json.dumps(_ported_config(), indent=4))

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=project, capture_output=True, text=True, timeout=300)

    assert run("train.py", "--help").returncode == 0
    first = run("train.py", "-c", "config.json", "--run-id", "port", "trainer.epochs=1")
    assert first.returncode == 0, first.stderr
    assert "num_classes: not a torchkiln key: kept for your code" in first.stdout
    assert "trainer.warmup: not a torchkiln key: kept for your code" in first.stdout
    runs = project / "saved/models/Ported/port"
    resumed = run("train.py", "-r", str(runs), "trainer.epochs=2")
    assert resumed.returncode == 0, resumed.stderr
    best = load(runs / "model_best.pth")
    assert best["epoch"] == 2 and best["config"]["num_classes"] == 10 and best["config"]["trainer"]["warmup"] == 0
    assert best["monitor_best"] > 0.8, "chance is 0.1"
    tested = run("test.py", "-r", str(runs / "model_best.pth"))
    assert tested.returncode == 0, tested.stderr
    results = json.loads((runs / "model_best.test.json").read_text())
    assert results["accuracy"] == pytest.approx(best["monitor_best"], abs=1e-6), "the test split is the val loader"
    assert "Traceback" not in first.stderr + resumed.stderr + tested.stderr


def test_template_data_loaders_module_keeps_help_working(tmp_path, monkeypatch, capsys):
    """Its module has no tv_transforms: --help and the transform lookups must not depend on it."""
    module = tmp_path / "data_loaders_template.py"
    module.write_text(TEMPLATE_DATA_LOADERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import data_loaders_template

    monkeypatch.setattr(builders, "module_data", data_loaders_template)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0 and "trainer options" in capsys.readouterr().out
    config = tiny_config(tmp_path, epochs=1)
    config["data_loader"]["args"] = {"data_dir": DATA_DIR, "batch_size": 64, "validation_split": 0.1,
                                     "num_workers": 0}
    before = files_under(tmp_path)
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path), "--print-config"]) == 0
    assert files_under(tmp_path) == sorted(before + [path])
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
