"""export.py: each file it writes is run on real samples against the eager model; test.py evaluates the ONNX
file; the config's export block runs it beside training without changing the run."""
import builtins
import json
import os

import pytest
import torch

import export
import test as test_script
import train
from conftest import assert_same_training_state, load, run_dir, tiny_config, write_config


def _trained(tmp_path, run_id="r", **changes):
    config = tiny_config(tmp_path, epochs=1)
    config.update(changes)
    assert train.main(["-c", str(write_config(tmp_path, config, f"{run_id}.yaml")), "--run-id", run_id]) == 0
    return run_dir(tmp_path, run_id)


def test_the_mnist_model_exports_to_both_formats_verified_with_a_manifest(tmp_path, capsys):
    run = _trained(tmp_path)
    assert export.main(["-r", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"verified {run}/export/model.pt2: batch sizes [1, 2, 7]" in out
    assert f"verified {run}/export/model.onnx: batch sizes [1, 2, 7]" in out and "top-1 equal" in out
    manifest = json.loads((run / "export/export.json").read_text())
    assert manifest["checkpoint"]["path"] == str(run / "model_best.pth") and manifest["checkpoint"]["epoch"] == 1
    assert manifest["weights"] == "trained" and manifest["outputs"] == ["output"]
    assert manifest["inputs"] == [{"name": "input", "dtype": "torch.float32", "shape": ["batch", 1, 28, 28]}]
    assert isinstance(manifest["opset"], int) and manifest["versions"]["onnxruntime"]
    assert all(check["passed"] and check["max_abs_error"] <= 1e-4 for check in manifest["checks"])
    program = torch.export.load(str(run / "export/model.pt2")).module()
    assert program(torch.zeros(5, 1, 28, 28))[0].shape == (5, 10), "the batch dimension is dynamic"


def test_test_py_on_the_onnx_file_reproduces_the_checkpoints_metrics(tmp_path, capsys):
    run = _trained(tmp_path)
    assert export.main(["-r", str(run), "--format", "onnx"]) == 0
    assert test_script.main(["-r", str(run)]) == 0
    assert test_script.main(["--onnx", str(run / "export/model.onnx")]) == 0
    assert "through ONNX Runtime (in place of the checkpoint's model)" in capsys.readouterr().out
    eager = json.loads((run / "model_best.test.json").read_text())
    exported = json.loads((run / "export/model.test.json").read_text())
    assert exported["onnx"] == str(run / "export/model.onnx")
    assert exported["accuracy"] == eager["accuracy"] and exported["loss"] == pytest.approx(eager["loss"], abs=1e-5)


TWO_OUTPUTS = """import torch
from torch import nn
import torch.nn.functional as F


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.5))
        self.logits, self.embedding = nn.Linear(32, 10), nn.Linear(32, 4)

    def forward(self, x):
        features = self.body(x)
        return {"logits": F.log_softmax(self.logits(features), 1), "embedding": self.embedding(features)}


def logits_loss(output, target):
    return F.nll_loss(output["logits"], target)


class Branchy(TwoHeads):
    def forward(self, x):
        if x.sum() > 0:
            return {"logits": F.log_softmax(self.logits(self.body(x)), 1), "embedding": x[:, :4, 0, 0]}
        return super().forward(x)
"""


def test_a_model_returning_a_dict_is_exported_with_named_outputs(tmp_path):
    (tmp_path / "heads.py").write_text(TWO_OUTPUTS)
    run = _trained(tmp_path, arch={"type": f"{tmp_path}/heads.py:TwoHeads", "args": {}},
                   loss=f"{tmp_path}/heads.py:logits_loss", metrics=[])
    assert export.main(["-r", str(run), "--trust-checkpoint-config"]) == 0
    import onnxruntime
    session = onnxruntime.InferenceSession(str(run / "export/model.onnx"))
    assert [output.name for output in session.get_outputs()] == ["logits", "embedding"]
    assert json.loads((run / "export/export.json").read_text())["outputs"] == ["logits", "embedding"]


def test_data_dependent_control_flow_is_one_line_naming_the_users_file_and_line(tmp_path, capsys):
    (tmp_path / "heads.py").write_text(TWO_OUTPUTS)
    run = _trained(tmp_path, arch={"type": f"{tmp_path}/heads.py:Branchy", "args": {}},
                   loss=f"{tmp_path}/heads.py:logits_loss", metrics=[])
    assert export.main(["-r", str(run), "--trust-checkpoint-config", "--format", "pt2"]) == 2
    line = TWO_OUTPUTS.splitlines().index("        if x.sum() > 0:") + 1
    shown = os.path.relpath(tmp_path / "heads.py") if str(tmp_path).startswith(os.getcwd()) else tmp_path / "heads.py"
    assert capsys.readouterr().err == (
        f"error: {shown}:{line}: export cannot follow Python control flow on a tensor's value "
        "(`if x.sum() > 0`, `.item()`, a loop bounded by a tensor); write it with torch.where or torch.cond, or "
        "move the decision out of forward\n")


def test_an_ema_run_exports_the_ema_weights_test_py_evaluates(tmp_path):
    run = _trained(tmp_path, trainer={**tiny_config(tmp_path, epochs=1)["trainer"], "ema": {"decay": 0.5}})
    assert export.main(["-r", str(run), "--format", "pt2"]) == 0
    assert json.loads((run / "export/export.json").read_text())["weights"] == "ema"
    from model.model import MnistModel
    ema, trained = MnistModel().eval(), MnistModel().eval()
    checkpoint = load(run / "model_best.pth")
    ema.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["ema_state_dict"].items()
                         if k != "n_averaged"})
    trained.load_state_dict(checkpoint["state_dict"])
    inputs = torch.randn(3, 1, 28, 28)
    exported = torch.export.load(str(run / "export/model.pt2")).module()(inputs)[0]
    assert torch.allclose(exported, ema(inputs), atol=1e-5) and not torch.allclose(exported, trained(inputs), atol=1e-5)


