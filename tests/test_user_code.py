"""Users' own code: losses and metrics with arguments, stateful metrics, foreign loaders and datasets, separate
validation and test data, project keys, errors raised inside user code, fine-tuning and schedulers."""
import copy
import json
import logging

import pytest
import torch

import builders
import test as test_script
import train
import trainer.options
from conftest import assert_same_training_state, files_under, load, run_dir, tiny_config, write_config
from parse_config import parse_args
from parse_config.options import Option, integer

LINEAR_PROJECT = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Blobs(Dataset):
    """Two Gaussian blobs in 8 dimensions: a tiny, learnable classification set."""

    def __init__(self, size=96, offset=0):
        generator = torch.Generator().manual_seed(size + offset)
        self.target = torch.randint(0, 2, (size,), generator=generator)
        self.data = torch.randn(size, 8, generator=generator) + self.target[:, None] * 1.5

    def __len__(self):
        return len(self.target)

    def __getitem__(self, index):
        return self.data[index], self.target[index]


class BlobLoader(DataLoader):
    """A project's own DataLoader subclass, not a BaseDataLoader."""

    def __init__(self, batch_size, shuffle=True, size=96, training=True):
        super().__init__(Blobs(size, offset=0 if training else 1000), batch_size=batch_size, shuffle=shuffle)


