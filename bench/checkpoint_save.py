"""Time added by checkpoints for the MNIST model: one atomic save, and a training epoch with a save every step.

Run from the repository root: python bench/checkpoint_save.py
"""
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, like train.py

import train  # noqa: E402
from model.model import MnistModel  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.seeding import rng_state  # noqa: E402


def median_ms(action, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def epoch_seconds(directory: Path, run_id: str, *overrides: str) -> float:
    start = time.perf_counter()
    status = train.main(["-c", "configs/mnist.yaml", "--run-id", run_id, f"trainer.save_dir={directory}",
                         "trainer.epochs=1", "trainer.tensorboard=false", "trainer.progress_bar=false",
                         "trainer.verbosity=0", "data_loader.args.num_workers=0", *overrides])
    if status != 0:
        raise SystemExit(f"training failed with status {status}")
    return time.perf_counter() - start


def main() -> None:
    model = MnistModel()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 1, 28, 28)).sum().backward()
    optimizer.step()
    state = {"version": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        in_memory = median_ms(lambda: torch.save(state, io.BytesIO()))
        atomic = median_ms(lambda: save_checkpoint(state, directory / "checkpoint-last.pth"))
        print(f"torch.save to memory:                 {in_memory:7.2f} ms")
        print(f"atomic save (temp, fsync, rename):    {atomic:7.2f} ms  "
              f"({(directory / 'checkpoint-last.pth').stat().st_size / 1024:.0f} KiB)")
        plain = min(epoch_seconds(directory, f"plain{i}") for i in range(2))
        every_step = min(epoch_seconds(directory, f"every{i}", "trainer.save_every_steps=1") for i in range(2))
        steps = 29  # 3,600 training digits in batches of 128
        print(f"one epoch, no step checkpoints:       {plain:7.2f} s")
        print(f"one epoch, checkpoint every step:     {every_step:7.2f} s  "
              f"(+{1000 * (every_step - plain) / steps:.1f} ms per save over {steps} steps)")


if __name__ == "__main__":
    main()
