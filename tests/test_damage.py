"""A damaged or tampered checkpoint is never loaded silently: bit flips anywhere in its content, NaN weights,
an optimizer state that does not fit, fields of the wrong type or range. Each is one line, exit 2, nothing
written, on every route that loads a checkpoint."""
import pytest
import torch

import test as test_script
import train
from conftest import files_under, load, run_dir, save_consistent, tiny_config, write_config


@pytest.fixture
def checkpoint(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "good"]) == 0
    return run_dir(tmp_path, "good") / "checkpoint-epoch1.pth"


def _flipped(checkpoint, tmp_path, part, name, byte, mask):
    """The file with one bit of one tensor's stored bytes flipped, found by the tensor's own bytes."""
    state = load(checkpoint)
    tensor = state["state_dict"][name] if part == "state_dict" else state["optimizer"]["state"][0][name]
    raw = bytearray(checkpoint.read_bytes())
    offset = raw.find(tensor.reshape(-1)[:16].numpy().tobytes())
    assert offset > 0
    raw[offset + byte] ^= mask
    path = tmp_path / f"flipped-{part}.pth"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("part, name, byte, mask, damaged", [
    ("state_dict", "fc1.weight", 0, 0x01, "state_dict"),  # lowest mantissa bit
    ("state_dict", "conv1.weight", 3, 0x40, "state_dict"),  # an exponent bit: the value explodes
    ("optimizer", "exp_avg", 2, 0x10, "optimizer"),
], ids=["weight-mantissa", "weight-exponent", "optimizer-state"])
@pytest.mark.parametrize("entry", ["train", "test", "init_from"])
def test_flipped_bits_are_found_on_every_route(tmp_path, checkpoint, capsys, part, name, byte, mask, damaged,
                                               entry):
    path = _flipped(checkpoint, tmp_path, part, name, byte, mask)
    before = files_under(tmp_path)
    if entry == "init_from":
        config = write_config(tmp_path, {**tiny_config(tmp_path), "arch": {"type": "MnistModel",
                                                                           "init_from": {"path": str(path)}}})
        before = files_under(tmp_path)
        status = train.main(["-c", str(config)])
    else:
        status = (train.main if entry == "train" else test_script.main)(["-r", str(path)])
    if damaged == "optimizer" and entry != "train":  # evaluating and init_from read only the intact weights
        shown = capsys.readouterr()
        assert status == 0 and (f"{path}: damaged: its optimizer do not match the digest written with it; only its "
                                "intact weights are used") in shown.out + shown.err
        return
    assert status == 2
    assert capsys.readouterr().err == (f"error: {path}: damaged: its {damaged} do not match the digest written "
                                       "with it; resume from an earlier checkpoint\n")
    assert files_under(tmp_path) == before


def _changed(change):
    def make(checkpoint, tmp_path):
        state = load(checkpoint)
        change(state)
        return save_consistent(state, tmp_path / "tampered.pth")
    return make


def _nan_weight(state):
    state["state_dict"]["fc2.bias"][3] = float("nan")


def _wrong_shape(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)


TAMPERED = [  # (change, expected after "error: <path>: ")
    (_nan_weight, "its weight 'fc2.bias' holds nan or inf; resume from an earlier checkpoint"),
    (_wrong_shape, "its optimizer state 'exp_avg' of parameter 0 has shape (3, 3), the parameter (10, 1, 5, 5)"),
    (lambda s: s.update(epoch=-1), "cannot resume from it: 'epoch' must be a non-negative integer, not -1"),
    (lambda s: s.update(batches_in_epoch=-3),
     "cannot resume from it: 'batches_in_epoch' must be a non-negative integer, not -3"),
    (lambda s: s.update(version=True), "not a torchkiln checkpoint (no valid 'version' and 'state_dict')"),
    (lambda s: s.update(version=-2), "not a torchkiln checkpoint (no valid 'version' and 'state_dict')"),
    (lambda s: s.update(data_order={"pass": "x"}), "cannot resume from it: 'data_order' is missing or damaged: the "
                                                   "run cannot continue exactly (pass --allow-inexact-resume to "
                                                   "continue anyway)"),
    (lambda s: s.update(metrics={"sums": {"loss": "garbage"}, "counts": {}}),
     "cannot resume from it: 'metrics' must hold the partial epoch's sums and counts"),
    (lambda s: s.pop("rng"), "cannot resume from it: 'rng' is missing or damaged: the run cannot continue exactly "
                             "(pass --allow-inexact-resume to continue anyway)"),
    (lambda s: s["config"].update(seed=2**64), "seed: must be an integer <= 9223372036854775807, not "
                                               "18446744073709551616"),
]


