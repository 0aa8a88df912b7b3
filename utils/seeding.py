"""Seeding and RNG state: what makes two runs, or a run and its resumption, bit-identical."""

import ctypes
import os
import random
import struct
import sys
from typing import Any, Callable

import numpy as np
import torch


def derived_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, pass): the order of a pass depends on nothing else."""
    return (seed * 1_000_003 + epoch) % 2**63


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (which seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """Trade speed for reproducibility on CUDA; CPU kernels used here are deterministic either way."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses otherwise
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic)


def rng_state() -> dict:
    """Every global RNG as plain data (lists and tensors), loadable with weights_only=True."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def seed_batch(seed: int) -> None:
    """Seed the global CPU RNGs a batch is loaded with in a worker."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays the model's


class MainProcessRNGs:
    """Loads a batch in the main process under its own seed, then puts the global CPU RNGs (python's,
    numpy's, torch's) back, so that loading leaves dropout's and the user's streams as they were.

    What it costs is kept small: it runs before every batch, when the loading has just pushed everything out
    of the CPU's caches. python's and numpy's Mersenne Twisters are copied as raw bytes (a memory copy)
    rather than through getstate()/get_state(), which build and parse 625 Python ints (about 30 us a pair
    each in the loop); python's cached Gaussian is an attribute, copied with them. numpy's legacy cached
    Gaussian lies outside its raw bytes, so get_state() still saves it whenever it may be set: unless the key
    is exactly as it was put back with an empty cache, which proves nothing was drawn since. And python and
    numpy are each seeded only for a pipeline seen to draw from them (torchvision's transforms draw from torch
    alone): each batch loaded without one is checked by its raw bytes, and a batch that drew from it after
    all is loaded again with every generator seeded, as a worker loads it."""

    def __init__(self) -> None:
        self.generators = (_PythonRNG(), _NumpyRNG())

    def load(self, seed: int, load: Callable[[], Any], pipeline: Any) -> Any:
        """load() under `seed`. `pipeline.draws_from[name]` says whether the pipeline draws from the python
        or numpy generator: None until a batch loaded with it seeded tells."""
        saved = self.save()
        _, states = saved
        draws = pipeline.draws_from
        skipped = [
            draws[rng.name] is False and rng.skippable(state) for rng, state in zip(self.generators, states)
        ]
        touched = None  # every generator, unless the batch is loaded with some provably untouched
        try:
            samples, drew = self._load_seeded(seed, load, draws, skipped, states)
            if not any(drew):
                touched = [not skip for skip in skipped]
                return samples
            for rng, drew_from in zip(self.generators, drew):
                draws[rng.name] = draws[rng.name] or drew_from
            samples, _ = self._load_seeded(seed, load, draws, [False] * len(skipped), states)  # as a worker
            return samples
        finally:
            self.restore(saved, touched)

    def _load_seeded(
        self, seed: int, load: Callable[[], Any], draws: dict, skipped: list[bool], states: list
    ) -> tuple[Any, list[bool]]:
        """load() with torch and every generator not skipped seeded; learns, for those not known to be drawn
        from, whether the pipeline drew from them. Returns the samples and, per skipped generator, whether it
        was drawn from all the same."""
        torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays the model's
        seeded = {}
        for rng, skip in zip(self.generators, skipped):
            if not skip:
                rng.seed(seed)
                seeded[rng.name] = rng.fingerprint() if draws[rng.name] is not True else None
        samples = load()
        drew = []
        for rng, skip, (before, _) in zip(self.generators, skipped, states):
            if skip:
                drew.append(rng.fingerprint() != before)
                continue
            if seeded[rng.name] is not None:
                draws[rng.name] = rng.fingerprint() != seeded[rng.name]
            drew.append(False)
        return samples, drew

    def save(self) -> tuple:
        """(torch's state, each generator's saved state): what restore() puts back."""
        return torch.random.default_generator.get_state(), [rng.save() for rng in self.generators]

    def restore(self, saved: tuple, touched: list[bool] | None = None) -> None:
        """Put back what save() returned (of python and numpy only those `touched`)."""
        torch_state, states = saved
        torch.random.default_generator.set_state(torch_state)
        for rng, state, put_back in zip(self.generators, states, touched or [True] * len(states)):
            if put_back:
                rng.restore(state)


_MT_WORDS = 624
_MT_BYTES = 4 + _MT_WORDS * 4  # a Mersenne Twister's state as python's and numpy's C structs hold it


class _RawBytes:
    """A generator's state read and written as raw bytes, at the address where its C struct keeps them."""

    def __init__(self, address: int, size: int) -> None:
        self._view = memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")

    def read(self) -> bytes:
        return self._view.tobytes()

    def write(self, state: bytes) -> None:
        self._view[:] = state


