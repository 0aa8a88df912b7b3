"""The rehearsal: config values that validation lets through and the run would reject are caught on one real
batch before the run directory exists, and name the key (exit 2) or the user's line (exit 1)."""
import copy

import pytest
import torch

import train
from base.rehearsal import rehearse
from conftest import tiny_config, write_config
from parse_config import parse_args
from utils.seeding import rng_state

TO_TENSOR = {"type": "ToTensor"}
NORMALIZE = {"type": "Normalize", "args": {"mean": [0.1307], "std": [0.3081]}}
AFFINE = {"type": "RandomAffine", "args": {"degrees": 10, "translate": [0.1, 0.1]}}
PIL_TRANSFORMS = "(PIL transforms go before ToTensor, tensor transforms such as Normalize after it)"


def _transforms(*items):
    return ("data_loader.args.transforms", list(items))


# (what the fuzzer changed, the value) -> the one line the user sees after "error: <file>: "
CONFIG_ERRORS = {
    "normalize-on-pil": (_transforms(AFFINE, NORMALIZE),
                         "data_loader.args.transforms[1]: Normalize failed on sample {index} of the training data: "
                         "TypeError: img should be Tensor Image. Got <class 'PIL.Image.Image'> " + PIL_TRANSFORMS),
    "no-to-tensor": (_transforms(AFFINE),
                     "data_loader.args.transforms: the training samples are PIL images, which a batch cannot hold: "
                     "end the transform list with {{type: ToTensor}} (Normalize goes after it)"),
    "normalize-before-to-tensor": (_transforms(NORMALIZE, TO_TENSOR),
                                   "data_loader.args.transforms[0]: Normalize failed on sample {index} of the training "
                                   "data: TypeError: img should be Tensor Image. Got <class 'PIL.Image.Image'> "
                                   + PIL_TRANSFORMS),
    "zero-std": (_transforms(TO_TENSOR, {"type": "Normalize", "args": {"mean": [0.1], "std": [0.0]}}),
                 "data_loader.args.transforms[1].args.std: Normalize failed on sample {index} of the training data: "
                 "ValueError: std evaluated to zero after conversion to torch.float32, leading to division by zero."),
    "mean-of-two-channels": (_transforms(TO_TENSOR, {"type": "Normalize", "args": {"mean": [0.1, 0.2],
                                                                                      "std": [0.3, 0.3]}}),
                             "data_loader.args.transforms[1]: Normalize failed on sample {index} of the training data: "
                             "RuntimeError: output with shape [1, 28, 28] doesn't match the broadcast shape "
                             "[2, 28, 28]"),
    "mean-a-string": (_transforms(TO_TENSOR, {"type": "Normalize", "args": {"mean": "a", "std": [0.3]}}),
                      "data_loader.args.transforms[1].args.mean: Normalize failed on sample {index} of the training "
                      "data: TypeError: new(): invalid data type 'str'"),
    "translate-above-1": (_transforms({"type": "RandomAffine", "args": {"degrees": 10, "translate": [1.5, 0.1]}},
                                      TO_TENSOR),
                          "data_loader.args.transforms[0].args.translate: MnistDataLoader refused its args: "
                          "translation values should be between 0 and 1"),
    "degrees-a-string": (_transforms({"type": "RandomAffine", "args": {"degrees": "ten"}}, TO_TENSOR),
                         "data_loader.args.transforms[0].args.degrees: MnistDataLoader refused its args: degrees "
                         "should be a sequence of length 2."),
    "crop-larger-than-images": (_transforms({"type": "RandomCrop", "args": {"size": 64}}, TO_TENSOR),
                                "data_loader.args.transforms[0].args.size: RandomCrop failed on sample {index} of the "
                                "training data: ValueError: Required crop size (64, 64) is larger than input image "
                                "size (28, 28)"),
    "fewer-outputs-than-classes": (("arch.args.num_classes", 5),
                                   "arch.args.num_classes: the model outputs 5 classes but the training data "
                                   "(MNIST) has 10 (0 - zero, 1 - one, 2 - two, 3 - three, 4 - four, ...): set it "
                                   "to 10"),
    "dropout-a-string": (("arch.args.dropout", "high"),
                         "arch.args.dropout: MnistModel refused its args: '<' not supported between instances of "
                         "'str' and 'int'"),
    "lr-a-string": (("optimizer.args.lr", "fast"),
                    "optimizer.args.lr: Adam refused its args: '<=' not supported between instances of 'float' "
                    "and 'str'"),
    "weight-decay-a-string": (("optimizer.args", {"lr": 1e-3, "weight_decay": "none"}),
                              "optimizer.args.weight_decay: Adam refused its args: '<=' not supported between "
                              "instances of 'float' and 'str'"),
    "batch-size-a-fraction": (("data_loader.args.batch_size", 12.5),
                              "data_loader.args.batch_size: MnistDataLoader refused its args: batch_size should be a "
                              "positive integer value, but got batch_size=12.5"),
    "max-lr-a-string": (("lr_scheduler", {"type": "OneCycleLR", "args": {"max_lr": "big", "total_steps": "auto"}}),
                        "lr_scheduler.args.max_lr: OneCycleLR refused its args: unsupported operand type(s) for /: "
                        "'str' and 'float'"),
}
# values that the user's own code then fails on: its file and line, exit 1, with what the rehearsal was
USER_CODE_ERRORS = {
    "k-beyond-classes": (("metrics", ["accuracy", {"type": "top_k_acc", "args": {"k": 20}}]),
                         "model/metric.py", "metrics[1].args.k = 20 may be the cause)"),
    "resize-changes-the-input": (_transforms({"type": "Resize", "args": {"size": 32}}, TO_TENSOR),
                                 "model/model.py", "nothing was written)"),
    "three-channel-images": (_transforms({"type": "Grayscale", "args": {"num_output_channels": 3}}, TO_TENSOR),
                             "model/model.py", "nothing was written)"),
}


