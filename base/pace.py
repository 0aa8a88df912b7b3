"""Where an epoch's training time goes: samples per second, the share spent waiting for the next batch (the
DataLoader not keeping up), and on request a torch.profiler trace of a few steps. Host clocks only: nothing
here synchronizes the GPU, so on CUDA the data wait is the time the loop stood still for data, and the rate
is exact over an epoch (its end waits for the GPU when the metrics are read)."""

import time
from pathlib import Path
from typing import Any, Iterator

import torch


class Pace:
    """Times one epoch's batches. `profile_steps` > 0: the first epoch trained records that many steps (after
    one to skip and one to warm up) into `trace_dir` as a trace TensorBoard's profiler or Perfetto opens."""

    def __init__(self, profile_steps: int = 0):
        self.profile_steps = profile_steps
        self.samples, self.waited, self.started, self.seconds = 0, 0.0, 0.0, 0.0
        self._profiler: Any = None

    def start(self, trace_dir: Path | None) -> None:
        self.samples, self.waited, self.started = 0, 0.0, time.perf_counter()
        if self.profile_steps and trace_dir is not None:
            schedule = torch.profiler.schedule(wait=1, warmup=1, active=self.profile_steps, repeat=1)
            self._profiler = torch.profiler.profile(
                schedule=schedule,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
                record_shapes=True,
            )
            self._profiler.start()
            self.profile_steps = 0  # once per run

    def next_batch(self, batches: Iterator) -> Any:
        """The next batch, its wait timed and its samples counted; one profiler step per batch."""
        if self._profiler is not None:
            self._profiler.step()
        before = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - before
        self.samples += _samples_in(batch)
        return batch

    def finish(self) -> None:
        self.seconds = time.perf_counter() - self.started
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None

    def summary(self) -> str:
        """`1,234/s data 12%`: training samples per second and the share of training time spent waiting."""
        if not self.samples or self.seconds <= 0:
            return ""
        return f"{self.samples / self.seconds:,.0f}/s data {self.waited / self.seconds:.0%}"


def _samples_in(batch: Any) -> int:
    """The batch's size: the length of its first tensor (inputs first in a (data, target) batch)."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _samples_in(batch[0])
    if isinstance(batch, dict) and batch:
        return _samples_in(next(iter(batch.values())))
    return 0
