"""The training core: an end-to-end run on the bundled digits, determinism, schedulers, logging, test.py."""
import json
import math
import os

import pytest
import torch
import torchvision
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import new_project
import test as test_script
import train
from base import BaseDataLoader, BaseModel
from base.base_model import init_weights
from conftest import DATA_DIR, assert_same_training_state, load, run_dir, tiny_config, write_config
from data_loader.data_loaders import DEFAULT_TRANSFORMS
from model.metric import accuracy, top_k_acc
from model.model import MnistModel
from parse_config.loaders import compose_transforms as build_transforms
from utils import device as device_utils


def train_run(tmp_path, run_id, config=None, *overrides):
    path = write_config(tmp_path, config or tiny_config(tmp_path), f"{run_id}.yaml")
    assert train.main(["-c", str(path), "--run-id", run_id, *overrides]) == 0
    return run_dir(tmp_path, run_id)


@pytest.mark.slow
def test_end_to_end_on_bundled_digits(tmp_path, capsys):
    config = tiny_config(tmp_path, tensorboard=True, log_step=5)
    config["data_loader"]["args"].update(limit=2000, validation_split=0.2)
    run = train_run(tmp_path, "e2e", config)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoint-epoch1.pth", "checkpoint-epoch2.pth",
                                                "model_best.pth"}
    best = load(run / "model_best.pth")
    assert best["monitor_best"] < 1.0 and best["epoch"] == 2
    written = yaml.safe_load((run / "config.yaml").read_text())
    resolved = written.pop("resolved")
    assert resolved == {"device": "cpu", "precision": "32", "channels_last": False, "background_saves": False,
                        "reuse_host_memory": True,
                        **{key: {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
                                            for key in ("data_loader", "valid_data_loader")}}
    assert written["data_loader"]["args"]["num_workers"] == 0, "what was asked stays next to what it resolved to"
    assert written == best["config"] and written["trainer"]["log_step"] == 5 and written["trainer"]["keep_last"] == 0
    summary = capsys.readouterr().out
    last_epoch = [line for line in summary.splitlines() if line.startswith("epoch 2/2  ")][0]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert f"  {key} " in last_epoch
    val_accuracy = float(last_epoch.split("  val_accuracy ")[-1].split()[0])
    assert val_accuracy > 0.7, "chance is 0.1"

    log_dir = tmp_path / "saved" / "log" / "tiny" / "e2e"
    assert "val_accuracy" in (log_dir / "info.log").read_text()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    epoch_tags = {"lr", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", *(f"epoch/{tag}" for tag in epoch_tags),
                                             *(f"hparams/{kind}/{tag}" for tag in epoch_tags for kind in ("last", "best")),
                                             "hparams/last/epoch", "hparams/best/epoch"}
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 101, 5))

    assert test_script.main(["-r", str(run / "model_best.pth")]) == 0
    results = json.loads((run / "model_best.test.json").read_text())
    assert results["accuracy"] == pytest.approx(_direct_test_accuracy(best["state_dict"]), abs=1e-6)


def _direct_test_accuracy(state_dict):
    """Plain torch, none of our code: the fraction of the 1,000 bundled test digits predicted right."""
    model = MnistModel()
    model.load_state_dict(state_dict)
    model.eval()
    dataset = torchvision.datasets.MNIST(DATA_DIR, train=False, transform=build_transforms(DEFAULT_TRANSFORMS))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_same_config_and_seed_give_bit_identical_weights(tmp_path):
    first = load(train_run(tmp_path, "a") / "checkpoint-epoch2.pth")
    second = load(train_run(tmp_path, "b") / "checkpoint-epoch2.pth")
    assert_same_training_state(first, second)
    third = load(train_run(tmp_path, "c", None, "seed=8") / "checkpoint-epoch2.pth")
    assert not torch.equal(first["state_dict"]["fc1.weight"], third["state_dict"]["fc1.weight"])