class _PythonRNG:
    """python's global `random`: its C state (the position, then 624 words) as raw bytes with its cached
    Gaussian (`gauss_next`, an attribute); getstate()/setstate() where the struct is not the one assumed
    here (another Python implementation or build)."""

    name = "python"

    def __init__(self) -> None:
        self._instance = random.random.__self__  # what the module's functions are bound to
        self._raw = _RawBytes(self._address(self._instance), _MT_BYTES) if self.layout_holds() else None

    def fingerprint(self) -> Any:
        """Changes with every draw; None without raw access."""
        return (self._raw.read(), self._instance.gauss_next) if self._raw is not None else None

    def save(self) -> tuple:
        """(fingerprint, None), or (None, getstate())."""
        fingerprint = self.fingerprint()
        return fingerprint, None if fingerprint is not None else random.getstate()

    def skippable(self, state: tuple) -> bool:
        """Whether a draw made unseeded can be told (a fingerprint is all the state there is)."""
        return state[0] is not None

    def seed(self, seed: int) -> None:
        random.seed(seed)

    def restore(self, state: tuple) -> None:
        fingerprint, full = state
        if fingerprint is None:
            random.setstate(full)
            return
        self._raw.write(fingerprint[0])
        self._instance.gauss_next = fingerprint[1]

    @staticmethod
    def _address(instance: random.Random) -> int:
        return id(instance) + object.__basicsize__  # CPython: the struct follows the object header

    @classmethod
    def layout_holds(cls) -> bool:
        """Whether a `random.Random` is CPython's struct assumed here (else getstate() is used)."""
        import _random

        if (
            sys.implementation.name != "cpython"
            or _random.Random.__basicsize__ < object.__basicsize__ + _MT_BYTES
        ):
            return False
        probe = random.Random(20_240_601)
        probe.getrandbits(7 * 32)
        _, words, _ = probe.getstate()
        expected = struct.pack(f"=i{_MT_WORDS}I", words[-1], *words[:-1])
        return _RawBytes(cls._address(probe), _MT_BYTES).read() == expected


class _NumpyRNG:
    """numpy's global legacy generator: its MT19937 key and position as raw bytes, through the address
    numpy's ctypes interface publishes; get_state() for what lies outside them (its cached Gaussian) or
    another bit generator. A generator replaced with np.random.set_bit_generator is noticed."""

    name = "numpy"

    def __init__(self) -> None:
        self._legacy = np.random.mtrand._rand  # the global RandomState: np.random.seed and the draws use it
        self._raw: _RawBytes | None = None  # for the generator it held when checked last
        self._checked: Any = None  # that generator
        self._known = b""  # the raw key last put back with an empty Gaussian cache

    def fingerprint(self) -> bytes | None:
        raw = self._raw_key()
        return raw.read() if raw is not None else None

    def save(self) -> tuple:
        """(raw key or None, get_state() or None where the raw key is all there is: nothing drawn since it
        was put back with an empty Gaussian cache)."""
        key = self.fingerprint()
        return key, None if key is not None and key == self._known else np.random.get_state()

    def skippable(self, state: tuple) -> bool:
        """Whether a draw made unseeded can be told: a raw key, and no cached Gaussian beside it."""
        key, full = state
        return key is not None and not _cached_gaussian(full)

    def seed(self, seed: int) -> None:
        np.random.seed(seed % 2**32)

    def restore(self, state: tuple) -> None:
        key, full = state
        if key is None or _cached_gaussian(full):
            np.random.set_state(full)  # with its cached Gaussian
            self._known = b""
            return
        np.random.seed(0)  # empties the Gaussian cache; the key is overwritten next
        self._raw.write(key)
        self._known = key

    def _raw_key(self) -> _RawBytes | None:
        generator = self._legacy._bit_generator
        if generator is not self._checked:
            self._checked, self._known = generator, b""
            self._raw = (
                _RawBytes(generator.ctypes.state_address, _MT_BYTES) if self.layout_holds(generator) else None
            )
        return self._raw

    @classmethod
    def layout_holds(cls, bit_generator: Any) -> bool:
        """Whether `bit_generator` is an MT19937 whose state is the struct assumed here (624 uint32 words,
        then the int position; else numpy's get_state() is used)."""
        if not isinstance(bit_generator, np.random.MT19937):
            return False
        probe = np.random.MT19937(20_240_601)
        probe.random_raw(7)
        state = probe.state["state"]
        expected = state["key"].astype(np.uint32).tobytes() + int(state["pos"]).to_bytes(4, sys.byteorder)
        return _RawBytes(probe.ctypes.state_address, _MT_BYTES).read() == expected


def _cached_gaussian(full: tuple | None) -> bool:
    """Whether a saved numpy get_state() holds a cached Gaussian (None: a raw key, saved without one)."""
    return full is not None and bool(full[3])
