"""Which checkpoint files are written when, and how many are kept."""
import logging
import re
from pathlib import Path
from typing import Callable

from logger import FILE_ONLY
from utils import distributed
from utils.checkpoint import link_or_save, save_checkpoint

logger = logging.getLogger(__name__)
LAST = "checkpoint-last.pth"
BEST = "model_best.pth"


class Checkpointer:
    """Epoch files every `save_period` (newest `keep_last` kept), model_best.pth on improvement, and
    checkpoint-last.pth every `save_every_steps` optimizer steps or when a signal stops training."""

    def __init__(self, run_dir: Path, save_period: int, keep_last: int, save_every_steps: int):
        self.run_dir = Path(run_dir)
        self.writes = distributed.is_main()  # under DDP every rank builds the state (it gathers), rank 0 writes
        self.save_period, self.keep_last, self.save_every_steps = save_period, keep_last, save_every_steps

    def save_epoch(self, make_state: Callable[[], dict], epoch: int, improved: bool) -> None:
        if epoch % self.save_period and not improved:
            return
        state = make_state()
        if not self.writes:
            return
        path = None
        if epoch % self.save_period == 0:
            path = self.run_dir / f"checkpoint-epoch{epoch}.pth"
            save_checkpoint(state, path)
            logger.info("Saved %s", path, extra=FILE_ONLY)
        if improved:  # the same bytes: a second name for the epoch file rather than a second serialization
            link_or_save(path, state, self.run_dir / BEST)
            logger.info("Saved %s (best so far)", self.run_dir / BEST, extra=FILE_ONLY)
        if path is not None:
            self._prune()

    def maybe_save_step(self, make_state: Callable[[], dict], global_step: int) -> None:
        if self.save_every_steps and global_step % self.save_every_steps == 0:
            self.save_last(make_state())

    def save_last(self, state: dict) -> Path:
        path = self.run_dir / LAST
        if self.writes:
            save_checkpoint(state, path)
        return path

    def _prune(self) -> None:
        if not self.keep_last:
            return
        epoch_of = {p: int(re.fullmatch(r"checkpoint-epoch(\d+)\.pth", p.name).group(1))
                    for p in self.run_dir.glob("checkpoint-epoch*.pth")
                    if re.fullmatch(r"checkpoint-epoch(\d+)\.pth", p.name)}
        for path in sorted(epoch_of, key=epoch_of.get)[: -self.keep_last]:
            path.unlink()
