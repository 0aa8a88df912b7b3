"""Projects of every shape: a model with an unused branch, a GAN with two optimizers under 16-mixed, a multi-term
loss, a loss object in model/loss.py, a project base class, optimizers over submodules, the keys of
pytorch-template's GAN forks, and the advice of every refusal followed to the letter."""

import csv
import re
import shutil
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import model.loss
import test as test_script
import train
import trainer.options
from base.checkpointer import Checkpointer
from conftest import DATA_DIR, ROOT, assert_same_training_state, load, run_dir, tiny_config, write_config
from parse_config import parse_args
from parse_config.options import Option

BRANCHY = """import torch
import torch.nn.functional as F
from torch import nn


class Branchy(nn.Module):
    def __init__(self, auxiliary=False):
        super().__init__()
        self.use_auxiliary = auxiliary
        self.body = nn.Linear(784, 10)
        self.auxiliary = nn.Linear(784, 10)  # a head the forward skips unless asked: it never gets a gradient

    def forward(self, x):
        x = x.flatten(1)
        return F.log_softmax(self.body(x) + (self.auxiliary(x) if self.use_auxiliary else 0), dim=1)
"""


def _keep_copy_at(step, monkeypatch, name="mid.pth"):
    """Make the checkpointer keep a copy of checkpoint-last.pth as it was at optimizer step `step`."""
    save_step = Checkpointer.maybe_save_step

    def save_and_copy(self, make_state, global_step):
        save_step(self, make_state, global_step)
        if global_step == step:
            self.flush()  # written on a thread
            shutil.copy(self.run_dir / "checkpoint-last.pth", self.run_dir / name)

    monkeypatch.setattr(Checkpointer, "maybe_save_step", save_and_copy)


def _train(tmp_path, run_id, config, *overrides):
    path = write_config(tmp_path, config, f"{run_id}.yaml")
    assert train.main(["-c", str(path), "--run-id", run_id, *overrides]) == 0
    return run_dir(tmp_path, run_id, config["name"])


def test_a_model_with_an_unused_branch_resumes_exactly_and_fine_tunes(tmp_path, monkeypatch, capsys):
    (tmp_path / "branchy.py").write_text(BRANCHY)
    config = tiny_config(tmp_path, epochs=3, save_every_steps=13)
    config["arch"] = {"type": f"{tmp_path}/branchy.py:Branchy", "args": {}}
    _keep_copy_at(13, monkeypatch)
    reference = _train(tmp_path, "reference", config)
    mid = load(reference / "mid.pth")
    assert (mid["epoch"], mid["batches_in_epoch"]) == (1, 5)
    assert len(mid["optimizer"]["state"]) == 2, "Adam keeps no state for the auxiliary head: normal, not damage"
    assert train.main(["-r", str(reference / "mid.pth"), "--run-id", "resumed", "--trust-checkpoint-config"]) == 0
    assert_same_training_state(load(reference / "checkpoint-epoch3.pth"),
                               load(run_dir(tmp_path, "resumed") / "checkpoint-epoch3.pth"))
    tuned = write_config(tmp_path, {"optimizer": {"type": "Adam", "args": {"lr": 1e-4}}, "trainer": {"epochs": 4}},
                         "tune.yaml")
    capsys.readouterr()
    assert train.main(["-r", str(reference / "checkpoint-epoch3.pth"), "-c", str(tuned), "--run-id", "tuned",
                       "--trust-checkpoint-config"]) == 0
    assert "Fine-tuning: optimizer.args.lr is 0.003 in the checkpoint, 0.0001 now" in capsys.readouterr().out
    tuned_groups = load(run_dir(tmp_path, "tuned") / "checkpoint-epoch4.pth")["optimizer"]["param_groups"]
    assert tuned_groups[0]["lr"] == 5e-5, "the new lr, halved once by the restored StepLR"


