"""The monitored metric: best value so far, improvement, early stop."""

import math
from typing import Any, Callable, Mapping

from utils.errors import TrainingError


class Monitor:
    """Decides 'improved' and 'stop early' from each epoch's log. `monitor` is (mode, metric), or None for
    off. Its state is the three attributes named in STATE, stored under the same names in checkpoints."""

    STATE = ("monitor_best", "monitor_best_epoch", "not_improved_count")
    # judge(epoch, value, best, best_epoch) -> why to stop now, or None: a sweep's pruner (sweeps/reporter.py)
    Judge = Callable[[int, float, float, "int | None"], "str | None"]

    def __init__(self, monitor: tuple[str, str] | None, early_stop: int):
        self.mode, self.metric = monitor if monitor else ("off", None)
        self.early_stop = early_stop
        self.monitor_best = math.inf if self.mode == "min" else -math.inf
        self.monitor_best_epoch: int | None = None
        self.not_improved_count = 0
        self.judge: Monitor.Judge | None = None
        self.stopped_by: str | None = None

    def update(self, log: dict[str, float]) -> bool:
        """Whether this epoch is the best so far."""
        if self.mode == "off":
            return False
        if self.metric not in log:
            raise TrainingError(
                f"trainer.monitor: '{self.metric}' is not in this epoch's log "
                f"({', '.join(log)}); monitor one of those"
            )
        value = log[self.metric]
        improved = value < self.monitor_best if self.mode == "min" else value > self.monitor_best
        if improved:
            self.monitor_best, self.monitor_best_epoch, self.not_improved_count = value, log.get("epoch"), 0
        else:
            self.not_improved_count += 1
        if self.judge is not None:
            self.stopped_by = self.judge(log.get("epoch"), value, self.monitor_best, self.monitor_best_epoch)
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stopped_by is not None or 0 < self.early_stop <= self.not_improved_count

    @property
    def stop_reason(self) -> str:
        """Why training stops before its last epoch, for the log."""
        return self.stopped_by or (
            f"{self.metric} did not improve for {self.early_stop} epochs: stopping early."
        )

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.STATE}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self.STATE:
            setattr(self, name, state.get(name, getattr(self, name)))
