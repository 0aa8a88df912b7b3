"""Time added by checkpoints for the MNIST model: one atomic save, and a training epoch with a save every
step; what the content digests cost (computed on every save, verified on every load), for the MNIST
model's state and for a 100 MB state; and what a 100 MB save costs the training thread in the background.

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
from base.background_saves import BackgroundSaves, snapshot  # noqa: E402
from model.model import MnistModel  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    content_digests,  # noqa: E402
    load_checkpoint,
    save_checkpoint,
)
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
    status = train.main(
        [
            "-c",
            "configs/mnist.yaml",
            "--run-id",
            run_id,
            f"trainer.save_dir={directory}",
            "trainer.epochs=1",
            "trainer.tensorboard=false",
            "trainer.progress_bar=false",
            "trainer.verbosity=0",
            "data_loader.args.num_workers=0",
            *overrides,
        ]
    )
    if status != 0:
        raise SystemExit(f"training failed with status {status}")
    return time.perf_counter() - start


def main() -> None:
    model = MnistModel()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 1, 28, 28)).sum().backward()
    optimizer.step()
    state = {
        "version": 2,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
    }
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        in_memory = median_ms(lambda: torch.save(state, io.BytesIO()))
        atomic = median_ms(lambda: save_checkpoint(state, directory / "checkpoint-last.pth"))
        print(f"torch.save to memory:                 {in_memory:7.2f} ms")
        print(
            f"atomic save (temp, fsync, rename):    {atomic:7.2f} ms  "
            f"({(directory / 'checkpoint-last.pth').stat().st_size / 1024:.0f} KiB)"
        )
        digest_costs(state, directory)
        plain = min(epoch_seconds(directory, f"plain{i}") for i in range(2))
        every_step = min(
            epoch_seconds(directory, f"every{i}", "trainer.save_every_steps=1") for i in range(2)
        )
        steps = 29  # 3,600 training digits in batches of 128
        print(f"one epoch, no step checkpoints:       {plain:7.2f} s")
        print(
            f"one epoch, checkpoint every step:     {every_step:7.2f} s  "
            f"(+{1000 * (every_step - plain) / steps:.1f} ms per save over {steps} steps)"
        )


def digest_costs(state: dict, directory: Path) -> None:
    large = {
        "version": 2,
        "state_dict": {f"layer{i}.weight": torch.randn(1024, 1024) for i in range(25)},
    }  # 100 MiB
    for name, payload, repeats in (("MNIST model state", state, 30), ("100 MiB state", large, 3)):
        path = directory / "digested.pth"
        digests = median_ms(lambda: content_digests(payload), repeats)
        save = median_ms(lambda: save_checkpoint(payload, path), repeats)
        load = median_ms(lambda: load_checkpoint(path), repeats)
        load_unverified = median_ms(lambda: torch.load(path, weights_only=True), repeats)
        print(
            f"{name:<20} digests {digests:8.2f} ms; atomic save with them {save:8.2f} ms; load + verify "
            f"{load:8.2f} ms (torch.load alone {load_unverified:8.2f} ms)"
        )
    background_cost(large, directory)


def compute(steps: int = 150) -> None:
    """Stand-in training: matrix products, which release the GIL as a model's kernels do."""
    x = torch.randn(512, 512)
    for _ in range(steps):
        x = torch.tanh(x @ x / 512)


def background_cost(payload: dict, directory: Path) -> None:
    """What the training thread pays for a checkpoint written in the background (trainer.background_saves):
    the CPU copy taken before it goes on, and the slowdown of training running beside the write."""
    saves, path = BackgroundSaves(), directory / "background.pth"
    alone = median_ms(compute, 3)
    written = median_ms(lambda: save_checkpoint(payload, path), 3)
    copy = median_ms(lambda: snapshot(payload), 3)

    def compute_beside_a_write() -> None:
        saves.submit(save_checkpoint, payload, path)  # on a snapshot, as the checkpointer does
        compute()
        saves.wait()

    beside = median_ms(compute_beside_a_write, 3)
    print(
        f"100 MiB state in the background: the training thread waits {copy:.0f} ms for the copy, not "
        f"{written:.0f} ms for the write; {alone:.0f} ms of compute beside the write take {beside:.0f} ms "
        f"(copy and wait for the end included)"
    )


if __name__ == "__main__":
    main()
