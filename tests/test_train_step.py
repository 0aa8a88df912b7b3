"""The training step of a real workload: precision, accumulation, clipping, EMA and compile, each exact across
a resume, equivalent to its definition, and free of host syncs on steps that do not log."""
import os
import signal

import pytest
import torch

import test as test_script
import train
from base.checkpointer import Checkpointer
from base.train_step import TrainStep
from conftest import files_under, load, run_dir, save_consistent, tiny_config, write_config

LINEAR_NET = '''import torch


class Net(torch.nn.Module):
    """No dropout, no batch norm: N micro-batches of B/N must equal one batch of B."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(784, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        return torch.log_softmax(self.fc2(torch.tanh(self.fc1(x.flatten(1)))), 1)
'''


def _config(tmp_path, **trainer):
    config = tiny_config(tmp_path, **trainer)
    config["data_loader"]["args"]["limit"] = 264  # 200 training samples: batches of 32 leave a short one
    return config


def _train(tmp_path, run_id, config, *overrides):
    assert train.main(["-c", str(write_config(tmp_path, config, f"{run_id}.yaml")), "--run-id", run_id,
                       *overrides]) == 0
    return run_dir(tmp_path, run_id)


def _assert_equal_states(a, b):
    """torch.equal on weights, optimizer state, scaler state and EMA weights."""
    for key in ("state_dict", "ema_state_dict"):
        assert (a[key] is None) == (b[key] is None)
        for name, tensor in (a[key] or {}).items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][index][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["step"] == b["step"] and a["global_step"] == b["global_step"]


def test_micro_batches_equal_one_large_batch_including_the_short_last_window(tmp_path):
    (tmp_path / "net.py").write_text(LINEAR_NET)
    net = [f"arch.type={tmp_path}/net.py:Net", "lr_scheduler=null", "optimizer.type=SGD",
           "optimizer.args={lr: 0.1, momentum: 0.9}"]
    whole = load(_train(tmp_path, "whole", _config(tmp_path), *net, "data_loader.args.batch_size=32") /
                 "checkpoint-last.pth")
    parts = load(_train(tmp_path, "parts", _config(tmp_path, accumulate_grad_batches=4), *net,
                        "data_loader.args.batch_size=8") / "checkpoint-last.pth")
    assert whole["global_step"] == parts["global_step"] == 14, "7 optimizer steps per epoch: 6 full, 1 short"
    for name, tensor in whole["state_dict"].items():
        torch.testing.assert_close(parts["state_dict"][name], tensor, rtol=0, atol=1e-6)


def test_clipping_matches_torch_clip_grad_norm_on_a_hand_computed_case():
    model = torch.nn.Linear(2, 1, bias=False)
    step = TrainStep(model, torch.device("cpu"), clip_norm=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.weight.detach().clone()
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    step.clip(optimizer)
    step.optimizer_step(optimizer)
    assert step.grad_norm.item() == 5.0
    torch.testing.assert_close(model.weight.detach(), before - torch.tensor([[0.6, 0.8]]))
    reference = torch.nn.Linear(2, 1, bias=False)
    reference.weight.grad = torch.tensor([[3.0, 4.0]])
    assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item() == 5.0
    torch.testing.assert_close(reference.weight.grad, torch.tensor([[0.6, 0.8]]))
    valued = TrainStep(model, torch.device("cpu"), clip_value=0.5)
    model.weight.grad = torch.tensor([[3.0, -0.25]])
    valued.clip(optimizer)
    assert model.weight.grad.tolist() == [[0.5, -0.25]]


def _signal_at(marker, batch_index, epoch=2):
    """A metric that sends SIGTERM to its own process while training batch `batch_index` of `epoch`, once."""
    return f'''import os, pathlib, signal, torch
seen = []
def stop_here(output, target):
    seen.append(torch.is_grad_enabled())  # validation runs without gradients
    if sum(seen) == {(epoch - 1) * 8 + batch_index + 1} and not pathlib.Path({str(marker)!r}).exists():
        pathlib.Path({str(marker)!r}).touch()
        os.kill(os.getpid(), signal.SIGTERM)
    return output.new_zeros(())
'''


SPIKY_LOSS = """import torch.nn.functional as F


def spiky_nll(output, target):
    loss = F.nll_loss(output, target)
    return loss * 1e4 if int(target.sum()) % 5 == 0 else loss
"""
COMBINATIONS = {
    "accumulate-3": {"accumulate_grad_batches": 3},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"precision": "16-mixed"},
    "ema-and-clip": {"ema": {"decay": 0.9}, "clip_grad_norm": 0.5, "clip_grad_value": 1.0},
}


@pytest.mark.parametrize("combination, workers", [(name, 0) for name in COMBINATIONS] + [("accumulate-3", 2)],
                         ids=[*COMBINATIONS, "accumulate-3-workers-2"])
def test_every_combination_resumes_exactly(tmp_path, combination, workers):
    """Accumulation 3 over 8-batch epochs (windows 3, 3, 2): a SIGTERM at batch 4 of epoch 2, in the middle of
    the second window, finishes the window and saves; the resumed run equals the uninterrupted one."""
    options = {**COMBINATIONS[combination], "accumulate_grad_batches": 3}
    config = _config(tmp_path, epochs=3, **options)
    config["data_loader"]["args"].update(limit=320, num_workers=workers)
    if combination == "16-mixed":  # a data-dependent spike overflows fp16 gradients: the scaler skips and halves
        (tmp_path / "spiky.py").write_text(SPIKY_LOSS)
        config["loss"] = f"{tmp_path}/spiky.py:spiky_nll"
    reference = load(_train(tmp_path, "reference", config) / "checkpoint-last.pth")
    if combination == "16-mixed":
        assert reference["step"]["scaler"]["scale"] < 65536.0, "the GradScaler met an inf and changed its scale"
    if combination == "ema-and-clip":
        assert reference["eval_weights"] == "ema_state_dict" and reference["ema_state_dict"] is not None
    (tmp_path / "stopper.py").write_text(_signal_at(tmp_path / "signalled", 4))
    path = write_config(tmp_path, config, "stopped.yaml")
    stopped = train.main(["-c", str(path), "--run-id", "stopped", f"metrics=[accuracy, {tmp_path}/stopper.py:stop_here]"])
    assert stopped == 128 + signal.SIGTERM
    last = load(run_dir(tmp_path, "stopped") / "checkpoint-last.pth")
    assert (last["epoch"], last["batches_in_epoch"], last["global_step"]) == (1, 6, 5), "window 2 finished"
    epoch_1 = run_dir(tmp_path, "stopped") / "checkpoint-epoch1.pth"
    for start in (epoch_1, run_dir(tmp_path, "stopped") / "checkpoint-last.pth"):
        resumed_id = f"resumed-{start.stem}"
        assert train.main(["-r", str(start), "--run-id", resumed_id, "metrics=[accuracy, "
                           f"{tmp_path}/stopper.py:stop_here]", "--trust-checkpoint-config"]) == 0
        _assert_equal_states(reference, load(run_dir(tmp_path, resumed_id) / "checkpoint-last.pth"))


def test_ema_weights_are_what_validation_best_and_test_use(tmp_path, capsys):
    run = _train(tmp_path, "ema", _config(tmp_path, ema={"decay": 0.5}))
    best = load(run / "model_best.pth")
    assert best["eval_weights"] == "ema_state_dict"
    assert not torch.equal(best["ema_state_dict"]["fc1.weight"], best["state_dict"]["fc1.weight"])
    capsys.readouterr()
    assert test_script.main(["-r", str(run / "model_best.pth")]) == 0
    ema_loss = float(capsys.readouterr().out.split("loss")[1].split(":")[1].split()[0])
    swapped = {**best, "eval_weights": "state_dict"}
    save_consistent(swapped, tmp_path / "raw.pth")
    assert test_script.main(["-r", str(tmp_path / "raw.pth")]) == 0
    raw_loss = float(capsys.readouterr().out.split("loss")[1].split(":")[1].split()[0])
    assert ema_loss != raw_loss


@pytest.mark.parametrize("first, second", [(True, False), (False, True)], ids=["compiled-then-eager",
                                                                                 "eager-then-compiled"])
def test_checkpoints_load_with_compile_on_or_off(tmp_path, first, second):
    compile_option = {"backend": "eager"}  # torch.compile's wrapper and key prefix, without a C++ build
    config = _config(tmp_path, epochs=1, compile=compile_option if first else False)
    run = _train(tmp_path, "first", config)
    checkpoint = load(run / "checkpoint-last.pth")
    assert not [key for key in checkpoint["state_dict"] if "_orig_mod" in key]
    override = "trainer.compile={backend: eager}" if second else "trainer.compile=false"
    assert train.main(["-r", str(run / "checkpoint-last.pth"), "--run-id", "second", "trainer.epochs=2",
                       override]) == 0
    assert test_script.main(["-r", str(run_dir(tmp_path, "second") / "checkpoint-last.pth")]) == 0


def test_a_compile_failure_is_one_line_naming_the_option(tmp_path, capsys):
    (tmp_path / "breaks.py").write_text("import torch\nfrom model.model import MnistModel\n\n"
                                        "class Breaks(MnistModel):\n    def forward(self, x):\n"
                                        "        torch._dynamo.graph_break()\n        return super().forward(x)\n")
    config = _config(tmp_path, compile={"backend": "eager", "fullgraph": True})
    path = write_config(tmp_path, config)
    assert train.main(["-c", str(path), "--run-id", "broken", f"arch.type={tmp_path}/breaks.py:Breaks"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: torch.compile failed (") and err.endswith(
        "; set trainer.compile: false to train without it\n") and err.count("\n") == 1
    assert not list(run_dir(tmp_path, "broken").glob("*.pth")), "no checkpoint"


@pytest.mark.parametrize("value, expected", [
    ("fp16", "must be auto or one of 32, bf16-mixed, 16-mixed, not 'fp16' (did you mean '16-mixed'?)"),
    ("bf16", "must be auto or one of 32, bf16-mixed, 16-mixed, not 'bf16' (did you mean 'bf16-mixed'?)"),
])
def test_precision_misspellings_get_a_did_you_mean(tmp_path, capsys, value, expected):
    path = write_config(tmp_path, _config(tmp_path))
    assert train.main(["-c", str(path), f"trainer.precision={value}"]) == 2
    assert capsys.readouterr().err == f"error: override 'trainer.precision={value}': trainer.precision: {expected}\n"
    assert files_under(tmp_path) == [path]


def test_lightning_names_point_to_torchkilns(tmp_path, capsys):
    path = write_config(tmp_path, _config(tmp_path))
    assert train.main(["-c", str(path), "trainer.gradient_clip_val=1.0", "max_epochs=3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: override 'max_epochs=3': max_epochs: unknown top-level key (did you mean 'trainer.epochs'? that is "
        "torchkiln's name for it); if 'max_epochs' is your own key, declare it in trainer/options.py",
        "override 'trainer.gradient_clip_val=1.0': trainer.gradient_clip_val: unknown trainer option (did you mean "
        "'trainer.clip_grad_norm'? that is torchkiln's name for it); if 'trainer.gradient_clip_val' is your own key, "
        "declare it in trainer/options.py"]


def test_grad_norm_is_logged_at_log_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, "norm", _config(tmp_path, epochs=1, clip_grad_norm=1.0, log_step=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "saved/log/tiny/norm"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/grad_norm")] == [2, 4, 6]


class _SyncCounter:
    """Counts reads from tensors to the host (item, tolist, cpu, bool, float) outside the places allowed."""

    READS = ("item", "tolist", "cpu", "__bool__", "__float__")

    def __init__(self, monkeypatch):
        self.allowed, self.outside, self.training = 0, [], False
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, original))

    def _counted(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.training and not self.allowed:
                self.outside.append(name)
            return original(tensor, *args, **kwargs)

        return read

    def allow(self, cls, name, monkeypatch):
        """Reads inside cls.name are expected (logging steps, epoch ends, saves, data loading)."""
        original = getattr(cls, name)

        def allowed(*args, **kwargs):
            self.allowed += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.allowed -= 1

        monkeypatch.setattr(cls, name, allowed)


def test_no_host_sync_on_steps_that_do_not_log(tmp_path, monkeypatch):
    from base.base_data_loader import BatchStream
    from base.base_trainer import BaseTrainer

    counter = _SyncCounter(monkeypatch)
    fit = BaseTrainer.fit

    def counted_fit(self, *args, **kwargs):
        counter.training = True
        fit(self, *args, **kwargs)
        counter.training = False

    monkeypatch.setattr(BaseTrainer, "fit", counted_fit)
    for cls, name in [(BaseTrainer, "_log_step"), (BaseTrainer, "_epoch"), (BaseTrainer, "_finish"),
                      (BaseTrainer, "verified_state"), (BatchStream, "__next__")]:
        counter.allow(cls, name, monkeypatch)
    logged_steps = []
    log_step = BaseTrainer._log_step
    monkeypatch.setattr(BaseTrainer, "_log_step", lambda self, *args: (logged_steps.append(self.global_step),
                                                                        log_step(self, *args)))
    config = _config(tmp_path, epochs=2, log_step=10, tensorboard=True, clip_grad_norm=1.0)
    config["data_loader"]["args"]["limit"] = 704  # 20 batches per epoch
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "sync"]) == 0
    assert logged_steps == [10, 20, 30, 40]
    assert counter.outside == [], "every read-back happened on a logging step, at an epoch's end or in a save"


def test_checkpoint_steps_count_optimizer_steps_with_accumulation(tmp_path):
    run = _train(tmp_path, "acc", _config(tmp_path, epochs=2, accumulate_grad_batches=3, save_every_steps=2,
                                          lr_step="batch"))
    final = load(run / "checkpoint-last.pth")
    assert final["global_step"] == 2 * 3 and final["lr_scheduler"]["last_epoch"] == 6


def test_16_mixed_checkpoints_hold_the_scaler_and_checkpointer_saves_at_window_ends(tmp_path, monkeypatch):
    saved_at = []
    save_last = Checkpointer.save_last

    def record(self, state, wait=False):
        saved_at.append((state["batches_in_epoch"], state["global_step"]))
        return save_last(self, state, wait)

    monkeypatch.setattr(Checkpointer, "save_last", record)
    run = _train(tmp_path, "fp16", _config(tmp_path, epochs=1, precision="16-mixed", accumulate_grad_batches=3,
                                           save_every_steps=1))
    assert saved_at == [(3, 1), (6, 2), (7, 3), (0, 3)], "after each window, then the run's final state"
    assert set(load(run / "checkpoint-last.pth")["step"]["scaler"]) >= {"scale", "_growth_tracker"}
    assert os.path.exists(run / "model_best.pth")
