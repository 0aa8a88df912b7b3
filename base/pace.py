"""Where an epoch's training time goes: samples per second, the share spent waiting for the next batch (the
DataLoader not keeping up), and on request a torch.profiler trace of a few steps. Host clocks only: nothing
here synchronizes the GPU, so on CUDA the data wait is the time the loop stood still for data, and the rate
is exact over an epoch (its end waits for the GPU when the metrics are read)."""

import logging
import sys
import time
from typing import Any, Iterator

import torch

from utils import distributed

logger = logging.getLogger(__name__)


class Pace:
    """Times one epoch's batches. `profile_steps` > 0: the first epoch trained records that many steps (after
    one to skip and one to warm up) into `trace_dir` as a trace TensorBoard's profiler or Perfetto opens."""

    def __init__(self, profile_steps: int = 0, interval: float = 0.0):
        self.profile_steps, self.interval = profile_steps, interval
        self.samples, self.waited, self.started, self.seconds = 0, 0.0, 0.0, 0.0
        self._profiler: Any = None
        self._label, self._batches, self._done, self._loss, self._reported = "", 0, 0, None, 0.0

    def start(self, run: Any = None, label: str = "", batches: int = 0, metrics: Any = None) -> None:
        """A new epoch of `batches` batches, in `run` (its log directory gets the trace). Where the console is
        not a terminal (a pipe, Slurm's log) and an interval is set, a line `label  step i/n  loss
        samples/s  eta` every `interval` seconds, the loss read from this rank's `metrics` then (one host
        sync per line, no collective)."""
        self.samples, self.waited, self.started = 0, 0.0, time.perf_counter()
        self._label, self._batches, self._done, self._reported = label, batches, 0, self.started
        piped = self.interval and metrics is not None and not sys.stdout.isatty()
        self._loss = (lambda: metrics.tracker.local_mean("loss")) if piped else None
        trace_dir = run.logs / "profile" if run is not None and distributed.is_main() else None
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
        now = time.perf_counter()
        self.waited += now - before
        self.samples += _samples_in(batch)
        if self._loss is not None and self._done and now - self._reported >= self.interval:
            self._reported = now
            logger.info("%s", self._progress(now))
        self._done += 1
        return batch

    def _progress(self, now: float) -> str:
        """`epoch 3/8  step 120/469  loss 0.2311  2,345/s  eta 1m 12s`: the piped console's progress line."""
        elapsed = now - self.started
        left = elapsed / self._done * (self._batches - self._done)
        loss = self._loss()
        shown = f"  loss {loss:.4g}" if loss is not None else ""
        return (
            f"{self._label}  step {self._done}/{self._batches}{shown}  {self.samples / elapsed:,.0f}/s  "
            f"eta {_duration(left)}"
        )

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


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _samples_in(batch: Any) -> int:
    """The batch's size: the length of its first tensor (inputs first in a (data, target) batch)."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _samples_in(batch[0])
    if isinstance(batch, dict) and batch:
        return _samples_in(next(iter(batch.values())))
    return 0
