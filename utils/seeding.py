"""Seeding and RNG state: what makes two runs, or a run and its resumption, bit-identical."""

import ctypes
import os
import random
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


def seed_batch(seed: int, numpy: bool = True) -> None:
    """Seed the global CPU RNGs a batch is loaded with (numpy's unless told not to)."""
    random.seed(seed)
    if numpy:
        np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays the model's


class MainProcessRNGs:
    """Loads a batch in the main process under its own seed, then puts the global CPU RNGs (python's,
    numpy's, torch's) back, so that loading leaves dropout's and the user's streams as they were.

    What it costs is kept small. numpy's get_state()/set_state() copy its 624-word key through Python (50 us
    a pair); its legacy generator is copied as raw bytes through its bit generator's ctypes interface
    instead (about 1 us). Its cached Gaussian (legacy normal draws come in pairs) lies outside those bytes,
    so get_state() still saves it whenever it may be set: unless the key is exactly as it was put back with
    an empty cache, which proves nothing was drawn since. And a pipeline whose first batch drew nothing from
    numpy (torchvision's transforms draw from torch) skips numpy's seeding and putting back, about 50 us a
    batch on a busy CPU; each such batch is checked, and one that drew from numpy after all is loaded again
    with numpy seeded, as a worker loads it."""

    def __init__(self) -> None:
        self._numpy: _NumpyKey | None = None  # the raw copy, for the global generator checked last
        self._checked: Any = None  # that generator (np.random.set_bit_generator may replace it)
        self._numpy_known = b""  # the raw key last put back with an empty Gaussian cache

    def load(self, seed: int, load: Callable[[], Any], pipeline: Any) -> Any:
        """load() under `seed`. `pipeline.draws_numpy` is whether the pipeline draws from numpy: None until
        its first batch in this process tells."""
        saved = self.save()
        _, _, key, numpy_state = saved
        raw, numpy_touched = self._numpy, True
        try:
            if pipeline.draws_numpy is False and key and not _has_gauss(numpy_state):
                seed_batch(seed, numpy=False)
                samples = load()
                if raw.read() == key:
                    numpy_touched = False
                    return samples
                pipeline.draws_numpy = True
            seed_batch(seed)
            seeded = raw.read() if raw is not None else b""
            samples = load()
            if not pipeline.draws_numpy and seeded:
                pipeline.draws_numpy = raw.read() != seeded
            return samples
        finally:
            self.restore(saved, numpy=numpy_touched)

    def save(self) -> tuple:
        """(python's state, torch's, numpy's raw key or b"", numpy's get_state() or None where the raw key is
        all there is: nothing drawn since it was put back with an empty Gaussian cache)."""
        raw = self._raw_numpy()
        key = raw.read() if raw is not None else b""
        numpy_state = None if key and key == self._numpy_known else np.random.get_state()
        return random.getstate(), torch.get_rng_state(), key, numpy_state

    def restore(self, saved: tuple, numpy: bool = True) -> None:
        """Put back what save() returned (numpy's state only if `numpy`)."""
        python_state, torch_state, key, numpy_state = saved
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
        if not numpy:
            return
        if not key or _has_gauss(numpy_state):
            np.random.set_state(numpy_state)  # with its cached Gaussian
            self._numpy_known = b""
            return
        np.random.seed(0)  # empties the Gaussian cache; the key is overwritten next
        self._numpy.write(key)
        self._numpy_known = key

    def _raw_numpy(self) -> "_NumpyKey | None":
        generator = np.random.mtrand._rand._bit_generator
        if generator is not self._checked:
            self._checked, self._numpy_known = generator, b""
            self._numpy = _NumpyKey(generator) if _NumpyKey.layout_holds(generator) else None
        return self._numpy


def _has_gauss(numpy_state: tuple | None) -> bool:
    """Whether a saved get_state() holds a cached Gaussian (None: a raw key alone, saved only without one)."""
    return numpy_state is not None and bool(numpy_state[3])


class _NumpyKey:
    """The raw state of an MT19937 (624 uint32 words, then the int position), read and written through the
    address numpy's ctypes interface publishes."""

    WORDS = 624
    SIZE = WORDS * 4 + 4

    def __init__(self, bit_generator: np.random.MT19937) -> None:
        self._address = bit_generator.ctypes.state_address
        self._buffer = ctypes.create_string_buffer(self.SIZE)

    def read(self) -> bytes:
        ctypes.memmove(self._buffer, self._address, self.SIZE)
        return self._buffer.raw

    def write(self, key: bytes) -> None:
        ctypes.memmove(self._address, key, self.SIZE)

    @classmethod
    def layout_holds(cls, bit_generator: Any) -> bool:
        """Whether `bit_generator` is an MT19937 whose state is the struct assumed here (else numpy's
        get_state() is used)."""
        if not isinstance(bit_generator, np.random.MT19937):
            return False
        probe = np.random.MT19937(20_240_601)
        probe.random_raw(7)
        state = probe.state["state"]
        expected = state["key"].astype(np.uint32).tobytes() + int(state["pos"]).to_bytes(4, sys.byteorder)
        return cls(probe).read() == expected
