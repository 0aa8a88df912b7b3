"""Random augmentation in DataLoader workers is exact across resumes: each batch's draws depend on (run seed,
pass, the batch's samples) alone, whichever worker loads it and whatever num_workers."""

import functools

import numpy as np
import pytest
import torch
from test_resume import MID, _reference
from test_train_step import _assert_equal_states

import train
from base import BaseDataLoader
from conftest import load, run_dir, tiny_config, write_config

AUGMENTED = [
    {"type": "RandomCrop", "args": {"size": 28, "padding": 2}},
    {"type": "RandomHorizontalFlip"},
    {"type": "RandomRotation", "args": {"degrees": 10}},
    {"type": "ToTensor"},
]


def _augmented(tmp_path, workers, **trainer):
    config = tiny_config(tmp_path, **trainer)
    config["data_loader"]["args"].update(transforms=AUGMENTED, num_workers=workers)
    return config


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", ["checkpoint-epoch1.pth", MID], ids=["epoch-1", "mid-epoch-2"])
def test_augmented_runs_resume_bit_identically(tmp_path, monkeypatch, workers, stop_at):
    import test_resume

    monkeypatch.setattr(
        test_resume, "tiny_config", lambda path, **options: _augmented(path, workers, **options)
    )
    reference = _reference(tmp_path, workers)
    assert train.main(["-r", str(reference / stop_at), "--run-id", "resumed"]) == 0
    _assert_equal_states(
        load(reference / "checkpoint-epoch3.pth"),
        load(run_dir(tmp_path, "resumed") / "checkpoint-epoch3.pth"),
    )


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


class _GaussNoise(_Noise):
    """Normal draws from each RNG: numpy's and python's legacy generators cache every second Gaussian."""

    def __getitem__(self, index):
        import random

        import numpy as np

        return torch.tensor([index + torch.randn(()).item(), np.random.normal(), random.gauss(0, 1)])


def _main_process_draws(load_between):
    """A training loop's own draws (a mixup's beta, noise), with or without a pass of loading before each."""
    import random

    import numpy as np

    loader = BaseDataLoader(_GaussNoise(), 4, shuffle=True, num_workers=0, seed=1)
    np.random.seed(5), random.seed(5), torch.manual_seed(5)
    draws, batches = [], []
    for step in range(6):
        if load_between:
            batches.append(torch.cat(list(loader)))
        draws += [np.random.normal(), np.random.beta(0.4, 0.4), random.gauss(0, 1), torch.randn(()).item()]
        draws += [np.random.randint(1000)] if step % 2 else []
    return draws, batches


@pytest.mark.parametrize("raw_key", [True, False], ids=["raw-bytes", "get-state"])
def test_loading_in_the_main_process_leaves_its_streams_and_gaussian_caches_alone(monkeypatch, raw_key):
    from base import base_data_loader
    from utils import seeding

    assert seeding._NumpyRNG.layout_holds(np.random.mtrand._rand._bit_generator), "copied as raw bytes here"
    assert seeding._PythonRNG.layout_holds(), "copied as raw bytes here"
    monkeypatch.setattr(seeding._NumpyRNG, "layout_holds", classmethod(lambda cls, generator: raw_key))
    monkeypatch.setattr(seeding._PythonRNG, "layout_holds", classmethod(lambda cls: raw_key))
    base_data_loader._main_process_rngs.cache_clear()
    monkeypatch.setattr(base_data_loader, "_main_process_rngs", functools.cache(seeding.MainProcessRNGs))
    untouched, _ = _main_process_draws(load_between=False)
    draws, batches = _main_process_draws(load_between=True)
    assert draws == untouched, "the loop's draws are those it makes without loading in between"
    in_workers = torch.cat(list(BaseDataLoader(_GaussNoise(), 4, shuffle=True, num_workers=2, seed=1)))
    for batch in batches:  # a Gaussian the main process had cached does not leak into a batch
        assert torch.equal(batch, in_workers)