def _gan_config(tmp_path, **trainer):
    config = yaml.safe_load((ROOT / "configs/mnist_gan.yaml").read_text())
    config["models"]["generator"]["args"]["width"] = 8
    config["models"]["discriminator"]["args"]["width"] = 8
    config["data_loader"]["args"].update(data_dir=DATA_DIR, batch_size=32, limit=256, num_workers=0)
    config["trainer"].update({"save_dir": str(tmp_path / "saved"), "epochs": 2, "progress_bar": False, "verbosity": 1,
                              **trainer})
    config["n_gpu"] = 0
    return config


def test_gan_example_resumes_bit_identically_mid_epoch_under_16_mixed(tmp_path, monkeypatch):
    config = _gan_config(tmp_path, epochs=3, precision="16-mixed", save_every_steps=13)
    _keep_copy_at(13, monkeypatch)
    reference = _train(tmp_path, "gan", config)
    final = load(reference / "checkpoint-epoch3.pth")
    assert {"state_dict", "models.discriminator", "optimizers.generator", "optimizers.discriminator"} <= set(final)
    assert final["step"]["scaler"]["scale"] < 65536.0, "the one GradScaler met an fp16 overflow and backed off"
    assert train.main(["-r", str(reference / "mid.pth"), "--run-id", "resumed"]) == 0
    resumed = load(run_dir(tmp_path, "resumed", "Mnist_DCGAN") / "checkpoint-epoch3.pth")
    for part in ("state_dict", "models.discriminator"):
        assert all(torch.equal(resumed[part][key], value) for key, value in final[part].items()), part
    for part in ("optimizers.generator", "optimizers.discriminator"):
        for index, state in final[part]["state"].items():
            assert all(torch.equal(resumed[part]["state"][index][k], v) for k, v in state.items()), part
    assert resumed["step"] == final["step"] and resumed["global_step"] == final["global_step"] == 24
    with open(tmp_path / "saved/log/Mnist_DCGAN/gan/metrics.csv") as file:
        tags = {row["tag"] for row in csv.DictReader(file)}
    assert {"train/loss_d", "train/loss_g", "epoch/loss_d", "epoch/loss_g", "epoch/lr_generator"} <= tags