def test_lr_scheduler_per_epoch_and_per_batch(tmp_path):
    per_epoch = load(train_run(tmp_path, "epoch") / "checkpoint-epoch2.pth")
    assert per_epoch["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 * 0.5**2)
    config = tiny_config(tmp_path, lr_step="batch")
    config["lr_scheduler"]["args"]["gamma"] = 0.9
    per_batch = load(train_run(tmp_path, "batch", config) / "checkpoint-epoch2.pth")
    assert per_batch["global_step"] == 16
    assert per_batch["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 * 0.9**16)


def test_reduce_lr_on_plateau_follows_the_monitored_metric(tmp_path):
    config = tiny_config(tmp_path, monitor="max val_accuracy")
    config["lr_scheduler"] = {"type": "ReduceLROnPlateau", "args": {"mode": "max", "patience": 0, "threshold": 0}}
    checkpoint = load(train_run(tmp_path, "plateau", config) / "checkpoint-epoch2.pth")
    assert checkpoint["lr_scheduler"]["best"] == checkpoint["monitor_best"]


def test_iteration_based_epochs(tmp_path):
    checkpoint = load(train_run(tmp_path, "len", tiny_config(tmp_path, len_epoch=3, epochs=4)) /
                      "checkpoint-epoch4.pth")
    assert checkpoint["global_step"] == 12
    assert checkpoint["data_order"] == {"pass": 1, "batches_done": 4}


def test_early_stop_and_keep_last(tmp_path):
    run = train_run(tmp_path, "keep", tiny_config(tmp_path, epochs=4, keep_last=2))
    assert sorted(p.name for p in run.glob("*.pth")) == ["checkpoint-epoch3.pth", "checkpoint-epoch4.pth",
                                                         "checkpoint-last.pth", "model_best.pth"]
    stopped = train_run(tmp_path, "early", tiny_config(tmp_path, epochs=6, monitor="max loss", early_stop=1))
    assert max(int(p.stem.split("epoch")[1]) for p in stopped.glob("checkpoint-epoch*.pth")) == 2


def test_a_checkpoint_is_deleted_only_while_a_kept_one_is_durable(tmp_path, monkeypatch):
    from pathlib import Path

    import base.checkpointer
    events, durable, real_sync, real_unlink = [], set(), base.checkpointer.sync_directory, Path.unlink

    def sync(directory):
        durable.clear()
        durable.update(p.name for p in directory.glob("checkpoint-epoch*.pth"))
        events.append("sync")
        real_sync(directory)

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if path.name.startswith("checkpoint-epoch"):
            kept = {p.name for p in path.parent.glob("checkpoint-epoch*.pth")}
            assert kept & durable, f"{path.name} deleted while none of {sorted(kept)} is durable"
            events.append(path.name)

    monkeypatch.setattr(base.checkpointer, "sync_directory", sync)
    monkeypatch.setattr(Path, "unlink", unlink)
    train_run(tmp_path, "durable", tiny_config(tmp_path, epochs=7, keep_last=3, monitor="off"))
    assert events == ["sync", "checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "checkpoint-epoch3.pth",
                      "sync", "checkpoint-epoch4.pth"], "a directory sync every third deletion, not every one"


def test_tensorboard_images_and_histograms_when_asked(tmp_path):
    train_run(tmp_path, "tb", tiny_config(tmp_path, epochs=1, tensorboard=True, tensorboard_images=True,
                                          tensorboard_histograms=True))
    events = EventAccumulator(str(tmp_path / "saved/log/tiny/tb"))
    events.Reload()
    assert events.Tags()["images"] == ["input"]
    assert "fc1.weight" in events.Tags()["histograms"]


def test_resume_without_config_uses_the_checkpoints_and_fine_tuning_merges(tmp_path, capsys):
    run = train_run(tmp_path, "base", tiny_config(tmp_path, epochs=1))
    assert train.main(["-r", str(run / "checkpoint-epoch1.pth"), "trainer.epochs=2"]) == 0
    assert load(run / "checkpoint-epoch2.pth")["optimizer"]["state"], "resumed into its own run directory"
    finetune = write_config(tmp_path, {"optimizer": {"type": "SGD", "args": {"lr": 0.01}}, "trainer": {"epochs": 3}},
                            "finetune.yaml")
    assert train.main(["-r", str(run / "checkpoint-epoch2.pth"), "-c", str(finetune), "--run-id", "ft"]) == 0
    printed = capsys.readouterr()
    assert "optimizer type changed since the checkpoint: its state starts fresh" in printed.out + printed.err
    tuned = load(run_dir(tmp_path, "ft") / "checkpoint-epoch3.pth")
    assert tuned["config"]["optimizer"]["type"] == "SGD" and tuned["config"]["loss"] == "nll_loss"
    assert tuned["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5)  # StepLR kept, stepped once


def test_test_script_accepts_a_data_override(tmp_path, capsys):
    run = train_run(tmp_path, "t", tiny_config(tmp_path, epochs=1))
    override = write_config(tmp_path, {"data_loader": {"args": {"limit": 100, "batch_size": 50}}}, "data.yaml")
    assert test_script.main(["-r", str(run / "checkpoint-epoch1.pth"), "-c", str(override)]) == 0
    assert "accuracy" in json.loads((run / "checkpoint-epoch1.test.json").read_text())


def test_validation_split_is_seeded_and_off_the_global_rng():
    dataset = torch.utils.data.TensorDataset(torch.arange(100))
    first = BaseDataLoader(dataset, 10, validation_split=0.2, num_workers=0, seed=1)
    torch.manual_seed(999)
    again = BaseDataLoader(dataset, 10, validation_split=0.2, num_workers=0, seed=1)
    other = BaseDataLoader(dataset, 10, validation_split=20, num_workers=0, seed=2)
    assert first.valid_sampler.indices == again.valid_sampler.indices != other.valid_sampler.indices
    assert len(first.valid_sampler.indices) == 20 and first.n_samples == 80
    state = torch.get_rng_state()
    list(first)
    assert torch.equal(state, torch.get_rng_state()), "iterating must not consume the global RNG"


def test_loader_settings_follow_the_device(monkeypatch):
    monkeypatch.setattr(device_utils, "available_cpus", lambda: 16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_utils.resolve_num_workers("auto") == 2 and device_utils.resolve_num_workers(3) == 3
    assert device_utils.resolve_pin_memory("auto") is False
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_utils.resolve_num_workers("auto") == 8 and device_utils.resolve_pin_memory("auto") is True
    loader = BaseDataLoader(torch.utils.data.TensorDataset(torch.arange(8)), 4, num_workers=2, pin_memory=False)
    assert loader.persistent_workers and not loader.pin_memory


def test_model_printout_metrics_and_init():
    model = MnistModel()
    assert isinstance(model, BaseModel) and str(model).endswith("Trainable parameters: 21840")
    output = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    target = torch.tensor([2, 0])
    assert accuracy(output, target).item() == 0.5 and isinstance(accuracy(output, target), torch.Tensor)
    assert top_k_acc(output, target, k=2).item() == 1.0
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    torch.nn.init.constant_(net[1].weight, 5.0)
    init_weights(net, "xavier_uniform")
    assert torch.all(net[0].bias == 0) and torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)
    bound = math.sqrt(6 / (4 + 2))
    assert net[2].weight.abs().max() <= bound


def test_new_project_copies_without_git_saved_and_caches(tmp_path):
    target = tmp_path / "NewProject"
    assert new_project.main([str(target), "--with-data"]) == 0
    assert (target / "train.py").is_file() and (target / "data" / "mnist-5k" / "README.md").is_file()
    assert not (target / ".git").exists() and not (target / "saved").exists()
    assert not list(target.rglob("__pycache__"))


def test_pytorch_template_config_trains_and_configured_transforms_survive_the_checkpoint(tmp_path, capsys):
    from test_config import PYTORCH_TEMPLATE_CONFIG  # its config has no seed, no save_every_steps, ...

    config = {**PYTORCH_TEMPLATE_CONFIG, "trainer": {**PYTORCH_TEMPLATE_CONFIG["trainer"], "epochs": 1,
                                                     "save_dir": str(tmp_path / "saved"), "tensorboard": False}}
    config["data_loader"]["args"] = {**config["data_loader"]["args"], "num_workers": 0, "limit": 256,
                                     "transforms": [{"type": "RandomRotation", "args": {"degrees": 5}},
                                                    {"type": "ToTensor"}]}
    path = write_config(tmp_path, config, "template.json")
    assert train.main(["-c", str(path), "--run-id", "compat", "-d", "0"]) == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    checkpoint = tmp_path / "saved/models/Mnist_LeNet/compat/checkpoint-epoch1.pth"
    assert load(checkpoint)["config"]["seed"] == 123
    assert test_script.main(["-r", str(checkpoint)]) == 0, capsys.readouterr().err


def test_weight_init_from_config(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    config["arch"]["init"] = "orthogonal"
    config["optimizer"]["args"]["lr"] = 0.0
    weights = load(train_run(tmp_path, "init", config) / "checkpoint-epoch1.pth")["state_dict"]
    gram = weights["fc2.weight"] @ weights["fc2.weight"].T
    assert torch.allclose(gram, torch.eye(10), atol=1e-5) and torch.all(weights["fc2.bias"] == 0)


class _RandomPerSample(torch.utils.data.Dataset):
    """Returns numpy and python random draws, as an augmentation inside a worker would."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        import random

        import numpy as np
        return torch.tensor([np.random.rand(), random.random()])


def test_loader_workers_are_seeded_from_the_run_seed():
    def draws(seed):
        loader = BaseDataLoader(_RandomPerSample(), 4, num_workers=2, seed=seed)
        loader.set_epoch(0)
        return torch.cat(list(loader))

    assert torch.equal(draws(1), draws(1)) and not torch.equal(draws(1), draws(2))