def test_a_replaced_numpy_bit_generator_is_put_back_too():
    loader = BaseDataLoader(_GaussNoise(), 4, shuffle=True, num_workers=0, seed=1)
    list(loader)  # the raw copy is set up for the generator numpy had then
    original = np.random.get_bit_generator()
    try:
        np.random.set_bit_generator(np.random.MT19937(9))
        list(loader)
        assert np.random.random(3).tolist() == np.random.RandomState(np.random.MT19937(9)).random(3).tolist()
    finally:
        np.random.set_bit_generator(original)


class _LoadsWhileLoading(_GaussNoise):
    """A sample that loads a batch of another loader in the main process (a nested pipeline)."""

    def __init__(self):
        self.inner = BaseDataLoader(_GaussNoise(), 2, shuffle=True, num_workers=0, seed=2)

    def __getitem__(self, index):
        return super().__getitem__(index) + next(iter(self.inner)).sum()


def test_loading_nested_in_loading_puts_the_main_process_streams_back():
    import random

    loader = BaseDataLoader(_LoadsWhileLoading(), 4, shuffle=True, num_workers=0, seed=1)
    streams = []
    for nested_loading in (False, True):
        np.random.seed(5), random.seed(5), torch.manual_seed(5)
        np.random.normal()  # a cached Gaussian
        if nested_loading:
            list(loader)
        streams.append(
            [np.random.normal(), random.gauss(0, 1), torch.randn(()).item(), np.random.randint(1000)]
        )
    assert streams[0] == streams[1]


class _SometimesNumpy(_Noise):
    """Draws from numpy only for the last samples: a first batch without numpy draws tells nothing."""

    drawn = "numpy"

    def __getitem__(self, index):
        import random

        return torch.tensor(
            [index + torch.rand(()).item(), np.random.normal() if index >= 8 else 0.0, random.random()]
        )


class _SometimesPython(_Noise):
    """Draws from python's random only for the last samples."""

    drawn = "python"

    def __getitem__(self, index):
        import random

        return torch.tensor(
            [index + torch.rand(()).item(), np.random.rand(), random.random() if index >= 8 else 0.0]
        )


class _OneGaussian(_Noise):
    """One python Gaussian in the whole pass: unseeded, it would be the main process's cached one, which
    leaves python's Mersenne Twister as it was."""

    drawn = "python"

    def __getitem__(self, index):
        import random

        return torch.tensor([index + torch.rand(()).item(), random.gauss(0, 1) if index == 8 else 0.0])


@pytest.mark.parametrize("cached_gaussian", [False, True])
@pytest.mark.parametrize("dataset", [_SometimesNumpy, _SometimesPython, _OneGaussian, _GaussNoise])
def test_each_generator_is_seeded_in_the_main_process_whenever_the_pipeline_draws_from_it(
    dataset, cached_gaussian
):
    import random

    untouched, loaded = [], []
    for streams, loading in ((untouched, False), (loaded, True)):
        loader = BaseDataLoader(dataset(), 4, shuffle=False, num_workers=0, seed=1)
        np.random.seed(5), random.seed(5), torch.manual_seed(5)
        if cached_gaussian:  # the main process holds a cached Gaussian of each while batches load
            np.random.normal(), random.gauss(0, 1)
        batches = torch.cat(list(loader)) if loading else None
        streams += [
            np.random.normal(),
            np.random.normal(),
            random.gauss(0, 1),
            random.gauss(0, 1),
            random.random(),
            torch.rand(()).item(),
        ]
    assert loaded == untouched, "the main process's draws are as without loading"
    in_workers = torch.cat(list(BaseDataLoader(dataset(), 4, shuffle=False, num_workers=2, seed=1)))
    assert torch.equal(batches, in_workers), "each batch as a worker loads it, seeded where drawn from"
    assert loader.dataset.draws_from[getattr(dataset, "drawn", "numpy")] is True


def test_a_pipeline_without_numpy_draws_leaves_numpy_unseeded_after_its_first_batch():
    class TorchOnly(_Noise):
        def __getitem__(self, index):
            return torch.tensor([index + torch.rand(()).item()])

    loader = BaseDataLoader(TorchOnly(), 4, shuffle=False, num_workers=0, seed=1)
    list(loader)
    assert loader.dataset.draws_from == {"python": False, "numpy": False}
