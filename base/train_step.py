"""The mechanics of one optimizer step: mixed precision, gradient accumulation, clipping and an EMA of the
weights. It knows nothing of epochs, logging or files; its state_dict() is part of every checkpoint."""

import contextlib
import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.errors import TrainingError
from utils.user_code import defined_at

AUTOCAST_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_NOTHING_TO_SKIP = contextlib.nullcontext()  # reusable: it holds no state


class TrainStep:
    """Precision (autocast, and one GradScaler under 16-mixed for every optimizer), accumulation windows of
    `accumulate` batches (the last window of an epoch may be shorter: its loss is scaled by the batches it
    really has), gradient clipping per optimizer after unscaling, an EMA of the evaluation model
    (torch.optim.swa_utils), and the non-finite policy: under `on_nonfinite: skip` a window with a nan/inf
    loss takes no optimizer step. `models` is one module or the run's modules by name; `eval_name` says which
    one the EMA follows and validation judges."""

    def __init__(
        self,
        models: nn.Module | dict[str, nn.Module],
        device: torch.device,
        precision: str = "32",
        accumulate: int = 1,
        epoch_batches: int = 1,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        ema_decay: float | None = None,
        on_nonfinite: str = "stop",
        eval_name: str | None = None,
    ):
        self.models = models if isinstance(models, dict) else {"model": models}
        self.model = self.models[eval_name or next(iter(self.models))]
        self.device = device
        self.autocast = autocast_for(precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if str(precision) == "16-mixed" else None
        self.accumulate, self.epoch_batches = accumulate, epoch_batches
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.skip_nonfinite = on_nonfinite == "skip"
        self.grad_norm: torch.Tensor | None = None  # the last clip's total norm, read on logging steps only
        self.ema = None
        if ema_decay is not None:
            decay = get_ema_multi_avg_fn(ema_decay)
            self.ema = AveragedModel(unwrap(self.model), device=device, multi_avg_fn=decay)
            self.ema.requires_grad_(False)
        self.ema_updates = 0  # counted on the host: AveragedModel reads its device counter back every update
        self.loss_was_nonfinite = False  # the last backward's loss, under on_nonfinite: skip
        self.stepped = False  # whether the last iteration stepped (false: its window was skipped)
        self._window_skipped = False

    @classmethod
    def from_options(
        cls,
        models: dict[str, nn.Module],
        device: torch.device,
        options: dict,
        epoch_batches: int,
        eval_name: str,
    ) -> "TrainStep":
        """The step the trainer options describe (precision, accumulate_grad_batches, clip_grad_norm,
        clip_grad_value, ema, on_nonfinite)."""
        precision, accumulate = options["precision"], options["accumulate_grad_batches"]
        clip, ema_decay = (
            (options["clip_grad_norm"], options["clip_grad_value"]),
            (options["ema"] or {}).get("decay"),
        )
        return cls(
            models,
            device,
            precision,
            accumulate,
            epoch_batches,
            *clip,
            ema_decay,
            options["on_nonfinite"],
            eval_name,
        )

    def accumulating(self, batch_idx: int) -> contextlib.AbstractContextManager:
        """Around forward and backward of one batch: DDP models skip their gradient all-reduce until the
        last batch of the window."""
        if self.window_done(batch_idx):
            return _NOTHING_TO_SKIP
        stack = contextlib.ExitStack()
        for model in self.models.values():
            if hasattr(model, "no_sync"):
                stack.enter_context(model.no_sync())
        return stack

    def window_size(self, batch_idx: int) -> int:
        start = batch_idx - batch_idx % self.accumulate
        return min(self.accumulate, self.epoch_batches - start)

    def window_done(self, batch_idx: int) -> bool:
        """Whether this batch ends an accumulation window (and so an optimizer step follows it)."""
        return (batch_idx + 1) % self.accumulate == 0 or batch_idx + 1 == self.epoch_batches

    def steps_per_epoch(self) -> int:
        return -(-self.epoch_batches // self.accumulate)

    def backward(
        self, loss: Any, batch_idx: int, share: float = 1.0, inputs: Iterable[torch.Tensor] | None = None
    ) -> None:
        """Backward of the loss (a multi-term loss's total, its "loss" entry) divided by the window's batch
        count, so that the window's update equals one batch that many times larger, and times `share`: under
        DDP this rank's share of an uneven last global batch (1 otherwise). `inputs` limits the gradients to
        those tensors (a GAN's generator phase leaves the discriminator's alone). Under `on_nonfinite: skip` a
        nan/inf loss (a host sync) marks the window."""
        loss = total_loss(loss)
        self.loss_was_nonfinite = self.skip_nonfinite and not bool(torch.isfinite(loss))
        self._window_skipped |= self.loss_was_nonfinite
        scaled = loss / self.window_size(batch_idx) if self.accumulate > 1 else loss
        scaled = scaled * share if share != 1.0 else scaled
        scaled = self.scaler.scale(scaled) if self.scaler else scaled
        scaled.backward(inputs=list(inputs) if inputs is not None else None)

    def clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients of `optimizer`'s parameters (unscaled first under 16-mixed); the total norm is
        kept for the log."""
        if not (self.clip_value or self.clip_norm) or self._window_skipped:
            return
        if self.scaler:
            self.scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.clip_value:
            torch.nn.utils.clip_grad_value_(parameters, self.clip_value)
        if self.clip_norm:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.clip_norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step `optimizer` (through the GradScaler under 16-mixed), unless the window was skipped for a
        non-finite loss. Zeroing the gradients is the caller's next verb; end_iteration() follows the last
        optimizer of the iteration."""
        if self._window_skipped:
            return
        if self.scaler:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def end_iteration(self) -> None:
        """After every optimizer of the iteration stepped: one GradScaler update, the EMA, a new window."""
        self.stepped, self._window_skipped = not self._window_skipped, False
        if not self.stepped:
            return
        if self.scaler:
            self.scaler.update()
        if self.ema is not None:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        averaged = list(self.ema.module.parameters())
        current = [p.detach() for p in unwrap(self.model).parameters()]
        if self.ema_updates == 0:  # as AveragedModel: the first update copies
            torch._foreach_copy_(averaged, current)
        else:
            self.ema.multi_avg_fn(averaged, current, self.ema.n_averaged)
        for ema_buffer, buffer in zip(self.ema.module.buffers(), unwrap(self.model).buffers()):
            # BatchNorm statistics follow the model (AveragedModel's use_buffers=False)
            ema_buffer.copy_(buffer)
        self.ema.n_averaged += 1
        self.ema_updates += 1

    @property
    def eval_model(self) -> nn.Module:
        """What validation, model_best.pth and test.py judge: the EMA weights when on, else the model (outside
        its DDP wrapper, whose forward would wait for the other ranks at every batch)."""
        if self.ema is not None and self.ema_updates:
            return self.ema.module
        return (
            unwrap(self.model)
            if isinstance(self._inner(), nn.parallel.DistributedDataParallel)
            else self.model
        )

    def _inner(self) -> nn.Module:
        return getattr(self.model, "_orig_mod", self.model)

    def state_dict(self) -> dict:
        """The scaler and the EMA's update count; the EMA weights are a checkpoint part of their own."""
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.ema_updates = state.get("ema_updates", 0)
        if self.ema is not None:
            self.ema.n_averaged.fill_(self.ema_updates)


class CheckedLoss:
    """A loss whose return is checked on every call, without reading anything back: a scalar tensor, or a
    dict with one under "loss". A wrong one names the user's function and file, instead of failing later
    inside backward. Attributes are the loss's own."""

    def __init__(self, loss: Callable):
        self.loss = loss

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        value = self.loss(*args, **kwargs)
        total = value.get("loss") if isinstance(value, dict) else value
        if not isinstance(total, torch.Tensor) or total.dim() != 0:
            raise TrainingError(
                f"the loss {defined_at(self.loss)} returned {_shown(value)}: a loss returns a scalar tensor "
                "(the .mean() of a per-sample loss), or a dict of named terms with the total under 'loss'"
            )
        return value

    def __getattr__(self, name: str) -> Any:
        if name == "loss":
            raise AttributeError(name)
        return getattr(self.loss, name)


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, dict):
        return f"a dict without 'loss' ({', '.join(map(str, value))})" if "loss" not in value else "a dict"
    return f"{type(value).__name__} {value!r}"[:80]


def total_loss(loss: Any) -> torch.Tensor:
    """The tensor backward uses: the loss itself, or a multi-term loss's "loss" entry."""
    if isinstance(loss, dict):
        if "loss" not in loss:
            raise TypeError(
                f"a loss that returns a dict must hold its total under 'loss'; it gave {list(loss)}"
            )
        return loss["loss"]
    return loss


def autocast_for(
    precision: str | int, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context forward and loss run in: autocast for the mixed modes (validation and
    test.py use the same one as training)."""
    dtype = AUTOCAST_DTYPES[str(precision)]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and torch.compile wrappers: what checkpoints hold."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def compiled(model: nn.Module, options: bool | dict[str, Any]) -> nn.Module:
    """torch.compile with the config's keyword arguments (true: the defaults)."""
    return torch.compile(model, **({} if options is True else copy.deepcopy(options)))