class Linear(nn.Module):
    def __init__(self, num_classes=2, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


class WeightedCE(nn.Module):
    """A loss class with arguments, as real projects write them."""

    built = 0

    def __init__(self, weight_of_one=1.0, smoothing=0.0):
        super().__init__()
        WeightedCE.built += 1
        self.register_buffer("weight", torch.tensor([1.0, weight_of_one]))
        self.smoothing = smoothing

    def forward(self, output, target):
        return nn.functional.cross_entropy(output, target, weight=self.weight, label_smoothing=self.smoothing)


def float_accuracy(output, target):
    """pytorch-template's style: returns a Python float."""
    return (output.argmax(1) == target).sum().item() / len(target)


def top_k(output, target, k=1):
    return (output.topk(k, 1).indices == target[:, None]).any(1).float().mean()


class MacroF1:
    """A stateful metric (update/compute/reset/state_dict): exact over the epoch, not a mean of batches."""

    def __init__(self, num_classes=2):
        self.num_classes = num_classes
        self.reset()

    def reset(self):
        self.confusion = torch.zeros(self.num_classes, self.num_classes)

    def update(self, output, target):
        index = target * self.num_classes + output.argmax(1)
        self.confusion += torch.bincount(index, minlength=self.num_classes ** 2).reshape(self.confusion.shape)

    def compute(self):
        true_positive = self.confusion.diag()
        precision = true_positive / self.confusion.sum(0).clamp(min=1)
        recall = true_positive / self.confusion.sum(1).clamp(min=1)
        return (2 * precision * recall / (precision + recall).clamp(min=1e-12)).mean()

    def state_dict(self):
        return {"confusion": self.confusion.clone()}

    def load_state_dict(self, state):
        self.confusion = state["confusion"].clone()
'''


@pytest.fixture
def project(tmp_path):
    """The path of a user's module holding a model, loss, metrics, a Dataset and a DataLoader subclass."""
    path = tmp_path / "userproj.py"
    path.write_text(LINEAR_PROJECT)
    return path


def linear_config(tmp_path, project, **trainer):
    """A config naming only the user's code (by file path), trained on the blobs."""
    config = tiny_config(tmp_path, **trainer)
    config.update({
        "name": "blobs",
        "arch": {"type": f"{project}:Linear", "args": {"num_classes": 2}},
        "data_loader": {"type": f"{project}:BlobLoader", "args": {"batch_size": 16}},
        "valid_data_loader": {"type": f"{project}:BlobLoader", "args": {"batch_size": 32, "training": False}},
        "loss": {"type": f"{project}:WeightedCE", "args": {"weight_of_one": 2.0, "smoothing": 0.1}},
        "metrics": [f"{project}:float_accuracy", {"type": f"{project}:top_k", "args": {"k": 1}, "name": "top1"},
                    {"type": f"{project}:MacroF1", "args": {"num_classes": 2}, "name": "f1"}],
        "lr_scheduler": None,
    })
    return config


def train_run(tmp_path, run_id, config, *overrides):
    path = write_config(tmp_path, config, f"{run_id}.yaml")
    assert train.main(["-c", str(path), "--run-id", run_id, *overrides]) == 0
    return run_dir(tmp_path, run_id, config["name"])


def parse(tmp_path, config, *overrides):
    return parse_args(["-c", str(write_config(tmp_path, config)), *overrides], train.lookups(), "",
                      trainer.options.PROJECT_OPTIONS)


def test_loss_class_is_built_once_with_its_args_and_torch_nn_losses_by_short_name(tmp_path, project):
    config, _ = parse(tmp_path, linear_config(tmp_path, project))
    criterion, metrics = builders.loss_and_metrics(config)
    assert type(criterion).__name__ == "WeightedCE" and criterion.smoothing == 0.1
    assert criterion.weight.tolist() == [1.0, 2.0] and type(criterion).built == 1
    output, target = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    assert metrics["float_accuracy"](output, target) == pytest.approx(2 / 3)
    assert metrics["top1"](output, target).item() == pytest.approx(2 / 3)
    smooth, _ = parse(tmp_path, {**linear_config(tmp_path, project),
                              "loss": {"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.2}}})
    criterion, _ = builders.loss_and_metrics(smooth)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.label_smoothing == 0.2


def test_users_code_trains_validates_and_resumes_exactly(tmp_path, project):
    config = linear_config(tmp_path, project, epochs=3, save_every_steps=9)
    reference = train_run(tmp_path, "reference", config)
    final = load(reference / "checkpoint-epoch3.pth")
    assert final["monitor_best"] < 1.0 and final["global_step"] == 18
    log = (tmp_path / "saved/log/blobs/reference/info.log").read_text()
    for name in ("float_accuracy", "top1", "f1", "val_loss", "val_f1"):
        assert f"  {name} " in log
    assert "is not a BaseDataLoader: resuming inside an epoch re-reads the batches" in log
    mid = load(reference / "checkpoint-epoch2.pth")
    assert mid["epoch"] == 2
    assert train.main(["-r", str(reference / "checkpoint-epoch2.pth"), "--run-id", "resumed",
                       "--trust-checkpoint-config"]) == 0  # the config names .py files
    assert_same_training_state(final, load(run_dir(tmp_path, "resumed", "blobs") / "checkpoint-epoch3.pth"))


def test_foreign_dataloader_resumes_exactly_mid_epoch(tmp_path, project, monkeypatch):
    from base.checkpointer import Checkpointer

    config = linear_config(tmp_path, project, epochs=2, save_every_steps=8)
    save_step = Checkpointer.maybe_save_step

    def keep_step_8(self, make_state, global_step):
        save_step(self, make_state, global_step)
        if global_step == 8:
            self.flush()  # written on a thread
            (self.run_dir / "mid.pth").write_bytes((self.run_dir / "checkpoint-last.pth").read_bytes())

    monkeypatch.setattr(Checkpointer, "maybe_save_step", keep_step_8)
    reference = train_run(tmp_path, "reference", config)
    mid = load(reference / "mid.pth")
    assert (mid["epoch"], mid["batches_in_epoch"]) == (1, 2) and mid["data_order"]["pass_rng"] is not None
    f1_state = mid["metrics"]["stateful"]["f1"]["confusion"]
    assert f1_state.sum() == 32, "the stateful metric's partial epoch is in the checkpoint"
    assert train.main(["-r", str(reference / "mid.pth"), "--run-id", "resumed", "--trust-checkpoint-config"]) == 0
    resumed = load(run_dir(tmp_path, "resumed", "blobs") / "checkpoint-epoch2.pth")
    assert_same_training_state(load(reference / "checkpoint-epoch2.pth"), resumed)
    assert resumed["monitor_best"] == load(reference / "checkpoint-epoch2.pth")["monitor_best"]


def test_stateful_metric_is_exact_over_the_epoch_not_a_mean_of_batches(tmp_path, project):
    config, _ = parse(tmp_path, linear_config(tmp_path, project))
    _, metrics = builders.loss_and_metrics(config)
    from utils.metrics import EpochMetrics

    tracker = EpochMetrics(metrics, torch.device("cpu"))
    batches = [(torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 0, 1])),
               (torch.tensor([[0.0, 1.0]]), torch.tensor([1]))]
    for output, target in batches:
        tracker.update(torch.tensor(0.5), output, target)
    # whole epoch: TP0=2, FP0=1, TP1=1, FN1=1 -> F1_0 = 0.8, F1_1 = 2/3
    result = tracker.result()
    assert result["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert result["float_accuracy"] == pytest.approx(3 / 4) and result["loss"] == pytest.approx(0.5)


def test_torchmetrics_metric_by_dotted_path_and_its_state_in_checkpoints(tmp_path, project):
    pytest.importorskip("torchmetrics")
    config = linear_config(tmp_path, project, epochs=1)
    config["metrics"] = [{"type": "torchmetrics.classification.MulticlassF1Score",
                          "args": {"num_classes": 2, "average": "macro"}, "name": "f1"}]
    run = train_run(tmp_path, "tm", config)
    checkpoint = load(run / "checkpoint-epoch1.pth")
    assert set(checkpoint["metrics"]["stateful"]["f1"]) >= {"tp", "fp", "tn", "fn"}
    assert "  val_f1 " in (tmp_path / "saved/log/blobs/tm/info.log").read_text()


def test_a_dataset_type_is_wrapped_with_the_sections_loader_args(tmp_path, project):
    config = linear_config(tmp_path, project, epochs=1)
    config["data_loader"] = {"type": f"{project}:Blobs",
                             "args": {"size": 64, "batch_size": 8, "validation_split": 16, "num_workers": 0}}
    del config["valid_data_loader"]
    run = train_run(tmp_path, "wrapped", config)
    assert load(run / "checkpoint-epoch1.pth")["global_step"] == 6
    assert load(run / "checkpoint-epoch1.pth")["data_order"] == {"pass": 0, "batches_done": 6}, "exact: no pass_rng"


def test_test_script_uses_the_test_section_or_the_training_false_convention(tmp_path, project, capsys):
    config = linear_config(tmp_path, project, epochs=1)
    run = train_run(tmp_path, "t", config)
    capsys.readouterr()
    trust = "--trust-checkpoint-config"  # the config names the user's .py file
    assert test_script.main(["-r", str(run / "checkpoint-epoch1.pth"), trust]) == 0
    by_convention = json.loads((run / "checkpoint-epoch1.test.json").read_text())
    config["test_data_loader"] = {"type": f"{project}:BlobLoader", "args": {"batch_size": 7, "size": 35,
                                                                           "training": False}}
    run = train_run(tmp_path, "t2", config)
    assert test_script.main(["-r", str(run / "checkpoint-epoch1.pth"), trust]) == 0
    from_section = json.loads((run / "checkpoint-epoch1.test.json").read_text())
    assert set(by_convention) == set(from_section) == {"checkpoint", "loss", "float_accuracy", "top1", "f1"}
    assert by_convention["loss"] != from_section["loss"], "35 other samples"


def test_test_script_fails_loudly_on_empty_test_data(tmp_path, project, capsys):
    config = linear_config(tmp_path, project, epochs=1)
    config["test_data_loader"] = {"type": f"{project}:BlobLoader", "args": {"batch_size": 4, "size": 0}}
    run = train_run(tmp_path, "empty", config)
    capsys.readouterr()
    assert test_script.main(["-r", str(run / "checkpoint-epoch1.pth"), "--trust-checkpoint-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the test data (test_data_loader of ") and err.endswith(
        "yielded no batches: nothing was evaluated\n")
    assert not (run / "checkpoint-epoch1.test.json").exists()


def test_monitor_knows_about_a_validation_section_and_split_validation_overrides(tmp_path, project, capsys):
    config = linear_config(tmp_path, project, monitor="max val_f1")
    assert parse(tmp_path, config)[0].trainer["monitor"] == "max val_f1"
    del config["valid_data_loader"]
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: trainer.monitor: 'val_f1' needs validation data: add a "
                                       "valid_data_loader section or set data_loader.args.validation_split\n")
    overriding = tmp_path / "splitting.py"
    overriding.write_text(f"import sys\nsys.path.insert(0, {str(project.parent)!r})\nfrom userproj import BlobLoader\n"
                          "class Splitting(BlobLoader):\n    def split_validation(self):\n"
                          "        return BlobLoader(16, training=False)\n")
    config["data_loader"]["type"] = f"{overriding}:Splitting"
    assert parse(tmp_path, config)[0].trainer["monitor"] == "max val_f1"


def test_a_dataloader_section_that_is_neither_loader_nor_dataset_is_refused(tmp_path, project, capsys):
    config = linear_config(tmp_path, project)
    config["data_loader"]["type"] = f"{project}:MacroF1"
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: data_loader.type: MacroF1 is neither a DataLoader nor a "
                                       "Dataset class\n")
    assert files_under(tmp_path) == sorted([project, path])


def test_metric_and_loss_argument_errors_name_the_key_path(tmp_path, project, capsys):
    config = linear_config(tmp_path, project)
    config["loss"]["args"]["wieght_of_one"] = config["loss"]["args"].pop("weight_of_one")
    config["metrics"][1]["args"] = {"kk": 2}
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: loss.args.wieght_of_one: is not an argument of WeightedCE (did you mean 'weight_of_one'?)",
        f"{path}: metrics[1].args.kk: is not an argument of top_k (did you mean 'k'?)"]


def test_project_keys_declared_undeclared_and_misspelt(tmp_path, project, monkeypatch, capsys):
    monkeypatch.setattr(trainer.options, "PROJECT_OPTIONS", {
        "num_classes": Option(integer(2), 10, "classes in the dataset"),
        "trainer.warmup_epochs": Option(integer(0), 0, "epochs of linear LR warm-up")})
    config = linear_config(tmp_path, project)
    config["num_classes"] = 2
    config["trainer"]["notes"] = "kept for my code"
    parsed, request = parse(tmp_path, config)
    assert parsed["num_classes"] == 2 and parsed.trainer["warmup_epochs"] == 0
    assert parsed.trainer["notes"] == "kept for my code"
    assert any("trainer.notes: not a torchkiln key: kept for your code" in n for n in request.notices)
    path = write_config(tmp_path, {**config, "num_classes": 1})
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: num_classes: must be an integer >= 2, not 1\n"
    assert train.main(["-c", str(path), "num_classes=2", "trainer.epoch=3", "max_epochs=3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: override 'max_epochs=3': max_epochs: unknown top-level key (did you mean 'trainer.epochs'? that is "
        "torchkiln's name for it); if 'max_epochs' is your own key, declare it in trainer/options.py",
        "override 'trainer.epoch=3': trainer.epoch: unknown trainer option (did you mean 'epochs'?); if "
        "'trainer.epoch' is your own key, declare it in trainer/options.py"]
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "  trainer.warmup_epochs   epochs of linear LR warm-up (0)" in capsys.readouterr().out


def test_an_exception_in_users_constructor_shows_their_file_and_line(tmp_path, project, capsys):
    (tmp_path / "broken_model.py").write_text("import torch\n\nclass Net(torch.nn.Module):\n"
                                              "    def __init__(self):\n        super().__init__()\n"
                                              "        raise ValueError('layer sizes do not match')\n")
    config = linear_config(tmp_path, project)
    config["arch"] = {"type": f"{tmp_path}/broken_model.py:Net", "args": {}}
    path = write_config(tmp_path, config)
    before = files_under(tmp_path)
    assert train.main(["-c", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: ValueError: layer sizes do not match"
    assert err[1] == "in your code (most recent call last):"
    assert err[2] == f'  File "{tmp_path}/broken_model.py", line 6, in __init__'
    assert err[3].strip() == "raise ValueError('layer sizes do not match')" and len(err) == 4
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_a_datasets_getitem_shows_its_line(tmp_path, project, capsys, workers):
    (tmp_path / "bad_data.py").write_text("import torch\n\nclass Bad(torch.utils.data.Dataset):\n"
                                          "    def __len__(self):\n        return 8\n\n"
                                          "    def __getitem__(self, index):\n"
                                          "        return torch.zeros(8), {}['label']\n")
    config = linear_config(tmp_path, project)
    config["data_loader"] = {"type": f"{tmp_path}/bad_data.py:Bad", "args": {"batch_size": 4, "num_workers": workers}}
    assert train.main(["-c", str(write_config(tmp_path, config))]) == 1
    err = capsys.readouterr().err
    assert "KeyError" in err.splitlines()[0] and "'label'" in err.splitlines()[0]
    assert f'File "{tmp_path}/bad_data.py", line 8, in __getitem__' in err
    assert "Traceback" not in err


def test_a_librarys_refusal_of_the_configs_value_is_a_config_error_with_the_key_path(tmp_path, project, capsys):
    path = write_config(tmp_path, linear_config(tmp_path, project))
    assert train.main(["-c", str(path), "optimizer.args.lr=-1"]) == 2
    assert capsys.readouterr().err == ("error: override 'optimizer.args.lr=-1': optimizer.args.lr: Adam refused its "
                                       "args: Invalid learning rate: -1\n")


def test_fine_tuning_applies_a_changed_lr_and_says_so(tmp_path, project, capsys):
    config = linear_config(tmp_path, project, epochs=1)
    config["lr_scheduler"] = {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}}
    run = train_run(tmp_path, "base", config)
    assert load(run / "checkpoint-epoch1.pth")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1.5e-3)
    assert train.main(["-r", str(run / "checkpoint-epoch1.pth"), "--run-id", "tuned", "--lr", "1e-4",
                       "lr_scheduler.args.gamma=0.1", "trainer.epochs=2", "--trust-checkpoint-config"]) == 0
    out = capsys.readouterr().out
    assert "Fine-tuning: optimizer.args.lr is 0.003 in the checkpoint, 0.0001 now: using 0.0001" in out
    assert "Fine-tuning: lr_scheduler.args.gamma is 0.5 in the checkpoint, 0.1 now: using 0.1" in out
    tuned = load(run_dir(tmp_path, "tuned", "blobs") / "checkpoint-epoch2.pth")
    assert tuned["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)  # 1e-4, then one step of gamma 0.1
    assert tuned["config"]["optimizer"]["args"]["lr"] == 1e-4


@pytest.mark.parametrize("scheduler, trainer_options, expected", [
    ({"type": "ReduceLROnPlateau", "args": {}}, {"monitor": "max val_f1"},
     "lr_scheduler.args.mode: is 'min' but trainer.monitor wants max val_f1: set mode: max, or name another metric "
     "in lr_scheduler.monitor"),
    ({"type": "ReduceLROnPlateau", "args": {}}, {"lr_step": "batch"},
     "trainer.lr_step: ReduceLROnPlateau steps on an epoch's metric: set lr_step: epoch"),
    ({"type": "ReduceLROnPlateau", "args": {}, "monitor": "val_f2"}, {},
     "lr_scheduler.monitor: 'val_f2' is not a produced metric (did you mean 'val_f1'?); choose from loss, "
     "float_accuracy, top1, f1, val_loss, val_float_accuracy, val_top1, val_f1"),
    ({"type": "OneCycleLR", "args": {"max_lr": 0.1, "total_steps": 100}}, {"lr_step": "batch"},
     "lr_scheduler.args.total_steps: OneCycleLR would run 100 steps but this run takes 12 (2 epochs x 6 optimizer steps); "
     "set total_steps: auto"),
], ids=["plateau-mode", "plateau-per-batch", "plateau-monitor", "one-cycle-length"])
def test_scheduler_checks_before_anything_is_written(tmp_path, project, capsys, scheduler, trainer_options,
                                                     expected):
    config = linear_config(tmp_path, project, **trainer_options)
    config["lr_scheduler"] = scheduler
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert files_under(tmp_path) == sorted([project, path])


def test_plateau_follows_its_own_monitor_and_one_cycle_total_steps_auto(tmp_path, project, capsys):
    config = linear_config(tmp_path, project, monitor="max val_f1", lr_step="batch")
    config["lr_scheduler"] = {"type": "OneCycleLR", "args": {"max_lr": 0.01, "total_steps": "auto"}}
    run = train_run(tmp_path, "cycle", config)
    final = load(run / "checkpoint-epoch2.pth")
    assert final["config"]["lr_scheduler"]["args"]["total_steps"] == "auto", "computed again by a resume"
    assert final["lr_scheduler"]["total_steps"] == 12 and final["lr_scheduler"]["last_epoch"] == 12
    config = linear_config(tmp_path, project, monitor="max val_f1")
    config["lr_scheduler"] = {"type": "ReduceLROnPlateau", "args": {"mode": "min", "patience": 0}, "monitor": "loss"}
    run = train_run(tmp_path, "plateau", config)
    final = load(run / "checkpoint-epoch2.pth")
    assert final["config"]["lr_scheduler"]["monitor"] == "loss" and final["lr_scheduler"]["mode"] == "min"
    config["lr_scheduler"] = {"type": "OneCycleLR", "args": {"max_lr": 0.01}}
    capsys.readouterr()
    train_run(tmp_path, "per-epoch", config)
    assert ("OneCycleLR is a per-batch schedule but trainer.lr_step is epoch: it will step 2 times, once per "
            "epoch; set trainer.lr_step: batch") in capsys.readouterr().out


def test_yaml_off_is_accepted_for_monitor(tmp_path):
    path = tmp_path / "off.yaml"
    config = copy.deepcopy(tiny_config(tmp_path))
    config["trainer"]["monitor"] = "OFF_PLACEHOLDER"
    import yaml
    path.write_text(yaml.safe_dump(config).replace("OFF_PLACEHOLDER", "off"))
    assert yaml.safe_load(path.read_text())["trainer"]["monitor"] is False
    assert parse_args(["-c", str(path)], train.lookups())[0].trainer["monitor"] is False
    assert train.main(["-c", str(path), "--run-id", "off"]) == 0
    assert not (run_dir(tmp_path, "off") / "model_best.pth").exists()


def test_verbosity_reaches_the_projects_loggers_only(tmp_path):
    assert train.main(["-c", str(write_config(tmp_path, tiny_config(tmp_path, epochs=1, verbosity=2)))]) == 0
    assert logging.getLogger("train").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("base.base_trainer").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("PIL.PngImagePlugin").getEffectiveLevel() == logging.WARNING


def test_model_file_imports_its_sibling_module(tmp_path):
    (tmp_path / "layers.py").write_text("import torch\nclass Block(torch.nn.Linear):\n    pass\n")
    (tmp_path / "net.py").write_text("import torch\nfrom layers import Block\n\nclass Net(torch.nn.Module):\n"
                                     "    def __init__(self):\n        super().__init__()\n"
                                     "        self.fc = Block(784, 10)\n\n    def forward(self, x):\n"
                                     "        return torch.log_softmax(self.fc(x.flatten(1)), 1)\n")
    run = tmp_path / "saved/models/tiny/sib"
    assert train.main(["-c", str(write_config(tmp_path, tiny_config(tmp_path, epochs=1))), "--run-id", "sib",
                       f"arch.type={tmp_path}/net.py:Net"]) == 0
    checkpoint = run / "checkpoint-epoch1.pth"
    assert test_script.main(["-r", str(checkpoint)]) == 2, "a checkpoint's .py file is refused"
    assert test_script.main(["-r", str(checkpoint), f"arch.type={tmp_path}/net.py:Net"]) == 0, "the suggested fix"


def test_project_loss_class_and_loader_are_accepted_from_its_own_checkpoint(tmp_path, monkeypatch):
    import model.loss

    class LabelSmoothedNLL(torch.nn.Module):
        def __init__(self, smoothing=0.0):
            super().__init__()
            self.smoothing = smoothing

        def forward(self, output, target):
            return (1 - self.smoothing) * torch.nn.functional.nll_loss(output, target) - self.smoothing * output.mean()

    LabelSmoothedNLL.__module__ = "model.loss"
    monkeypatch.setattr(model.loss, "LabelSmoothedNLL", LabelSmoothedNLL, raising=False)
    config = tiny_config(tmp_path, epochs=1)
    config["loss"] = {"type": "LabelSmoothedNLL", "args": {"smoothing": 0.1}}
    run = train_run(tmp_path, "own", config)
    assert test_script.main(["-r", str(run / "checkpoint-epoch1.pth")]) == 0


def test_an_ended_run_always_leaves_its_final_state_in_checkpoint_last(tmp_path):
    run = train_run(tmp_path, "last", tiny_config(tmp_path, epochs=3, save_period=2))
    assert sorted(p.name for p in run.glob("*.pth")) == ["checkpoint-epoch2.pth", "checkpoint-last.pth",
                                                         "model_best.pth"]
    assert load(run / "checkpoint-last.pth")["epoch"] == 3



def test_an_exception_in_a_metric_shows_its_line(tmp_path, project, capsys):
    (tmp_path / "bad_metric.py").write_text("def recall(output, target):\n    return output.sum() / (target.sum() * 0)"
                                            " if False else undefined_name\n")
    config = linear_config(tmp_path, project)
    config["metrics"] = [f"{tmp_path}/bad_metric.py:recall"]
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "m"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: NameError: name 'undefined_name' is not defined"
    assert f'  File "{tmp_path}/bad_metric.py", line 2, in recall' in err
