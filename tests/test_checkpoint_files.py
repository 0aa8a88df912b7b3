"""Hostile or wrong checkpoint files, and partial weights with arch.init_from."""
import pytest
import torch

import test as test_script
import train
from conftest import files_under, load, run_dir, save_consistent, tiny_config, write_config
from model.model import MnistModel


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def checkpoint(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "source"]) == 0
    return run_dir(tmp_path, "source") / "checkpoint-epoch1.pth"


def _damaged(checkpoint, tmp_path, name, change):
    state = load(checkpoint)
    change(state)
    return save_consistent(state, tmp_path / name)


def _written(path, data):
    path.write_bytes(data)
    return path


def _mismatched(state):
    weights = state["state_dict"]
    del weights["fc2.bias"]
    weights["extra.weight"] = torch.zeros(1)
    weights["fc1.weight"] = torch.zeros(50, 10)


@pytest.mark.parametrize("entry", [train.main, test_script.main], ids=["train", "test"])
@pytest.mark.parametrize("make, expected", [
    (lambda c, d: d / "missing.pth", "{}: no such checkpoint file"),
    (lambda c, d: _written(d / "empty.pth", b""), "{}: the file is empty, not a checkpoint"),
    (lambda c, d: _written(d / "cut.pth", c.read_bytes()[: c.stat().st_size // 2]),
     "{}: not a complete checkpoint: truncated or corrupt"),
    (lambda c, d: _written(d / "noise.pth", bytes(range(256)) * 64),
     "{}: refused: not a torchkiln checkpoint, or unsafe: loading it would run code from the file; "
     "only load such a file with weights_only=False if you made it yourself"),
    (lambda c, d: torch.save({"weights": [1, 2]}, d / "other.pth") or d / "other.pth",
     "{}: not a torchkiln checkpoint (no valid 'version' and 'state_dict')"),
    (lambda c, d: _damaged(c, d, "future.pth", lambda s: s.update(version=99)),
     "{}: checkpoint format version 99 is newer than this torchkiln reads (2); update torchkiln to load it"),
    (lambda c, d: _damaged(c, d, "misfit.pth", _mismatched),
     "{}: its state_dict does not fit the configured model: 1 missing: fc2.bias; 1 unexpected: extra.weight; "
     "1 shape-mismatched: fc1.weight (50, 10) vs model (50, 320)"),
], ids=["missing", "empty", "truncated", "random-bytes", "foreign", "newer-version", "state-dict-mismatch"])
def test_bad_checkpoint_files_are_refused(tmp_path, checkpoint, capsys, entry, make, expected):
    path = make(checkpoint, tmp_path)
    before = files_under(tmp_path)
    assert entry(["-r", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {expected.format(path)}\n"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("entry", [train.main, test_script.main], ids=["train", "test"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, monkeypatch, capsys, entry):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not switch the protection off
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"version": 1, "state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}, evil)
    before = files_under(tmp_path)
    assert entry(["-r", str(evil)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {evil}: refused: not a torchkiln checkpoint, or unsafe")
    assert not marker.exists() and files_under(tmp_path) == before


def test_init_from_loads_matching_weights_and_starts_fresh(tmp_path, checkpoint, capsys):
    source = load(checkpoint)["state_dict"]
    config = tiny_config(tmp_path, epochs=1)
    config["arch"] = {"type": "MnistModel", "args": {"num_classes": 12},
                      "init_from": {"path": str(checkpoint), "exclude": ["^conv1\\."]}}
    path = write_config(tmp_path, config, "partial.yaml")
    assert train.main(["-c", str(path), "--run-id", "partial", "trainer.save_period=1", "optimizer.args.lr=0"]) == 0
    assert ("init_from " + str(checkpoint) + ": {'loaded': 4, 'excluded': 2, 'missing': 2, 'shape-mismatched': 2, "
            "'unexpected': 0}") in capsys.readouterr().out
    tuned = load(run_dir(tmp_path, "partial") / "checkpoint-epoch1.pth")
    assert tuned["global_step"] == 8 and tuned["epoch"] == 1, "a fresh run, not a resume"
    assert torch.equal(tuned["state_dict"]["conv2.weight"], source["conv2.weight"])  # lr 0 keeps loaded values
    assert not torch.equal(tuned["state_dict"]["conv1.weight"], source["conv1.weight"])


def test_init_from_a_plain_state_dict_and_strict_mode(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in MnistModel(num_classes=5).state_dict().items()}, weights)
    config = tiny_config(tmp_path, epochs=1)
    config["arch"]["init_from"] = {"path": str(weights), "exclude": ["^fc2\\."]}
    path = write_config(tmp_path, config, "plain.yaml")
    assert train.main(["-c", str(path), "--run-id", "plain"]) == 0
    assert "'loaded': 6, 'excluded': 2, 'missing': 2, 'shape-mismatched': 0" in capsys.readouterr().out
    before = files_under(tmp_path)
    assert train.main(["-c", str(path), "--run-id", "strict", "arch.init_from.strict=true",
                       "arch.init_from.exclude=[]"]) == 2
    assert capsys.readouterr().err == (f"error: {weights}: init_from with strict: true, but 2 shape-mismatched: "
                                       "fc2.weight (5, 50) vs model (10, 50), fc2.bias (5,) vs model (10,)\n")
    assert files_under(tmp_path) == before