@pytest.mark.parametrize("change, expected", TAMPERED, ids=["nan-weight", "optimizer-shape",
                                                            "negative-epoch", "negative-batches", "bool-version",
                                                            "negative-version", "data-order", "metric-sums",
                                                            "no-rng", "huge-seed"])
def test_tampered_checkpoints_are_one_line_and_write_nothing(tmp_path, checkpoint, capsys, change, expected):
    path = _changed(change)(checkpoint, tmp_path)
    before = files_under(tmp_path)
    assert train.main(["-r", str(path), "trainer.epochs=2"]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert files_under(tmp_path) == before


def test_nan_weights_are_refused_by_test_py_too(tmp_path, checkpoint, capsys):
    path = _changed(_nan_weight)(checkpoint, tmp_path)
    assert test_script.main(["-r", str(path)]) == 2
    assert "its weight 'fc2.bias' holds nan or inf" in capsys.readouterr().err


def test_allow_inexact_resume_is_the_explicit_way_through(tmp_path, checkpoint, capsys):
    path = _changed(lambda s: s.pop("rng"))(checkpoint, tmp_path)
    assert train.main(["-r", str(path), "trainer.epochs=2", "--allow-inexact-resume", "--run-id", "inexact"]) == 0
    assert "its RNG or data-order state is missing: continuing inexactly" in capsys.readouterr().out
    assert load(run_dir(tmp_path, "inexact") / "checkpoint-last.pth")["epoch"] == 2


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=2))
    assert train.main(["-c", str(path), "--run-id", "good"]) == 0
    run = run_dir(tmp_path, "good")
    last = run / "checkpoint-last.pth"
    assert last.samefile(run / "checkpoint-epoch2.pth"), "the final state is written once, under two names"
    raw = bytearray(last.read_bytes())
    offset = raw.find(load(last)["state_dict"]["fc1.weight"].reshape(-1)[:16].numpy().tobytes())
    raw[offset] ^= 0x01
    last.write_bytes(bytes(raw))  # bit rot in the file: both names see it
    assert train.main(["-r", str(run), "trainer.epochs=3"]) == 0
    out = capsys.readouterr().out
    for damaged in (last, run / "checkpoint-epoch2.pth"):
        assert f"{damaged}: damaged: its state_dict do not match" in out and "falling back to the next newest" in out
    assert "Resuming from" in out and "checkpoint-epoch1.pth: epoch 2, batch 0" in out
    assert load(run / "checkpoint-epoch3.pth")["epoch"] == 3


def test_a_checkpoint_config_may_not_download_weights_or_data(tmp_path, checkpoint, capsys):
    weights = _changed(lambda s: s["config"].update(arch={"type": "torchvision.models.resnet18",
                                                          "args": {"weights": "DEFAULT"}}))(checkpoint, tmp_path)
    assert test_script.main(["-r", str(weights)]) == 2
    assert capsys.readouterr().err == (
        f"error: {weights}: arch.args.weights: 'DEFAULT' would download, and it comes from a checkpoint's config: "
        "refused; set it yourself (arch.args.weights=false, or arch.args.weights='DEFAULT' if you want the "
        "download) or pass --trust-checkpoint-config\n")
    data = _changed(lambda s: s["config"]["data_loader"]["args"].update(download=True))(checkpoint, tmp_path)
    assert test_script.main(["-r", str(data)]) == 0
    assert "data_loader.args.download: turned off: a checkpoint's config may not make torchkiln download" in \
        capsys.readouterr().err
