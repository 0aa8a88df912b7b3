"""Training throughput on a GPU: the loop people write, a hand-tuned loop, and torchkiln's defaults.

For each model (ResNet-50 on 224x224 images and ViT-B/16; with --small, tiny stand-ins on 32x32 images)
over the same synthetic dataset and DataLoader settings, images/s and peak memory of:
  (a) typical   fp32, NCHW, the optimizer's default kernels, unpinned blocking copies, loss.item() each step
  (b) tuned     bf16 autocast, channels_last, fused optimizer, pinned memory and non-blocking copies
  (c) torchkiln the framework as train.py builds it, every speed setting left at `auto`
  (d) +compile  (c) with trainer.compile: true (--compile)
then, on CUDA, torchkiln's steps under torch.cuda.set_sync_debug_mode("error"): any host sync outside a
logging step raises. Targets: (c) >= 1.3x (a) and >= 0.98x (b).

Run from the repository root: python bench/gpu.py [--steps 30] [--batch-size 128] [--compile] [--small]
On a machine without CUDA it runs the small mode on the CPU: a check that every path works, not a measure.
For DDP, run the same command under `torchrun --nproc_per_node N`: each variant then uses every GPU.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, like train.py

import train  # noqa: E402
from base.base_data_loader import unseeded  # noqa: E402
from parse_config import parse_args  # noqa: E402
from utils import distributed  # noqa: E402
from utils.run_directory import claim_run_directory  # noqa: E402


class SyntheticImages(Dataset):
    """One fixed random image per class, served as a new tensor each time: the DataLoader's collation,
    pinning and copies cost what real decoded images would, without a disk."""

    def __init__(self, size: int = 4096, image_size: int = 224, num_classes: int = 1000):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(16, 3, image_size, image_size, generator=generator)
        self.size, self.num_classes = size, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index % 16].clone(), index % self.num_classes


MODELS = {  # name: (arch section, image size) for the full and the small mode
    "ResNet-50": ({"type": "torchvision.models.resnet50", "args": {}}, 224),
    "ViT-B/16": ({"type": "torchvision.models.vit_b_16", "args": {}}, 224),
}
SMALL_MODELS = {
    "ResNet-18 (small)": ({"type": "torchvision.models.resnet18", "args": {"num_classes": 10}}, 32),
    "ViT tiny (small)": (
        {
            "type": "torchvision.models.VisionTransformer",
            "args": {
                "image_size": 32,
                "patch_size": 8,
                "num_layers": 2,
                "num_heads": 2,
                "hidden_dim": 64,
                "mlp_dim": 128,
                "num_classes": 10,
            },  # fmt: skip
        },
        32,
    ),
}


def torchkiln_trainer(arch: dict, image_size: int, args: argparse.Namespace, directory: str, compiled: bool):
    """torchkiln's trainer as train.py builds it from a config that leaves every speed setting at auto."""
    classes = arch["args"].get("num_classes", 1000)
    overrides = [
        f"arch={arch}",
        f"data_loader.type={__file__}:SyntheticImages",
        "data_loader.args={"
        f"size: {args.steps * args.batch_size * 4}, image_size: {image_size}, num_classes: {classes}, "
        f"batch_size: {args.batch_size}, shuffle: true, num_workers: auto"
        "}",
        "loss=CrossEntropyLoss",
        "metrics=[]",
        "optimizer={type: SGD, args: {lr: 0.01, momentum: 0.9}}",
        "lr_scheduler=null",
        f"n_gpu={1 if torch.cuda.is_available() else 0}",
        f"trainer.save_dir={directory}",
        f"trainer.len_epoch={args.steps}",
        "trainer.log_step=1000000",
        "trainer.progress_bar=false",
        "trainer.verbosity=0",
        "trainer.tensorboard=false",
        "trainer.monitor=off",
        f"trainer.compile={str(compiled).lower()}",
    ]
    config, request = parse_args(
        ["-c", str(ROOT / "configs/mnist.yaml"), "--run-id", f"gpu-{time.time_ns()}", *overrides],
        train.lookups(),
    )
    trainer, _, _ = train.build_trainer(config, request)
    run = claim_run_directory(directory, config["name"], request.run_id, True)
    run.logs.mkdir(parents=True, exist_ok=True)
    trainer._open_run(run)
    return trainer


