"""What each logger costs per logging step: the time `RunWriter.add_scalars` takes for one training log line
(loss, lr and grad_norm at one step, as `trainer.log_step` writes them), with each logger alone; and what
opening and closing each costs once per run. MLflow writes on a background thread (log_batch with
synchronous=False) and waits for the previous batch before handing over the next: back to back, each step pays
the database write; with training between logging steps (--gap-ms), only the hand-off.

Run from the repository root: python bench/trackers.py [--steps 500]   (W&B runs offline)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, like train.py

from logger.trackers import TrackerRuns  # noqa: E402
from logger.writer import RunWriter, open_writer  # noqa: E402
from utils.run_directory import RunPaths  # noqa: E402

LOGGERS = (["tensorboard"], ["csv"], ["mlflow"], ["wandb"])


def measure(loggers: list, steps: int, root: Path, gap: float = 0.0) -> tuple[float, float, float]:
    """(open s, median µs per logging step, close s) for a writer with `loggers` alone, `gap` seconds of
    stand-in training between logging steps."""
    run = RunPaths.under(root, "bench", "_".join(loggers) + f"_{gap}")
    run.checkpoints.mkdir(parents=True)
    run.logs.mkdir(parents=True)
    options = {"loggers": loggers, "tensorboard": True, "save_dir": str(root)}
    started = time.perf_counter()
    writer: RunWriter = open_writer(
        run, options, {"name": "bench"}, {"optimizer.args.lr": 0.01}, TrackerRuns(), None, ["loss"]
    )
    opened = time.perf_counter() - started
    times = []
    for step in range(1, steps + 1):
        values = {"loss": 2.0 / step, "lr": 0.01, "grad_norm": 1.0 + 1.0 / step}
        started = time.perf_counter()
        writer.add_scalars("train", values, step)
        times.append(time.perf_counter() - started)
        time.sleep(gap)
    started = time.perf_counter()
    writer.close()
    return opened, 1e6 * statistics.median(times), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="training time between logging steps")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    gap = f"{args.gap_ms:g} ms apart"
    print(f"{'logger':<12}{'open s':>9}{'back to back':>16}{gap:>16}{'close s':>9}   ({args.steps} steps)")
    with tempfile.TemporaryDirectory() as directory:
        for loggers in LOGGERS:
            opened, per_step, closed = measure(loggers, args.steps, Path(directory))
            _, apart, _ = measure(loggers, args.steps // 5, Path(directory), args.gap_ms / 1000)
            print(f"{loggers[0]:<12}{opened:>9.2f}{per_step:>13.0f} µs{apart:>13.0f} µs{closed:>9.2f}")


if __name__ == "__main__":
    main()
