"""What torchkiln costs next to a hand-written loop, measured in one process with epochs interleaved.

Two workloads: the bundled MNIST config as shipped (TensorBoard on, checkpoints every epoch, augmentation
exactness on), and a
compute-heavy CNN on synthetic 3x64x64 images, where the framework's per-step cost shows as a constant.
The plain loop is what a careful user writes: a plain DataLoader over the raw dataset with the same
transforms, zero_grad, forward, loss, backward, step, the same training metrics summed on the device, the
same validation samples. Plain and torchkiln blocks of three epochs alternate,
so that machine noise hits both alike; the ratio is of the per-epoch medians. On a small VM the ratio also
moves from one process to the next (by +-3% on 2 cores, with the same code: where a process's buffers land
favours one loop or the other), so the MNIST workload is measured in `--processes` fresh processes and the
median of their ratios is the result. Also prints the startup cost: `--print-config` and the time to the
first training step, each against `python -c "import torch, torchvision"`.

Run from the repository root:
python bench/overhead.py [--pairs 5] [--processes 5] [--precision 32|bf16-mixed]
                         [--background-saves auto|true|false]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 3  # epochs per timed block
sys.path.insert(0, str(ROOT))  # run from a checkout, like train.py

import builders  # noqa: E402
import train  # noqa: E402
from base.base_data_loader import unseeded  # noqa: E402
from base.train_step import autocast_for  # noqa: E402
from model.metric import accuracy, top_k_acc  # noqa: E402
from parse_config import parse_args  # noqa: E402
from utils.run_directory import claim_run_directory  # noqa: E402


class WideCNN(nn.Module):
    """Compute-heavy: four 3x3 conv blocks of 64-256 channels on 64x64 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, channels = [], 3
        for width in (64, 128, 256, 256):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.features(x).mean((2, 3))), 1)


