"""torchkiln under DDP next to a hand-written DDP loop, and what each of torchkiln's collectives costs.

Both sides train the bundled MNIST config (LeNet, augmentation exactness on) in the same processes, with the
same global batch: the hand-written loop is what the PyTorch DDP tutorial writes (a DistributedSampler with
set_epoch, a DDP model, the textbook steps, the epoch's metric sums all-reduced once, validation on each
rank's shard). Epochs alternate (plain, torchkiln, plain again: the second plain is the control); rank 0
prints the medians. Then the cost of each collective torchkiln adds beyond DDP's own gradient all-reduce:
per logging step the non-finite check and the stop agreement (one small all-reduce each), per epoch the
metric sums (training and validation), the stop agreement and the gather of every rank's RNG state for the
checkpoint. The loss weight (each rank's share of an uneven last batch) is computed locally: no collective.

Run from the repository root: python bench/ddp.py [--processes 2] [--pairs 10] [--launches 3]
(it starts torchrun itself, --launches times, and prints the median ratio; under torchrun already, it runs
once as is.)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, like train.py

from overhead import median_of_runs  # noqa: E402

import builders  # noqa: E402
import train  # noqa: E402
from base.base_data_loader import unseeded  # noqa: E402
from base.progress import RngStreams  # noqa: E402
from model.metric import accuracy, top_k_acc  # noqa: E402
from parse_config import parse_args  # noqa: E402
from utils import distributed  # noqa: E402
from utils.run_directory import claim_run_directory  # noqa: E402


def plain_ddp_epoch(model, optimizer, criterion, train_loader, valid_loader, epoch: int) -> None:
    """The hand-written DDP loop: set_epoch, the textbook steps, the metric sums all-reduced once."""
    train_loader.sampler.set_epoch(epoch)
    model.train()
    sums = torch.zeros(3)
    for data, target in train_loader:
        optimizer.zero_grad(set_to_none=True)
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach(), accuracy(output, target), top_k_acc(output, target)]) * len(
            target
        )
    model.eval()
    valid_sums = torch.zeros(3)
    with torch.no_grad():
        for data, target in valid_loader:
            output = model(data)
            loss = criterion(output, target)
            valid_sums += torch.stack([loss, accuracy(output, target), top_k_acc(output, target)]) * len(
                target
            )
    totals = torch.stack([sums, valid_sums])
    torch.distributed.all_reduce(totals)
    totals.tolist()


def build(save_dir: str):
    config, request = parse_args(
        [
            "-c",
            str(ROOT / "configs/mnist.yaml"),
            "--run-id",
            "ddp-bench",
            f"trainer.save_dir={save_dir}",
            "trainer.progress_bar=false",
            "trainer.verbosity=0",
            "trainer.epochs=1000",
            "lr_scheduler=null",
            "n_gpu=0",
            "data_loader.args.num_workers=0",
        ],  # fmt: skip
        train.lookups(),
    )
    trainer, _, _ = train.build_trainer(config, request)
    trainer._open_run(claim_run_directory(config.trainer["save_dir"], config["name"], request.run_id, True))
    model = nn.parallel.DistributedDataParallel(builders.build_model(config))
    optimizer = builders.build_optimizers(config, {"model": model})["optimizer"]
    criterion, _ = builders.loss_and_metrics(config)
    loader = trainer.data_loader
    train_samples = Subset(unseeded(loader.dataset), loader.sampler.indices)
    valid_samples = Subset(
        unseeded(trainer.valid_data_loader.dataset), trainer.valid_data_loader.sampler.indices
    )
    batch = loader.batch_size
    plain = (
        model,
        optimizer,
        criterion,
        DataLoader(train_samples, batch_size=batch, sampler=DistributedSampler(train_samples, shuffle=True)),
        DataLoader(valid_samples, batch_size=batch, sampler=DistributedSampler(valid_samples, shuffle=False)),
    )
    return trainer, plain


def median_seconds(action, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def collective_costs(trainer) -> list[str]:
    """What each collective torchkiln adds beyond DDP's gradient all-reduce costs, and how often it runs."""
    small = median_seconds(lambda: distributed.any_rank(False, trainer.device))
    finite = median_seconds(lambda: trainer.train_metrics.loss_is_finite())
    sums = median_seconds(lambda: trainer.train_metrics.tracker.totals())
    gathered = median_seconds(RngStreams(0).state_dict, repeats=20)
    steps = trainer.len_epoch
    per_epoch = (small + finite) * (steps // trainer.log_step) + finite + 2 * sums + small + gathered
    return [
        f"  stop agreement (any_rank)       {small * 1e3:7.3f} ms  per logging step and per epoch",
        f"  non-finite check                {finite * 1e3:7.3f} ms  per logging step and per epoch",
        f"  metric sums                     {sums * 1e3:7.3f} ms  twice per epoch (training, validation)",
        f"  RNG states gathered for a save  {gathered * 1e3:7.3f} ms  per checkpoint",
        "  loss weight (uneven last batch)     none: computed on each rank",
        f"  total per epoch ({steps} steps, log_step {trainer.log_step}): {per_epoch * 1e3:.2f} ms",
    ]


def run(pairs: int) -> None:
    distributed.init_process_group(use_cuda=False)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        trainer, plain = build(directory)
        plain_times, kiln_times, control_times = [], [], []
        for epoch in range(1, pairs + 2):  # the first round warms up
            torch.distributed.barrier()
            start = time.perf_counter()
            plain_ddp_epoch(*plain, epoch)
            middle = time.perf_counter()
            trainer._epoch(epoch)
            trainer.checkpointer.flush()  # its checkpoint counts here, not in the next plain epoch
            end = time.perf_counter()
            plain_ddp_epoch(*plain, epoch + 1000)
            control = time.perf_counter()
            if epoch > 1:
                plain_times.append(middle - start)
                kiln_times.append(end - middle)
                control_times.append(control - end)
        costs = collective_costs(trainer)
        if distributed.is_main():
            plain_median, kiln_median = statistics.median(plain_times), statistics.median(kiln_times)
            baseline = statistics.median(plain_times + control_times)
            print(
                f"MNIST LeNet, {distributed.world_size()} processes (gloo, CPU), global batch "
                f"{trainer.data_loader.batch_size * distributed.world_size()}, {pairs} rounds\n"
                f"  plain DDP {plain_median:.3f} s/epoch   torchkiln {kiln_median:.3f} s/epoch   ratio "
                f"{kiln_median / baseline:.3f}   (control: plain/plain "
                f"{statistics.median(control_times) / plain_median:.3f})\n"
                "collectives torchkiln adds (medians):",
                *costs,
                json.dumps(
                    {
                        "ratio": kiln_median / baseline,
                        "control": statistics.median(control_times) / plain_median,
                    }
                ),
                sep="\n",
                flush=True,
            )
    distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=10, help="timed rounds per launch")
    parser.add_argument(
        "--launches", type=int, default=3, help="fresh torchrun launches; the median is the result"
    )
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        run(args.pairs)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
               __file__, "--pairs", str(args.pairs)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # one launch's ratio moves with where memory lands
    median_of_runs("DDP", "launches", command, args.launches, cwd=ROOT, env=environment)


if __name__ == "__main__":
    main()
