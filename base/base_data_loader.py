"""BaseDataLoader: seeded validation split and a data order that can be resumed at any batch."""
import inspect
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from utils.device import resolve_num_workers, resolve_pin_memory
from utils.errors import ConfigError


def derived_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, pass): the order of a pass depends on nothing else."""
    return (seed * 1_000_003 + epoch) % 2**63


class EpochSampler(Sampler[int]):
    """Indices in an order fixed by (seed, epoch) alone; `skip` drops the first samples of the pass without
    loading them, which is how a resumed run continues inside an epoch."""

    def __init__(self, indices: list[int], shuffle: bool, seed: int):
        self.indices, self.shuffle, self.seed = indices, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            order = torch.randperm(len(self.indices), generator=generator).tolist()
        else:
            order = range(len(self.indices))
        return (self.indices[i] for i in order[self.skip:])

    def __len__(self) -> int:
        return len(self.indices)


class BaseDataLoader(DataLoader):
    """pytorch-template's loader with its randomness made explicit: the split and every pass's order come
    from private generators seeded by the run's seed, never from the global RNG (which dropout uses)."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, validation_split: float | int = 0.0,
                 num_workers: int | str = "auto", collate_fn: Callable = default_collate,
                 pin_memory: bool | str = "auto", seed: int | None = None):
        self.seed = torch.initial_seed() if seed is None else seed  # train.py seeds torch before building
        train_indices, valid_indices = self._split(len(dataset), validation_split)
        workers = resolve_num_workers(num_workers)
        self.settings: dict[str, Any] = {
            "batch_size": batch_size, "num_workers": workers, "collate_fn": collate_fn,
            "pin_memory": resolve_pin_memory(pin_memory), "persistent_workers": workers > 0,
        }
        self.valid_sampler = EpochSampler(valid_indices, shuffle=False, seed=self.seed) if valid_indices else None
        self.n_samples = len(train_indices)
        super().__init__(dataset, sampler=EpochSampler(train_indices, shuffle, self.seed),
                         generator=torch.Generator(), **self.settings)

    def _split(self, n_samples: int, split: float | int) -> tuple[list[int], list[int]]:
        if split == 0:
            return list(range(n_samples)), []
        n_valid = split if isinstance(split, int) else int(n_samples * split)
        if isinstance(split, bool) or not 0 < n_valid < n_samples:
            raise ConfigError(f"data_loader.args.validation_split: {split!r} leaves no training or no validation "
                              f"data from {n_samples} samples; use a fraction in (0, 1) or a count below {n_samples}")
        order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[n_valid:], order[:n_valid]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Fix the order of pass `epoch` (and its workers' seeds), skipping batches already trained on."""
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)
        self.generator.manual_seed(derived_seed(self.seed, epoch))

    def split_validation(self, dataset: Dataset | None = None) -> DataLoader | None:
        """The held-out part in a fixed order, or None without a validation split. `dataset` is the same data
        with evaluation transforms, for loaders whose training transforms are random."""
        if self.valid_sampler is None:
            return None
        generator = torch.Generator().manual_seed(self.seed)  # worker seeds, kept off the global RNG
        return DataLoader(dataset or self.dataset, sampler=self.valid_sampler, generator=generator, **self.settings)


def split_loader_args(args: dict) -> tuple[dict, dict]:
    """(dataset args, loader args) of a data section whose `type` is a Dataset: BaseDataLoader's own
    parameters go to the loader that wraps it, the rest to the dataset."""
    loader_keys = set(inspect.signature(BaseDataLoader).parameters) - {"dataset"}
    dataset_args = {key: value for key, value in args.items() if key not in loader_keys}
    return dataset_args, {key: value for key, value in args.items() if key in loader_keys}


class BatchStream:
    """Batches from successive passes over a loader. Its state, the pass and the batches consumed in it, is
    all a checkpoint needs to continue a BaseDataLoader's order at the next batch, without loading the
    batches already trained on. Any other DataLoader is resumed inside a pass by re-creating the pass from
    the global RNG state it started with and re-reading the consumed batches: exact when the loader draws
    its order and worker seeds from that RNG (a plain DataLoader, shuffle or not, without persistent
    workers)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.exact = isinstance(loader, BaseDataLoader)
        self.pass_index, self.batches_done = 0, 0
        self._pass_rng: torch.Tensor | None = None
        self._iterator: Iterator | None = None

    def _start_pass(self) -> None:
        if self.exact:
            self.loader.set_epoch(self.pass_index, self.batches_done)
            self._iterator = iter(self.loader)
            return
        if self.batches_done == 0:
            self._pass_rng = torch.get_rng_state()
            self._iterator = iter(self.loader)
            return
        resumed_rng = torch.get_rng_state()
        if self._pass_rng is not None:
            torch.set_rng_state(self._pass_rng)
        self._iterator = iter(self.loader)
        for _ in range(self.batches_done):
            next(self._iterator)
        torch.set_rng_state(resumed_rng)

    def __next__(self) -> Any:
        while True:
            if self._iterator is None:
                self._start_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.batches_done == 0:
                    raise ConfigError("the training data loader yields no batches") from None
                self._iterator, self.pass_index, self.batches_done = None, self.pass_index + 1, 0
                continue
            self.batches_done += 1
            return batch

    def state_dict(self) -> dict:
        state = {"pass": self.pass_index, "batches_done": self.batches_done}
        return state if self.exact else {**state, "pass_rng": self._pass_rng}

    def load_state_dict(self, state: dict) -> None:
        self.pass_index, self.batches_done = state["pass"], state["batches_done"]
        self._pass_rng = state.get("pass_rng")
        self._iterator = None