class SyntheticImages(TensorDataset):
    def __init__(self, size: int = 512, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        super().__init__(
            torch.randn(size, 3, 64, 64, generator=generator),
            torch.randint(0, 10, (size,), generator=generator),
        )


def plain_epoch(model, optimizer, criterion, train_batches, valid_batches, autocast) -> tuple[float, float]:
    """The hand-written loop: the textbook steps, metrics summed on the device, the same validation. Returns
    the seconds its training and its validation took."""
    start = time.perf_counter()
    model.train()
    sums = torch.zeros(3)
    for data, target in train_batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            output = model(data)
            loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        sums += torch.stack(
            [loss.detach().float(), accuracy(output, target), top_k_acc(output, target)]
        ) * len(target)
    trained = time.perf_counter()
    model.eval()
    valid_sums = torch.zeros(3)
    with torch.no_grad():
        for data, target in valid_batches:
            with autocast():
                output = model(data)
                loss = criterion(output, target)
            valid_sums += torch.stack(
                [loss.float(), accuracy(output, target), top_k_acc(output, target)]
            ) * len(target)
    torch.stack([sums, valid_sums]).tolist()  # read the epoch's means back once, as torchkiln does
    return trained - start, time.perf_counter() - trained


def build(config_path: str, save_dir: str, precision: str, *overrides: str):
    """torchkiln's trainer as train.py builds it, and a plain model/optimizer/loaders over the same data."""
    config, request = parse_args(
        [
            "-c",
            config_path,
            "--run-id",
            f"bench-{time.time_ns()}",
            f"trainer.save_dir={save_dir}",
            "trainer.progress_bar=false",
            "trainer.verbosity=0",
            "trainer.epochs=1000",
            f"trainer.precision={precision}",
            "lr_scheduler=null",
            *overrides,
        ],
        train.lookups(),
    )
    trainer, _, _ = train.build_trainer(config, request)
    trainer._open_run(claim_run_directory(config.trainer["save_dir"], config["name"], request.run_id, True))
    model = builders.build_model(config)
    optimizer = builders.build_optimizers(config, {"model": model})["optimizer"]
    criterion, _ = builders.loss_and_metrics(config)
    return trainer, (
        model,
        optimizer,
        criterion,
        *plain_loaders(trainer),
        autocast_for(precision, torch.device("cpu")),
    )


def plain_loaders(trainer) -> tuple[DataLoader, DataLoader]:
    """The loaders a user writes by hand: a shuffling DataLoader over the raw training samples (the dataset
    with its transforms, no seeding) and one over the validation samples, with the same batch size, workers
    and pinning as torchkiln resolved."""
    train_loader, valid_loader = trainer.data_loader, trainer.valid_data_loader
    settings = {
        "batch_size": train_loader.batch_size,
        "num_workers": train_loader.num_workers,
        "pin_memory": train_loader.pin_memory,
        "persistent_workers": train_loader.persistent_workers,
    }
    train_samples = Subset(unseeded(train_loader.dataset), train_loader.sampler.indices)
    valid_samples = Subset(unseeded(valid_loader.dataset), valid_loader.sampler.indices)
    return DataLoader(train_samples, shuffle=True, **settings), DataLoader(valid_samples, **settings)


def interleaved(name: str, trainer, plain, pairs: int) -> dict[str, float]:
    """Blocks of BLOCK epochs of the plain loop, torchkiln and the plain loop again, in turn; the second plain
    blocks are the control (plain against plain), which shows what the machine's noise alone makes of a
    ratio. torchkiln's epochs run back to back within a block, as in a run, so that an epoch's checkpoint
    is written while the next one trains; a block's time includes waiting for its last checkpoint."""
    plain_times, kiln_times, control_times = [], [], []
    phases = {"plain train": [], "plain valid": [], "kiln train": [], "kiln valid": [], "kiln rest": []}
    timed_phases(trainer, phases)
    epochs = iter(range(1, 1_000_000))
    for round_index in range(pairs + 1):  # the first round warms everything up and is not counted
        start = time.perf_counter()
        plain_phases = [plain_epoch(*plain) for _ in range(BLOCK)]
        middle = time.perf_counter()
        phased = len(phases["kiln train"])
        for _ in range(BLOCK):
            trainer._epoch(next(epochs))
        trainer.checkpointer.flush()
        end = time.perf_counter()
        plain_phases += [plain_epoch(*plain) for _ in range(BLOCK)]
        control = time.perf_counter()
        if round_index == 0:
            phases["kiln train"].clear()
            phases["kiln valid"].clear()
            continue
        plain_times.append((middle - start) / BLOCK)
        kiln_times.append((end - middle) / BLOCK)
        control_times.append((control - end) / BLOCK)
        phases["plain train"] += [train for train, _ in plain_phases]
        phases["plain valid"] += [valid for _, valid in plain_phases]
        in_loops = sum(phases["kiln train"][phased:]) + sum(phases["kiln valid"][phased:])
        phases["kiln rest"].append((end - middle - in_loops) / BLOCK)
    plain_median, kiln_median = statistics.median(plain_times), statistics.median(kiln_times)
    baseline = statistics.median(plain_times + control_times)
    medians = {phase: 1000 * statistics.median(times) for phase, times in phases.items()}
    print(
        f"{name:<28} plain {plain_median:7.3f} s/epoch   torchkiln {kiln_median:7.3f} s/epoch   "
        f"ratio {kiln_median / baseline:.3f}   (control: plain/plain "
        f"{statistics.median(control_times) / plain_median:.3f})\n"
        f"{'':<28} torchkiln's extra per epoch: training loop "
        f"{medians['kiln train'] - medians['plain train']:+.1f} ms, validation "
        f"{medians['kiln valid'] - medians['plain valid']:+.1f} ms, the rest (logging, monitor, "
        f"checkpoint) {medians['kiln rest']:+.1f} ms",
        flush=True,
    )
    return {"ratio": kiln_median / baseline, "control": statistics.median(control_times) / plain_median}


def timed_phases(trainer, phases: dict[str, list[float]]) -> None:
    """Record the seconds of each of the trainer's training and validation loops."""
    for method, phase in (("_train_epoch", "kiln train"), ("_valid_epoch", "kiln valid")):
        loop = getattr(trainer, method)

        def timed(*args, loop=loop, phase=phase):
            start = time.perf_counter()
            try:
                return loop(*args)
            finally:
                phases[phase].append(time.perf_counter() - start)

        setattr(trainer, method, timed)


def startup() -> None:
    def seconds(*command: str) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    imports = seconds("-c", "import torch, torchvision")
    printed = seconds("train.py", "-c", "configs/mnist.yaml", "--print-config")
    with tempfile.TemporaryDirectory() as directory:
        first_step = seconds("-c", FIRST_STEP.format(save_dir=directory))
    print(
        f"startup: import torch, torchvision {imports:.2f} s; train.py --print-config {printed:.2f} s; "
        f"to the first training step {first_step:.2f} s (medians of 3)"
    )


FIRST_STEP = """import os, sys
import train
from base.base_trainer import BaseTrainer
BaseTrainer.after_optimizer_step = lambda *args: os._exit(0)
sys.exit(train.main(["-c", "configs/mnist.yaml", "trainer.save_dir={save_dir}", "trainer.verbosity=0"]))
"""


WIDE_CNN = [
    f"arch.type={__file__}:WideCNN",
    "arch.args={}",
    f"data_loader.type={__file__}:SyntheticImages",
    "data_loader.args={size: 320, batch_size: 64, validation_split: 64, num_workers: 0}",
    "loss=nll_loss",
    "optimizer.args.lr=1e-3",
]
WORKLOADS = {"mnist": ("MNIST LeNet (mnist.yaml)", []), "wide": ("Wide CNN 3x64x64 (synthetic)", WIDE_CNN)}


def measure(workload: str, args: argparse.Namespace) -> dict[str, float]:
    """One workload's interleaved comparison in this process."""
    name, overrides = WORKLOADS[workload]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        saves = f"trainer.background_saves={args.background_saves}"
        trainer, plain = build("configs/mnist.yaml", directory, args.precision, saves, *overrides)
        return interleaved(name, trainer, plain, args.pairs)


def in_fresh_processes(workload: str, args: argparse.Namespace) -> None:
    """The workload measured in `args.processes` new processes, one after another."""
    command = [sys.executable, __file__, "--workload", workload, "--pairs", str(args.pairs)]
    command += ["--precision", args.precision, "--background-saves", args.background_saves]
    median_of_runs(WORKLOADS[workload][0], "processes", command, args.processes)


def median_of_runs(label: str, unit: str, command: list[str], runs: int, **options: Any) -> None:
    """Run `command` `runs` times, one after another (each prints its report, then a JSON line of its ratio
    and control); pass the reports on, then print the median of the ratios, which is the result, and the
    controls, whose spread is its precision."""
    results = []
    for _ in range(runs):
        printed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, **options)
        lines = printed.stdout.splitlines()
        print("\n".join(lines[:-1]), flush=True)
        results.append(json.loads(lines[-1]))
    ratios = sorted(result["ratio"] for result in results)
    controls = sorted(result["control"] for result in results)
    print(
        f"{label}: median of {len(ratios)} {unit} {statistics.median(ratios):.3f} "
        f"(each: {', '.join(f'{ratio:.3f}' for ratio in ratios)}; controls "
        f"{', '.join(f'{control:.3f}' for control in controls)})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="timed block pairs per workload and process")
    parser.add_argument("--processes", type=int, default=5, help="fresh processes for the MNIST workload")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--background-saves", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--workload", choices=list(WORKLOADS), help="measure only this one, in this process")
    args = parser.parse_args()
    if args.workload:
        print(json.dumps(measure(args.workload, args)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {args.precision}, "
        f"{args.pairs} interleaved pairs per workload and process",
        flush=True,
    )
    in_fresh_processes("mnist", args)
    measure("wide", args)
    startup()


if __name__ == "__main__":
    main()