def test_a_missing_onnx_package_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    run = _trained(tmp_path)
    real_import = builtins.__import__

    def without_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxscript)
    assert export.main(["-r", str(run), "--format", "onnx"]) == 2
    assert capsys.readouterr().err == ('error: --format onnx needs onnxscript: pip install -e ".[export]" '
                                       "(or --format pt2)\n")
    assert not (run / "export").exists()
    assert export.main(["-r", str(run), "--format", "pt2"]) == 0, "the .pt2 format needs torch alone"


def test_the_export_block_exports_the_best_checkpoint_and_leaves_the_run_bit_identical(tmp_path, capsys):
    plain = _trained(tmp_path, "plain")
    exported = _trained(tmp_path, "exported", export={"format": "both", "when": "best"})
    assert "  export    " in capsys.readouterr().out
    a, b = load(plain / "checkpoint-last.pth"), load(exported / "checkpoint-last.pth")
    assert_same_training_state(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"] == b["rng"]["numpy"]
    manifest = json.loads((exported / "export/export.json").read_text())
    assert manifest["checkpoint"]["path"] == str(exported / "model_best.pth")
    assert all(check["passed"] for check in manifest["checks"]) and len(manifest["checks"]) == 2


IMAGES = """import torch
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, size=96, training=True):
        generator = torch.Generator().manual_seed(1 if training else 2)
        self.images = torch.randn(size, 3, 32, 32, generator=generator) * 2 + 1  # far from BatchNorm's init
        self.labels = torch.randint(0, 10, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]
"""


@pytest.mark.slow
def test_a_resnet18_is_exported_with_its_running_batchnorm_statistics(tmp_path, capsys):
    (tmp_path / "images.py").write_text(IMAGES)
    config = tiny_config(tmp_path, epochs=1)
    config.update(arch={"type": "torchvision.models.resnet18", "args": {"num_classes": 10}},
                  data_loader={"type": f"{tmp_path}/images.py:Images", "args": {"batch_size": 16, "num_workers": 0,
                                                                                 "validation_split": 32}},
                  loss="CrossEntropyLoss", metrics=[])
    config["lr_scheduler"] = None
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "resnet"]) == 0
    run = run_dir(tmp_path, "resnet")
    assert export.main(["-r", str(run), "--trust-checkpoint-config"]) == 0
    assert "verified" in capsys.readouterr().out
    manifest = json.loads((run / "export/export.json").read_text())
    assert all(check["passed"] for check in manifest["checks"]) and manifest["inputs"][0]["shape"] == [
        "batch", 3, 32, 32]
    import torchvision
    eager = torchvision.models.resnet18(num_classes=10)
    eager.load_state_dict(load(run / "model_best.pth")["state_dict"])
    assert eager.bn1.running_mean.abs().sum() > 0, "training moved the running statistics"
    one = torch.randn(1, 3, 32, 32) * 2 + 1
    exported = torch.export.load(str(run / "export/model.pt2")).module()(one)[0]
    assert torch.allclose(exported, eager.eval()(one), atol=1e-4), "a batch of one: eval-mode BatchNorm"
    two = torch.randn(2, 3, 32, 32) * 2 + 1
    assert not torch.allclose(torch.export.load(str(run / "export/model.pt2")).module()(two)[0],
                              eager.train()(two), atol=1e-3), "not batch statistics"