def _fuzzed(tmp_path, key_path, value):
    config = tiny_config(tmp_path, epochs=1, lr_step="batch")
    keys, target = key_path.split("."), config
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = copy.deepcopy(value)
    return write_config(tmp_path, config)


def _first_batch_facts(tmp_path):
    """The first training batch's first sample index and largest label, as the tiny config draws them."""
    path = write_config(tmp_path, tiny_config(tmp_path), "plain.yaml")
    trainer, _, _ = train.build_trainer(*parse_args(["-c", str(path)], train.lookups()))
    keys = next(iter(trainer.data_loader.batch_sampler))
    labels = [int(trainer.data_loader.dataset[key][1]) for key in keys]
    return keys[0][1], max(labels)


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_a_value_the_run_would_reject_is_one_line_naming_its_key_before_anything_is_written(tmp_path, capsys, case):
    (key_path, value), expected = CONFIG_ERRORS[case]
    index, label = _first_batch_facts(tmp_path)
    path = _fuzzed(tmp_path, key_path, value)
    assert train.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: {expected.format(index=index, label=label, above=label + 1)}\n"
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("case", sorted(USER_CODE_ERRORS))
def test_a_value_the_users_code_fails_on_shows_their_line_and_that_nothing_was_written(tmp_path, capsys, case):
    (key_path, value), user_file, note = USER_CODE_ERRORS[case]
    assert train.main(["-c", str(_fuzzed(tmp_path, key_path, value))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: ") and "in your code (most recent call last):" in err
    assert user_file in err and err.rstrip().endswith(note), err
    assert "found before the run began, by passing one real batch through the data, models, losses and metrics" in err
    assert not (tmp_path / "saved").exists()


UNNAMED_CLASSES = """import torch
from torch.utils.data import Dataset


class Blobs(Dataset):  # no `classes` attribute: only a real batch shows the labels
    def __len__(self):
        return 96

    def __getitem__(self, index):
        return torch.zeros(1, 28, 28), index % 10
"""


def test_labels_beyond_the_models_classes_name_its_class_count(tmp_path, capsys):
    (tmp_path / "blobs.py").write_text(UNNAMED_CLASSES)
    config = tiny_config(tmp_path, epochs=1, monitor="off")
    config["data_loader"] = {"type": f"{tmp_path}/blobs.py:Blobs", "args": {"batch_size": 32, "num_workers": 0}}
    config["arch"]["args"] = {"num_classes": 5}
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: arch.args.num_classes: the model outputs 5 classes but the training data has label 9: set "
        "it to the number of classes (at least 10)\n")
    assert not (tmp_path / "saved").exists()


def test_a_metric_that_always_fails_is_caught_before_the_run_directory(tmp_path, capsys):
    (tmp_path / "crash.py").write_text("def broken(output, target):\n    raise ValueError('metric exploded')\n")
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert train.main(["-c", str(path), f"metrics=[{tmp_path}/crash.py:broken]"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ValueError: metric exploded\nin your code") and "crash.py" in err
    assert not (tmp_path / "saved").exists()


AUGMENTED_BN_NET = """import torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
        self.head_frozen = nn.BatchNorm1d(10)
    def forward(self, x):
        return torch.log_softmax(self.head_frozen(self.body(x) + 0.01 * torch.randn(len(x), 10)), dim=1)
"""


def test_the_rehearsal_leaves_every_rng_flag_buffer_and_metric_as_it_found_them(tmp_path):
    (tmp_path / "net.py").write_text(AUGMENTED_BN_NET)
    config = tiny_config(tmp_path)
    config["arch"] = {"type": f"{tmp_path}/net.py:Net", "args": {}}
    config["data_loader"]["args"]["transforms"] = [AFFINE, TO_TENSOR, NORMALIZE]
    config["metrics"] = ["accuracy", {"type": "torchmetrics.classification.MulticlassAccuracy",
                                      "args": {"num_classes": 10}}]
    config["imports"] = ["torchmetrics"]
    path = write_config(tmp_path, config)
    parsed, request = parse_args(["-c", str(path)], train.lookups())
    trainer, _, _ = train.build_trainer(parsed, request)
    model = trainer.model
    model.head_frozen.eval()  # a module the user froze keeps its own flag
    before = (rng_state(), copy.deepcopy(model.state_dict()), [m.training for m in model.modules()])
    rehearse(trainer)
    after = (rng_state(), model.state_dict(), [m.training for m in model.modules()])
    assert before[0]["python"] == after[0]["python"] and before[0]["numpy"] == after[0]["numpy"]
    assert torch.equal(before[0]["torch"], after[0]["torch"])
    assert all(torch.equal(before[1][key], after[1][key]) for key in before[1])
    assert before[2] == after[2] and after[2][-1] is False
    assert trainer.valid_metrics.result() == {}, "the rehearsal's batch is not counted in validation"