def test_gan_writes_samples_and_test_py_evaluates_it(tmp_path, capsys):
    reference = _train(tmp_path, "gan", _gan_config(tmp_path, tensorboard=True))
    events = next((tmp_path / "saved/log/Mnist_DCGAN/gan").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert [image.step for image in accumulator.Images("samples")] == [8, 16], "a grid of samples every epoch"
    out = capsys.readouterr().out
    assert re.search(r"model    generator Generator [\d,]+, discriminator Discriminator [\d,]+ parameters \(all "
                     r"trainable\)\n", out)
    assert "test      python test.py --resume saved/models/Mnist_DCGAN/gan/checkpoint-last.pth" in out
    assert test_script.main(["-r", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint  epoch 2, step 16, trained weights" in out and "loss_d" in out and "loss_g" in out


MULTI_TERM = """import torch.nn.functional as F


def nll_with_l2(output, target):
    nll = F.nll_loss(output, target)
    l2 = output.exp().pow(2).mean()
    return {"loss": nll + 0.1 * l2, "nll": nll, "l2": l2}


nll_with_l2.terms = ("nll", "l2")


def total_only(output, target):
    return nll_with_l2(output, target)["loss"]
"""


def test_a_multi_term_loss_logs_each_term_and_steps_on_the_total(tmp_path):
    (tmp_path / "losses.py").write_text(MULTI_TERM)
    config = tiny_config(tmp_path, monitor="min val_nll")
    config["loss"] = f"{tmp_path}/losses.py:nll_with_l2"
    terms = _train(tmp_path, "terms", config)
    config["loss"], config["trainer"]["monitor"] = f"{tmp_path}/losses.py:total_only", "min val_loss"
    total = _train(tmp_path, "total", config)
    a, b = load(terms / "checkpoint-last.pth"), load(total / "checkpoint-last.pth")
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    with open(tmp_path / "saved/log/tiny/terms/metrics.csv") as file:
        tags = {row["tag"] for row in csv.DictReader(file)}
    assert {"epoch/loss", "epoch/nll", "epoch/l2", "epoch/val_nll", "epoch/val_l2"} <= tags
    assert a["monitor_best"] < 2.5, "the monitor follows val_nll"


class LabelSmoothedNLL(torch.nn.Module):
    def __init__(self, smoothing):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, output, target):
        return (1 - self.smoothing) * torch.nn.functional.nll_loss(output, target) - self.smoothing * output.mean()


def test_a_loss_object_in_model_loss_resumes_and_tests_from_its_own_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(model.loss, "smoothed_nll", LabelSmoothedNLL(0.1), raising=False)
    config = tiny_config(tmp_path, epochs=1)
    config["loss"] = "smoothed_nll"
    run = _train(tmp_path, "object", config)
    assert train.main(["-r", str(run), "trainer.epochs=2"]) == 0
    assert test_script.main(["-r", str(run)]) == 0


def test_an_object_imported_into_a_project_module_stays_refused(tmp_path, capsys):
    """Trust by where an object is defined, not by where a name finds it: model.model imports torch."""
    config = tiny_config(tmp_path, epochs=1)
    run = _train(tmp_path, "honest", config)
    state = load(run / "checkpoint-epoch1.pth")
    state["config"]["loss"] = "model.model.torch.load"
    from conftest import save_consistent

    evil = save_consistent(state, tmp_path / "evil.pth")
    capsys.readouterr()
    assert test_script.main(["-r", str(evil)]) == 2
    assert "'model.model.torch.load' (defined in 'torch.serialization') may not be named" in capsys.readouterr().err


BASES = {
    "backbones.py": "import torch\nfrom torch import nn\n\n\nclass BaseBackbone(nn.Module):\n"
                    "    def features(self, x):\n        return x.flatten(1)\n",
    "nets.py": "import torch.nn.functional as F\nfrom torch import nn\n\nfrom backbones import BaseBackbone\n\n\n"
               "class Net(BaseBackbone):\n    def __init__(self):\n        super().__init__()\n"
               "        self.body = nn.Linear(784, 10)\n        self.head = nn.Linear(10, 10)\n\n"
               "    def forward(self, x):\n        return F.log_softmax(self.head(self.body(self.features(x))), dim=1)\n",
}


def test_a_project_base_class_and_optimizers_over_submodules(tmp_path, capsys):
    for name, text in BASES.items():
        (tmp_path / name).write_text(text)
    config = tiny_config(tmp_path, epochs=1)
    config["arch"], config["lr_scheduler"] = {"type": f"{tmp_path}/nets.py:Net", "args": {}}, None
    config["optimizer"] = {"type": "SGD", "args": {"lr": 0.1},
                           "param_groups": [{"module": "body", "lr": 0.01}, {"module": "head"}]}
    run = _train(tmp_path, "groups", config)
    groups = load(run / "checkpoint-last.pth")["optimizer"]["param_groups"]
    assert [(group["lr"], len(group["params"])) for group in groups] == [(0.01, 2), (0.1, 2)]
    assert test_script.main(["-r", str(run), "--trust-checkpoint-config"]) == 0
    config["optimizer"]["param_groups"][0]["module"] = "bdy"
    capsys.readouterr()
    assert train.main(["-c", str(write_config(tmp_path, config, "typo.yaml"))]) == 2
    assert capsys.readouterr().err.endswith(
        "optimizer.param_groups[0].module: Net has no submodule 'bdy' (did you mean 'body'?)\n")


def test_teacher_student_evaluates_the_named_model_and_checkpoints_both(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    del config["arch"], config["optimizer"]
    config["models"] = {"teacher": {"type": "MnistModel", "args": {}}, "student": {"type": "MnistModel"}}
    config["optimizers"] = {"student": {"type": "Adam", "args": {"lr": 1e-3}, "model": "student"}}
    config["lr_schedulers"] = {"student": config.pop("lr_scheduler")}
    config["eval_model"] = "student"
    run = _train(tmp_path, "distil", config)
    state = load(run / "checkpoint-last.pth")
    assert {"state_dict", "models.teacher", "optimizers.student", "lr_schedulers.student"} <= set(state)
    assert test_script.main(["-r", str(run)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_gan_fork_keys_are_mapped_or_refused_with_the_form_to_write(tmp_path, capsys):
    config = _gan_config(tmp_path, epochs=1)
    fork = {key: value for key, value in config.items() if key not in ("models", "optimizers", "losses")}
    fork.update(generator_arch=config["models"]["generator"], discriminator_arch=config["models"]["discriminator"],
                generator_optimizer=config["optimizers"]["generator"], adversarial_loss="BCEWithLogitsLoss",
                train_data_loader=fork.pop("data_loader"))
    fork["discriminator_optimizer"] = {k: v for k, v in config["optimizers"]["discriminator"].items() if k != "model"}
    parsed, request = parse_args(["-c", str(write_config(tmp_path, fork))], train.lookups())
    assert set(parsed["models"]) == {"generator", "discriminator"} and parsed["losses"] == {
        "adversarial": "BCEWithLogitsLoss"}
    assert any("'generator_arch' is a GAN fork's key: read as 'models.generator'" in n for n in request.notices)
    assert any("'train_data_loader' is a GAN fork's key: read as 'data_loader'" in n for n in request.notices)
    assert train.main(["-c", str(write_config(tmp_path, fork)), "--run-id", "fork"]) == 0
    beside = {**tiny_config(tmp_path), "teacher_arch": {"type": "MnistModel"}}
    path = write_config(tmp_path, beside, "beside.yaml")
    capsys.readouterr()
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: teacher_arch: a second arch beside 'arch': name both under models, e.g. models: "
        "{main: <your arch section>, teacher: <your teacher_arch section>}\n")


def test_a_key_near_a_framework_key_can_be_kept_as_the_error_says(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, {**tiny_config(tmp_path, epochs=1), "metric": "f1"})
    assert train.main(["-c", str(path), "--run-id", "a"]) == 2
    assert capsys.readouterr().err == (f"error: {path}: metric: unknown top-level key (did you mean 'metrics'?); "
                                       "if 'metric' is your own key, declare it in trainer/options.py\n")
    monkeypatch.setattr(trainer.options, "PROJECT_OPTIONS", {"metric": Option(lambda v: None, "f1", "my metric")})
    assert train.main(["-c", str(path), "--run-id", "b"]) == 0


EXTERNAL = "import torch.nn.functional as F\n\n\ndef nll(output, target):\n    return F.nll_loss(output, target)\n"


def test_every_refusal_advice_works(tmp_path, monkeypatch, capsys):
    (tmp_path / "external_losses.py").write_text(EXTERNAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "branchy.py").write_text(BRANCHY)
    config = tiny_config(tmp_path, epochs=1)
    config["arch"], config["loss"] = {"type": f"{tmp_path}/branchy.py:Branchy"}, "external_losses.nll"
    run = _train(tmp_path, "external", config)
    checkpoint = str(run / "checkpoint-epoch1.pth")
    capsys.readouterr()
    assert train.main(["-r", checkpoint, "trainer.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "is a Python file named by a checkpoint's config: refused" in err
    assert f"pass the same type on the command line (e.g. arch.type={tmp_path}/branchy.py:Branchy)" in err
    named = f"arch.type={tmp_path}/branchy.py:Branchy"
    assert train.main(["-r", checkpoint, named, "trainer.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "'external_losses.nll' is outside the project" in err and "list its package under `imports:`" in err
    imports = write_config(tmp_path, {"imports": ["external_losses"]}, "imports.yaml")
    assert train.main(["-r", checkpoint, "-c", str(imports), named, "trainer.epochs=2"]) == 0
    assert test_script.main(["-r", checkpoint, "--trust-checkpoint-config"]) == 0


def test_test_py_takes_the_best_checkpoint_of_a_run_and_has_its_own_help(tmp_path, capsys):
    run = _train(tmp_path, "best", tiny_config(tmp_path, epochs=2))
    capsys.readouterr()
    assert test_script.main(["-r", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Test tiny: saved/models/tiny/best/model_best.pth\n  checkpoint  epoch ")
    assert "  data        data_loader with training=False: test " in out
    with pytest.raises(SystemExit):
        test_script.main(["--help"])
    help_text = capsys.readouterr().out
    assert "--lr" not in help_text and "trainer options" not in help_text
    assert "-r takes a checkpoint file, or a run directory: its model_best.pth" in help_text


def test_the_summary_says_how_to_test_a_project_without_test_data(tmp_path, capsys):
    (tmp_path / "data.py").write_text("import torch\nfrom torch.utils.data import Dataset\n\n\n"
                                      "class Blobs(Dataset):\n    def __init__(self, size=64):\n"
                                      "        g = torch.Generator().manual_seed(0)\n"
                                      "        self.x, self.y = torch.randn(size, 784, generator=g), "
                                      "torch.randint(0, 10, (size,), generator=g)\n\n"
                                      "    def __len__(self):\n        return len(self.y)\n\n"
                                      "    def __getitem__(self, i):\n        return self.x[i], self.y[i]\n")
    config = tiny_config(tmp_path, epochs=1, monitor="off")
    config["data_loader"] = {"type": f"{tmp_path}/data.py:Blobs", "args": {"batch_size": 16, "num_workers": 0}}
    (tmp_path / "branchy.py").write_text(BRANCHY)
    config["arch"] = {"type": f"{tmp_path}/branchy.py:Branchy"}
    _train(tmp_path, "no_test", config)
    assert ("  test      python test.py --resume saved/models/tiny/no_test/checkpoint-last.pth "
            "--trust-checkpoint-config -c test.yaml  (this config has no test data: give test.yaml a "
            "test_data_loader section)") in capsys.readouterr().out





WEIGHTED = """import torch
from torch import nn
from torch.utils.data import Dataset


class Unbalanced(Dataset):
    \"\"\"Blobs of three classes in 784 dimensions, class 0 four times as common as the others.\"\"\"

    classes = ["common", "rare", "rarer"]

    def __init__(self, size=192, training=True):
        generator = torch.Generator().manual_seed(size + training)
        self.targets = torch.tensor([0, 0, 0, 0, 1, 2] * (size // 6))
        self.data = torch.randn(len(self.targets), 784, generator=generator) + self.targets[:, None] * 0.3

    def class_weights(self):
        counts = torch.bincount(self.targets, minlength=len(self.classes)).float()
        return counts.sum() / (len(counts) * counts)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], self.targets[index]


class Net(nn.Module):
    def __init__(self, num_classes, device):
        super().__init__()
        self.built_on = str(device)
        self.body = nn.Linear(784, num_classes)

    def forward(self, x):
        return self.body(x)
"""


def _weighted_config(tmp_path, **trainer):
    (tmp_path / "weighted.py").write_text(WEIGHTED)
    config = tiny_config(tmp_path, **trainer)
    config["data_loader"] = {"type": f"{tmp_path}/weighted.py:Unbalanced",
                             "args": {"batch_size": 32, "validation_split": 48, "num_workers": 0}}
    config["arch"] = {"type": f"{tmp_path}/weighted.py:Net",
                      "args": {"num_classes": "${len:dataset.classes}", "device": "${device}"}}
    config["loss"] = {"type": "CrossEntropyLoss", "args": {"weight": "${dataset.class_weights()}"}}
    return config


def test_run_time_arguments_come_from_built_objects_and_are_rebuilt_on_resume(tmp_path, monkeypatch):
    _keep_copy_at(6, monkeypatch)
    run = _train(tmp_path, "weighted", _weighted_config(tmp_path, epochs=3, save_every_steps=6))
    references = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["references"]
    assert references == {"arch.args.num_classes": 3, "arch.args.device": "<device>",
                          "loss.args.weight": "Tensor[3] torch.float32: [0.5, 2.0, 2.0]"}
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["args"]["weight"] == "${dataset.class_weights()}"
    final = load(run / "checkpoint-epoch3.pth")
    assert final["state_dict"]["body.weight"].shape == (3, 784)
    assert train.main(["-r", str(run / "mid.pth"), "--run-id", "resumed", "--trust-checkpoint-config"]) == 0
    assert_same_training_state(final, load(run_dir(tmp_path, "resumed") / "checkpoint-epoch3.pth"))
    assert test_script.main(["-r", str(run), "--trust-checkpoint-config"]) == 0


@pytest.mark.parametrize("where, value, expected", [
    ("loss", "${datset.class_weights()}", "loss.args.weight: ${datset.class_weights()}: 'datset' is not built "
     "before this section (did you mean 'dataset'?); it may refer to device, data_loader, dataset, "
     "valid_data_loader, model, models"),
    ("data", "${model.body}", "data_loader.args.batch_size: ${model.body}: 'model' is not built before this "
     "section; it may refer to device"),
    ("loss", "${dataset.class_weight()}", "loss.args.weight: ${dataset.class_weight()}: dataset (Unbalanced) has "
     "no attribute 'class_weight' (did you mean 'class_weights'?)"),
    ("loss", "${dataset.}", "loss.args.weight: '${dataset.}' is not a reference: write ${root.attribute}, "
     "${len:root.attribute} or ${root.method()}"),
], ids=["unknown-root", "not-built-yet", "no-attribute", "malformed"])
def test_a_bad_reference_is_one_line_before_anything_is_written(tmp_path, capsys, where, value, expected):
    config = _weighted_config(tmp_path, epochs=1)
    if where == "loss":
        config["loss"]["args"]["weight"] = value
    else:
        config["data_loader"]["args"]["batch_size"] = value
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert not (tmp_path / "saved").exists()





def _shape(tmp_path, shape, monkeypatch):
    """A config of one project shape, its files written into tmp_path, trust-needing or not."""
    config = tiny_config(tmp_path, epochs=3)
    if shape == "unused-branch":
        (tmp_path / "branchy.py").write_text(BRANCHY)
        config["arch"] = {"type": f"{tmp_path}/branchy.py:Branchy", "args": {}}
        config["trainer"]["find_unused_parameters"] = True
    elif shape == "gan-16-mixed":
        config = _gan_config(tmp_path, epochs=3, precision="16-mixed")
    elif shape == "class-weights":
        config = _weighted_config(tmp_path, epochs=3)
    elif shape == "multi-term-loss":
        (tmp_path / "losses.py").write_text(MULTI_TERM)
        config["loss"] = f"{tmp_path}/losses.py:nll_with_l2"
    elif shape == "loss-object":
        monkeypatch.setattr(model.loss, "smoothed_nll", LabelSmoothedNLL(0.1), raising=False)
        config["loss"] = "smoothed_nll"
    elif shape == "base-class":
        for name, text in BASES.items():
            (tmp_path / name).write_text(text)
        config["arch"] = {"type": f"{tmp_path}/nets.py:Net", "args": {}}
    return config


SHAPES = ["unused-branch", "gan-16-mixed", "class-weights", "multi-term-loss", "loss-object", "base-class"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_trains_resumes_mid_epoch_fine_tunes_and_tests(tmp_path, monkeypatch, shape):
    config = _shape(tmp_path, shape, monkeypatch)
    config["trainer"]["save_every_steps"] = 13 if shape != "class-weights" else 6
    _keep_copy_at(config["trainer"]["save_every_steps"], monkeypatch)
    run = _train(tmp_path, "run", config)
    trust = ["--trust-checkpoint-config"]
    assert train.main(["-r", str(run / "mid.pth"), "--run-id", "resumed", *trust]) == 0
    resumed = run_dir(tmp_path, "resumed", config["name"]) / "checkpoint-epoch3.pth"
    final, again = load(run / "checkpoint-epoch3.pth"), load(resumed)
    for part in [key for key in final if key == "state_dict" or key.startswith(("models.", "optimizer"))]:
        flat = final[part]["state"] if part.startswith("optimizer") else final[part]
        other = again[part]["state"] if part.startswith("optimizer") else again[part]
        assert torch.equal(torch.cat([v.flatten().float() for v in _tensors(flat)]),
                           torch.cat([v.flatten().float() for v in _tensors(other)])), part
    assert final["step"] == again["step"] and final["global_step"] == again["global_step"]
    optimizer = "optimizers" if "optimizers" in config else "optimizer"
    section = config[optimizer]["generator"] if optimizer == "optimizers" else config[optimizer]
    tune = {optimizer: {"generator": {**section, "args": {**section["args"], "lr": 1e-4}}} if optimizer == "optimizers"
            else {**section, "args": {**section["args"], "lr": 1e-4}}, "trainer": {"epochs": 4}}
    assert train.main(["-r", str(resumed), "-c", str(write_config(tmp_path, tune, "tune.yaml")), "--run-id",
                       "tuned", *trust]) == 0
    assert test_script.main(["-r", str(run_dir(tmp_path, "tuned", config["name"])), *trust]) == 0


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for key in sorted(value, key=str) for tensor in _tensors(value[key])]
    return []


# shapes whose resume differs under DDP: several DDP models and optimizers with a GradScaler, DDP's unused
# parameters, loss terms every rank adds to its metrics
RESUMED_UNDER_TORCHRUN = {"gan-16-mixed", "unused-branch", "multi-term-loss"}


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_under_torchrun_trains_resumes_and_tests(tmp_path, monkeypatch, shape):
    import subprocess

    if shape == "loss-object":  # a loss object the project defines: in model/loss.py of a copy of the template
        import new_project

        assert new_project.main([str(tmp_path / "project")]) == 0
        root = tmp_path / "project"
        with open(root / "model/loss.py", "a") as file:
            file.write("\n\nsmoothed_nll = torch.nn.NLLLoss()  # an object the project defines\n")
        config = tiny_config(tmp_path, epochs=2)
        config["loss"] = "smoothed_nll"
    else:
        root, config = ROOT, _shape(tmp_path, shape, monkeypatch)
        config["trainer"]["epochs"] = 2
    config["n_gpu"] = 0
    path = write_config(tmp_path, config)

    def torchrun(script, *args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(root / script), *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    first = torchrun("train.py", "-c", str(path), "--run-id", "ddp")
    assert first.returncode == 0, first.stderr
    reference = run_dir(tmp_path, "ddp", config["name"])
    if shape not in RESUMED_UNDER_TORCHRUN:  # its resume is the default shape's (test_distributed.py)
        final = load(reference / "checkpoint-epoch2.pth")
        assert final["world_size"] == 2 and len(final["rng_per_rank"]) == 2
        assert all(torch.isfinite(value).all() for value in final["state_dict"].values())
        return
    resumed = torchrun("train.py", "-r", str(reference / "checkpoint-epoch1.pth"), "--run-id", "again",
                       "--trust-checkpoint-config")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load(reference / "checkpoint-epoch2.pth"), load(run_dir(tmp_path, "again", config["name"]) /
                                                             "checkpoint-epoch2.pth")
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    if shape == "gan-16-mixed":  # test.py under torchrun with several models (one model: test_distributed.py)
        tested = torchrun("test.py", "-r", str(reference), "--trust-checkpoint-config")
        assert tested.returncode == 0, tested.stderr


def test_a_private_name_refused_from_a_checkpoint_is_allowed_when_named_yourself(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model.loss, "_private_nll", model.loss.nll_loss, raising=False)
    config = tiny_config(tmp_path, epochs=1)
    config["loss"] = "model.loss._private_nll"
    run = _train(tmp_path, "private", config)
    capsys.readouterr()
    assert train.main(["-r", str(run), "trainer.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "names a private attribute: refused" in err and "name the type yourself in your own -c config" in err
    assert train.main(["-r", str(run), "loss=model.loss._private_nll", "trainer.epochs=2"]) == 0
