"""BaseDataLoader: seeded validation split and a data order that can be resumed at any batch."""

import functools
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from utils import distributed
from utils.device import resolve_num_workers, resolve_pin_memory
from utils.errors import ConfigError
from utils.seeding import MainProcessRNGs, derived_seed, seed_batch
from utils.workers import shielded_iter


class SeededSamples(Dataset):
    """Wraps a BaseDataLoader's dataset so that every random draw made while loading a batch (python's,
    numpy's and torch's global RNGs: what torchvision's random transforms use) depends on (run seed, pass,
    the batch's first sample index and size) alone. A batch is loaded whole by one worker and the sampler
    fixes its samples, so its augmentation is the same whichever worker loads it, whatever num_workers, and
    whether or not the run was resumed; seeding once per batch rather than per sample keeps the cost per
    batch. The draws change with the batch composition, i.e. with batch_size or the number of DDP processes.
    In the main process the global RNGs are put back after each batch, so that loading does not disturb
    dropout's stream, and python's and numpy's are seeded only for a pipeline seen to draw from them (a batch
    that draws from one unseeded is loaded again: utils/seeding.MainProcessRNGs). A dataset that draws from
    its own generator keeps doing so (pass per_sample_seeds=False to BaseDataLoader to leave the RNGs
    alone)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        # whether loading draws from python's and numpy's generators: learnt from the main process's batches
        self.draws_from: dict[str, bool | None] = {"python": None, "numpy": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        """The user's dataset attributes stay reachable as loader.dataset.x."""
        if name in ("dataset", "seed", "draws_from"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        pass_index, first = keys[0]
        seed = (derived_seed(self.seed, pass_index) * 1_000_033 + first * 1_031 + len(keys)) % 2**63
        samples = functools.partial(self._load, keys)
        if torch.utils.data.get_worker_info() is None:  # the main process: its RNGs are put back after
            return _main_process_rngs().load(seed, samples, self)
        seed_batch(seed)
        return samples()

    def _load(self, keys: list[tuple[int, int]]) -> list:
        return [self.dataset[index] for _, index in keys]


@functools.cache
def _main_process_rngs() -> MainProcessRNGs:
    """One for every loader (it remembers which numpy key it last put back), made on first use so that
    datasets sent to workers carry none."""
    return MainProcessRNGs()


def unseeded(dataset: Dataset) -> Dataset:
    """The user's dataset inside torchkiln's per-sample seeding wrapper (or the dataset itself)."""
    return dataset.dataset if isinstance(dataset, SeededSamples) else dataset


class EpochSampler(Sampler[int]):
    """Indices in an order fixed by (seed, epoch) alone. Under DDP the order is cut into global batches of
    batch_size x world_size and each rank takes its slice of each, so that N processes see, step by step,
    the samples one process with an N times larger batch sees. A last global batch is split as evenly as
    the ranks allow (it is dropped only when it holds fewer samples than there are ranks, since every rank
    must take part in each step). `skip` drops the first samples of the pass without loading them: how a
    resumed run continues inside an epoch, whatever the world size it ran with before."""

    def __init__(
        self, indices: list[int], shuffle: bool, seed: int, batch_size: int = 1, keyed: bool = False
    ):
        self.indices, self.shuffle, self.seed, self.batch_size = indices, shuffle, seed, batch_size
        self.keyed = keyed  # yield (pass, index) for SeededSamples
        self.epoch, self.skip = 0, 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            order = torch.randperm(len(self.indices), generator=generator).tolist()
        else:
            order = list(range(len(self.indices)))
        order = order[self.skip :]
        if self.world > 1:
            order = [
                i
                for start in range(0, len(order), self.global_batch)
                for i in self._slice(order[start : start + self.global_batch])
            ]
        if self.keyed:
            return ((self.epoch, self.indices[i]) for i in order)
        return (self.indices[i] for i in order)

    def _slice(self, chunk: list[int]) -> list[int]:
        if len(chunk) < self.world:
            return []
        bounds = [len(chunk) * r // self.world for r in range(self.world + 1)]
        return chunk[bounds[self.rank] : bounds[self.rank + 1]]

    def shard_weight(self, batch_in_pass: int) -> float:
        """This rank's share of a step's samples times the world size: the loss weight under which DDP's
        gradient average equals the mean over the global batch, an uneven last one included."""
        if self.world == 1:
            return 1.0
        start = batch_in_pass * self.global_batch
        size = min(self.global_batch, len(self.indices) - start)
        return self.world * len(self._slice(list(range(size)))) / size

    def __len__(self) -> int:
        if self.world == 1:
            return len(self.indices)
        full, tail = divmod(len(self.indices), self.global_batch)
        return full * self.batch_size + len(self._slice(list(range(tail))))


class BaseDataLoader(DataLoader):
    """pytorch-template's loader with its randomness made explicit: the split and every pass's order come
    from private generators seeded by the run's seed, never from the global RNG (which dropout uses)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        validation_split: float | int = 0.0,
        num_workers: int | str = "auto",
        collate_fn: Callable = default_collate,
        pin_memory: bool | str = "auto",
        seed: int | None = None,
        per_sample_seeds: bool = True,
        timeout: float = 0,
    ):
        self.seed = torch.initial_seed() if seed is None else seed  # train.py seeds torch before building
        self.per_sample_seeds = per_sample_seeds
        train_indices, valid_indices = self._split(len(dataset), validation_split)
        workers = resolve_num_workers(num_workers)
        self.settings: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": workers,
            "collate_fn": collate_fn,
            "pin_memory": resolve_pin_memory(pin_memory),
            "persistent_workers": workers > 0,
            "timeout": timeout if workers > 0 else 0,  # seconds a batch may take from a worker (0: no limit)
        }
        keyed = per_sample_seeds
        self.valid_sampler = (
            EpochSampler(valid_indices, False, self.seed, batch_size, keyed) if valid_indices else None
        )
        self.n_samples = len(train_indices)
        train_sampler = EpochSampler(train_indices, shuffle, self.seed, batch_size, keyed)
        super().__init__(
            self._seeded(dataset), sampler=train_sampler, generator=torch.Generator(), **self.settings
        )
        for sampler in (self.sampler, self.valid_sampler):
            if sampler is not None:
                sampler.shard(distributed.rank(), distributed.world_size())

    def _seeded(self, dataset: Dataset) -> Dataset:
        return SeededSamples(dataset, self.seed) if self.per_sample_seeds else dataset

    def _split(self, n_samples: int, split: float | int) -> tuple[list[int], list[int]]:
        if split == 0:
            return list(range(n_samples)), []
        n_valid = split if isinstance(split, int) else int(n_samples * split)
        if isinstance(split, bool) or not 0 < n_valid < n_samples:
            raise ConfigError(
                f"data_loader.args.validation_split: {split!r} leaves no training or no validation "
                f"data from {n_samples} samples; use a fraction in (0, 1) or a count below {n_samples}"
            )
        order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[n_valid:], order[:n_valid]

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        """Fix the order of pass `epoch` (and its workers' seeds), skipping the samples already trained on."""
        self.sampler.set_epoch(epoch, skip_samples)
        self.generator.manual_seed(derived_seed(self.seed, epoch))

    def split_validation(self, dataset: Dataset | None = None) -> DataLoader | None:
        """The held-out part in a fixed order, or None without a validation split. `dataset` is the same data
        with evaluation transforms, for loaders whose training transforms are random."""
        if self.valid_sampler is None:
            return None
        generator = torch.Generator().manual_seed(self.seed)  # worker seeds, kept off the global RNG
        dataset = self._seeded(dataset) if dataset is not None else self.dataset
        return DataLoader(dataset, sampler=self.valid_sampler, generator=generator, **self.settings)


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
        self.resume_samples: int | None = None  # samples consumed, when a checkpoint's global batch differed
        self.share = 1.0  # the last batch's share of its global batch under DDP (EpochSampler.shard_weight)
        self._pass_rng: torch.Tensor | None = None
        self._iterator: Iterator | None = None

    def _start_pass(self) -> None:
        if self.exact:
            skip = self.batches_done * self.loader.sampler.global_batch
            self.loader.set_epoch(
                self.pass_index, self.resume_samples if self.resume_samples is not None else skip
            )
            self.resume_samples = None
            self._iterator = shielded_iter(self.loader)
            return
        if self.batches_done == 0:
            self._pass_rng = torch.get_rng_state()
            self._iterator = shielded_iter(self.loader)
            return
        resumed_rng = torch.get_rng_state()
        if self._pass_rng is not None:
            torch.set_rng_state(self._pass_rng)
        self._iterator = shielded_iter(self.loader)
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
            if self.exact:
                self.share = self.loader.sampler.shard_weight(self.batches_done)
            self.batches_done += 1
            return batch

    def state_dict(self) -> dict:
        state = {"pass": self.pass_index, "batches_done": self.batches_done}
        return state if self.exact else {**state, "pass_rng": self._pass_rng}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the next batch of the pass. A checkpoint written with another global batch (another
        world size) sets `resume_samples` after this, so that the pass continues at the next unseen sample."""
        self.pass_index, self.batches_done = state["pass"], state["batches_done"]
        self.resume_samples = None
        self._pass_rng = state.get("pass_rng")
        self._iterator = None


class FirstBatches:
    """The first `count` batches of a loader, as an iterable with a length: a dry run's validation and test
    passes (train.py --fast-dev-run)."""

    def __init__(self, loader: Any, count: int):
        self.loader, self.count = loader, count
        self.dataset, self.batch_size = loader.dataset, getattr(loader, "batch_size", None)
        self.num_workers, self.pin_memory = loader.num_workers, loader.pin_memory
        self.persistent_workers = getattr(loader, "persistent_workers", False)

    def __iter__(self) -> Iterator:
        for index, batch in enumerate(self.loader):
            if index >= self.count:
                return
            yield batch

    def __len__(self) -> int:
        return min(self.count, len(self.loader))
