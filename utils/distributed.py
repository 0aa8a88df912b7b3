"""The few torch.distributed helpers the rest of the code uses: who am I, sums across ranks, one decision for
all. Single-process runs pay nothing: every helper is the identity when no process group is up. torch loads on
first use, so that the entry scripts can report a bad command line without it."""

import os
import sys
from types import ModuleType
from typing import Any


def _dist() -> ModuleType:
    import torch.distributed

    return torch.distributed


def launched_by_torchrun() -> bool:
    """torchrun (and the elastic launcher behind it) sets these for every process it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def env_rank() -> int:
    """This process's rank from the environment, usable before the process group is up."""
    return int(os.environ.get("RANK", "0"))


def init_process_group(use_cuda: bool) -> None:
    """Join the group torchrun describes: NCCL between GPUs, gloo on the CPU."""
    dist = _dist()
    if launched_by_torchrun() and not dist.is_initialized():
        if use_cuda:
            import torch

            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def destroy_process_group() -> None:
    if "torch.distributed" in sys.modules and _dist().is_initialized():  # no group without torch loaded
        _dist().destroy_process_group()


def is_distributed() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes (run directory, logs, TensorBoard, checkpoints); every rank computes."""
    return rank() == 0


def all_reduce_sum(tensor: Any) -> Any:
    """The element-wise sum over ranks of a tensor (in place), e.g. of metric sums and sample counts."""
    if is_distributed():
        _dist().all_reduce(tensor, op=_dist().ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when it is true on any: how a stop, an early stop or a non-finite loss is agreed."""
    if not is_distributed():
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    _dist().all_reduce(value, op=_dist().ReduceOp.MAX)
    return bool(value.item())


def broadcast(value: Any) -> Any:
    """Rank 0's value of a small picklable object, on every rank."""
    if not is_distributed():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    _dist().all_gather_object(values, value)
    return values


def launch_local_processes(processes: int, argv: list[str]) -> int:
    """`python train.py` with n_gpu: N on a machine with N GPUs: start N processes as torchrun would, through
    torch.distributed's elastic launcher, each running this same command; their exit status, once."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)(os.path.abspath(sys.argv[0]), *argv)
    except ChildFailedError as error:
        return max((failure.exitcode for failure in error.failures.values()), default=1)
    return 0