def hand_loop(trainer: Any, tuned: bool, steps: int) -> Callable[[], int]:
    """A hand-written loop over the same data: (a) as people write it, or (b) hand-tuned."""
    device = trainer.device
    model = copy.deepcopy(trainer.unwrapped_model).float()  # the same network, built the same way
    model = model.to(device, memory_format=torch.channels_last if tuned else torch.contiguous_format)
    cuda = device.type == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=tuned and cuda or None)
    loader = DataLoader(
        unseeded(trainer.data_loader.dataset),
        batch_size=trainer.data_loader.batch_size,
        shuffle=True,
        num_workers=trainer.data_loader.num_workers,
        pin_memory=tuned and cuda,
        persistent_workers=trainer.data_loader.num_workers > 0,
    )
    criterion = nn.CrossEntropyLoss()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=tuned and cuda)
    batches = iter(loader)

    def run() -> int:
        nonlocal batches
        model.train()
        seen, total = 0, 0.0
        for _ in range(steps):
            try:
                images, labels = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, labels = next(batches)
            images, labels = images.to(device, non_blocking=tuned), labels.to(device, non_blocking=tuned)
            if tuned:
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            total += 0.0 if tuned else loss.item()  # the typical loop reads the loss every step
            seen += len(images)
        return seen

    return run


def torchkiln_loop(trainer: Any) -> Callable[[], int]:
    epoch = [0]

    def run() -> int:
        epoch[0] += 1
        trainer.progress.batches_in_epoch = 0  # as BaseTrainer._epoch leaves it after each epoch
        trainer._train_epoch(epoch[0])
        return trainer.pace.samples

    return run


def measure(run: Callable[[], int], device: torch.device, repeats: int) -> tuple[float, float]:
    """Images/s (the median over `repeats` timed runs after one warm-up) and peak memory in GiB."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(samples / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(rates) * distributed.world_size(), peak


def no_sync_outside_logging(trainer: Any) -> str:
    """torchkiln's training steps with every host sync an error (logging steps are off in this bench)."""
    if trainer.device.type != "cuda":
        return "sync check: CUDA only (skipped)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.progress.batches_in_epoch = 0
        trainer._train_epoch(10_000)
    except RuntimeError as error:
        return f"sync check: FAILED, a host sync in a training step: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "sync check: no host sync in training steps outside logging (set_sync_debug_mode('error'))"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time torchkiln with trainer.compile")
    parser.add_argument("--small", action="store_true", help="tiny models and images (the CPU check)")
    args = parser.parse_args()
    small = args.small or not torch.cuda.is_available()
    if small and not args.small:
        print("no CUDA device: the small mode on the CPU (a check that each path runs, not a measure)")
    distributed.init_process_group(use_cuda=torch.cuda.is_available())
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"torch {torch.__version__}, {name} x {distributed.world_size()}, batch {args.batch_size} per process"
    )
    print(f"{'model':<20} {'variant':<12} {'images/s':>10} {'peak GiB':>9} {'vs (a)':>7} {'vs (b)':>7}")
    with tempfile.TemporaryDirectory() as directory:
        for model_name, (arch, image_size) in (SMALL_MODELS if small else MODELS).items():
            results: dict[str, tuple[float, float]] = {}
            trainer = torchkiln_trainer(arch, image_size, args, directory, compiled=False)
            device = trainer.device
            results["(a) typical"] = measure(hand_loop(trainer, False, args.steps), device, args.repeats)
            results["(b) tuned"] = measure(hand_loop(trainer, True, args.steps), device, args.repeats)
            results["(c) torchkiln"] = measure(torchkiln_loop(trainer), device, args.repeats)
            sync = no_sync_outside_logging(trainer)
            if args.compile:
                compiled = torchkiln_trainer(arch, image_size, args, directory, compiled=True)
                results["(d) +compile"] = measure(torchkiln_loop(compiled), device, args.repeats)
            typical, tuned = results["(a) typical"][0], results["(b) tuned"][0]
            for variant, (rate, peak) in results.items():
                print(
                    f"{model_name:<20} {variant:<12} {rate:>10,.0f} {peak:>9.2f} {rate / typical:>6.2f}x "
                    f"{rate / tuned:>6.2f}x"
                )
            print(f"{model_name:<20} speed row: {'; '.join(trainer.speed) or '(nothing auto)'}")
            print(f"{model_name:<20} {sync}")
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
