"""The monitored metric: best value so far, improvement, early stop."""
import math

from utils.errors import TrainingError


def parse_monitor(text: object) -> tuple[str, str] | None:
    """`off` -> None; `min val_loss` -> ('min', 'val_loss'); anything else raises ValueError. YAML 1.1 reads
    an unquoted `off` as false, which means the same."""
    if text == "off" or text is False:
        return None
    parts = text.split() if isinstance(text, str) else []
    if len(parts) != 2 or parts[0] not in ("min", "max"):
        raise ValueError(f"must be 'off' or 'min <metric>' / 'max <metric>' (e.g. 'min val_loss'), not {text!r}")
    return parts[0], parts[1]


class Monitor:
    """Decides 'improved' and 'stop early' from each epoch's log; its state goes into checkpoints."""

    def __init__(self, monitor: str, early_stop: int):
        parsed = parse_monitor(monitor)
        self.mode, self.metric = parsed if parsed else ("off", None)
        self.early_stop = early_stop
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.not_improved = 0

    def update(self, log: dict[str, float]) -> bool:
        """Whether this epoch is the best so far."""
        if self.mode == "off":
            return False
        if self.metric not in log:
            raise TrainingError(f"trainer.monitor: '{self.metric}' is not in this epoch's log "
                                f"({', '.join(log)}); monitor one of those")
        value = log[self.metric]
        improved = value < self.best if self.mode == "min" else value > self.best
        if improved:
            self.best, self.best_epoch, self.not_improved = value, log.get("epoch"), 0
        else:
            self.not_improved += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.early_stop > 0 and self.not_improved >= self.early_stop
