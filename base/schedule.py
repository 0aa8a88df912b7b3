"""An LR scheduler together with when it steps, so that the trainer never asks the config."""

from typing import Any

import torch

from utils.errors import ConfigError


def learning_rates(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
    """`lr` of the optimizer's first group; with several optimizers `lr_<name>` of each."""
    named = {f"lr_{name}": optimizer.param_groups[0]["lr"] for name, optimizer in optimizers.items()}
    return {"lr": next(iter(named.values()))} if len(named) == 1 else named


class Schedule:
    """Steps `scheduler` after every optimizer step (`per_batch`) or at each epoch's end, on `metric` of the
    epoch's log for ReduceLROnPlateau. Its state is the scheduler's own."""

    def __init__(self, scheduler: Any, per_batch: bool, metric: str | None = None):
        self.scheduler, self.per_batch, self.metric = scheduler, per_batch, metric

    def after_optimizer_step(self) -> None:
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self, log: dict[str, float]) -> None:
        if self.per_batch:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(log[self.metric])
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The scheduler's state; a schedule fixed to a length (OneCycleLR's total_steps) keeps it."""
        fixed = getattr(self.scheduler, "total_steps", None)
        if fixed is not None and state.get("total_steps") not in (None, fixed):
            kind, previous = type(self.scheduler).__name__, state["total_steps"]
            raise ConfigError(
                f"{kind} was fixed to {previous} steps when this run began and cannot run {fixed}: train on "
                "in a new run from its weights (init_from the checkpoint, the schedule's total_steps: auto)"
            )
        self.scheduler.load_state_dict(state)
