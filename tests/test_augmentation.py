"""Random augmentation in DataLoader workers is exact across resumes: each batch's draws depend on (run seed,
pass, the batch's samples) alone, whichever worker loads it and whatever num_workers."""
import pytest
import torch
from test_resume import MID, _reference
from test_train_step import _assert_equal_states

import train
from base import BaseDataLoader
from conftest import load, run_dir, tiny_config, write_config

AUGMENTED = [{"type": "RandomCrop", "args": {"size": 28, "padding": 2}}, {"type": "RandomHorizontalFlip"},
             {"type": "RandomRotation", "args": {"degrees": 10}}, {"type": "ToTensor"}]


def _augmented(tmp_path, workers, **trainer):
    config = tiny_config(tmp_path, **trainer)
    config["data_loader"]["args"].update(transforms=AUGMENTED, num_workers=workers)
    return config


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", ["checkpoint-epoch1.pth", MID], ids=["epoch-1", "mid-epoch-2"])
def test_augmented_runs_resume_bit_identically(tmp_path, monkeypatch, workers, stop_at):
    import test_resume

    monkeypatch.setattr(test_resume, "tiny_config", lambda path, **options: _augmented(path, workers, **options))
    reference = _reference(tmp_path, workers)
    assert train.main(["-r", str(reference / stop_at), "--run-id", "resumed"]) == 0
    _assert_equal_states(load(reference / "checkpoint-epoch3.pth"),
                         load(run_dir(tmp_path, "resumed") / "checkpoint-epoch3.pth"))


def test_workers_do_not_change_the_weights(tmp_path):
    finals = []
    for workers in (0, 2):
        path = write_config(tmp_path, _augmented(tmp_path, workers), f"w{workers}.yaml")
        assert train.main(["-c", str(path), "--run-id", f"w{workers}"]) == 0
        finals.append(load(run_dir(tmp_path, f"w{workers}") / "checkpoint-last.pth"))
    _assert_equal_states(*finals)


class _Noise(torch.utils.data.Dataset):
    """An augmentation stand-in: each sample is its index plus torch, numpy and python random draws."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        import random

        import numpy as np
        return torch.tensor([index + torch.rand(()).item(), np.random.rand(), random.random()])


def _draws(seed, epoch, workers, batch_size=4):
    loader = BaseDataLoader(_Noise(), batch_size, shuffle=True, num_workers=workers, seed=seed)
    loader.set_epoch(epoch)
    batches = torch.cat(list(loader))
    return batches[batches[:, 0].floor().argsort()]  # by sample index, whatever the order


def test_draws_depend_on_seed_pass_and_batch_only():
    assert torch.equal(_draws(1, 0, 0), _draws(1, 0, 2)), "the same whichever worker loads the sample"
    assert not torch.equal(_draws(1, 0, 0), _draws(2, 0, 0)), "another seed, other augmentations"
    assert not torch.equal(_draws(1, 0, 0), _draws(1, 1, 0)), "another pass, other augmentations"
    assert not torch.equal(_draws(1, 0, 0), _draws(1, 0, 0, batch_size=3)), "other batches, other draws"
    state = torch.get_rng_state()
    _draws(1, 0, 0)
    assert torch.equal(state, torch.get_rng_state()), "loading in the main process leaves dropout's RNG alone"
