"""The few torch.distributed helpers the rest of the code uses: who am I, sums across ranks, one decision for
all. Single-process runs pay nothing: every helper is the identity when no process group is up."""
import os
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """torchrun (and the elastic launcher behind it) sets these for every process it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def env_rank() -> int:
    """This process's rank from the environment, usable before the process group is up."""
    return int(os.environ.get("RANK", "0"))


def init_process_group(use_cuda: bool) -> None:
    """Join the group torchrun describes: NCCL between GPUs, gloo on the CPU."""
    if launched_by_torchrun() and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes (run directory, logs, TensorBoard, checkpoints); every rank computes."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (in place), e.g. of metric sums and sample counts."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: how a stop, an early stop or a non-finite loss is agreed."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast(value: Any) -> Any:
    """Rank 0's value of a small picklable object, on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def launch_local_processes(processes: int, argv: list[str]) -> int:
    """`python train.py` with n_gpu: N on a machine with N GPUs: start N processes as torchrun would, through
    torch.distributed's elastic launcher, each running this same command; their exit status, once."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)(os.path.abspath(sys.argv[0]), *argv)
    except ChildFailedError as error:
        return max((failure.exitcode for failure in error.failures.values()), default=1)
    return 0
