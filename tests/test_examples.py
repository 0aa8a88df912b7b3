"""The shipped example configs train as they are, on tiny generated data in their datasets' own formats."""
import json
import pickle

import numpy as np
import pytest
import torchvision
from PIL import Image

import test as test_script
import train
from conftest import ROOT, load, run_dir

SMALL = ["trainer.epochs=1", "trainer.tensorboard=false", "trainer.progress_bar=false", "trainer.verbosity=1"]


def _train_example(tmp_path, config, roots, batch_size, run_id):
    """Train a shipped config for one epoch with its data roots pointed at generated data, no workers."""
    overrides = [f"{section}.args.root={root}" for section, root in zip(
        ("data_loader", "valid_data_loader", "test_data_loader"), roots)]
    overrides += [f"{section}.args.num_workers=0" for section in ("data_loader", "valid_data_loader",
                                                                   "test_data_loader")]
    overrides += [f"trainer.save_dir={tmp_path}/saved", f"data_loader.args.batch_size={batch_size}", *SMALL]
    assert train.main(["-c", str(ROOT / "configs" / config), "--run-id", run_id, *overrides]) == 0


def _fake_cifar10(root, per_batch=8):
    """CIFAR-10's python pickles (data_batch_1..5, test_batch, batches.meta) holding random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


@pytest.mark.slow
def test_cifar10_config_trains_and_tests(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path / "data")
    # Generated files cannot match the real archive's md5 sums: the only check we skip.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    _train_example(tmp_path, "cifar10.yaml", [tmp_path / "data"] * 3, 16, "c")
    run = run_dir(tmp_path, "c", "Cifar10_ResNet18")
    final = load(run / "checkpoint-last.pth")
    assert final["global_step"] == 3 and final["lr_scheduler"]["total_steps"] == 3
    assert final["config"]["lr_scheduler"]["args"]["total_steps"] == "auto", "computed again by a resume"
    assert "fc.weight" in final["state_dict"]
    assert test_script.main(["-r", str(run / "model_best.pth")]) == 0
    assert set(json.loads((run / "model_best.test.json").read_text())) == {"checkpoint", "loss", "accuracy",
                                                                          "top_k_acc"}


def _image_folder(root, classes=("cat", "dog"), per_class=4):
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


@pytest.mark.slow
def test_imagefolder_config_trains_and_tests(tmp_path):
    _image_folder(tmp_path / "images")
    _train_example(tmp_path, "imagefolder.yaml", [tmp_path / "images" / split for split in ("train", "val", "test")],
                   4, "i")
    run = run_dir(tmp_path, "i", "ImageFolder_ResNet18")
    assert load(run / "checkpoint-last.pth")["global_step"] == 2
    assert test_script.main(["-r", str(run / "model_best.pth")]) == 0
    assert 0.0 <= json.loads((run / "model_best.test.json").read_text())["accuracy"] <= 1.0


def test_an_image_folder_with_more_classes_than_num_classes_is_one_line_before_anything(tmp_path, capsys):
    _image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=1)
    roots = [tmp_path / "images" / split for split in ("train", "val", "test")]
    overrides = [f"{section}.args.root={root}" for section, root in zip(
        ("data_loader", "valid_data_loader", "test_data_loader"), roots)]
    config = ROOT / "configs/imagefolder.yaml"
    assert train.main(["-c", str(config), f"trainer.save_dir={tmp_path}/saved", *overrides, *SMALL]) == 2
    assert capsys.readouterr().err == (
        f"error: {config}: arch.args.num_classes: the model outputs 2 classes but the training data (ImageFolder) "
        "has 3 (cat, dog, fox): set it to 3\n")
    assert not (tmp_path / "saved").exists()
