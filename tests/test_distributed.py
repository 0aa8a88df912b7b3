"""DDP under torchrun on the CPU (gloo): one run directory, the single-process result at any world size, exact
resume after a signal to every rank or to one, a world-size change that continues with the next unseen
sample, a two-"node" launch on 127.0.0.1, and test.py sharded."""
import collections
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_train_step import LINEAR_NET

import test as test_script
import train
from conftest import REHEARSING, ROOT, load, run_dir, tiny_config, write_config

pytestmark = pytest.mark.slow
COUNTING_DATASET = '''import os
import time
import torch
from torch.utils.data import Dataset
''' + REHEARSING + '''

class Counted(Dataset):
    """Gaussian blobs in 784 dimensions; every index served is appended to seen-<pid>.txt."""

    def __init__(self, size=240, log_dir="."):
        generator = torch.Generator().manual_seed(size)
        self.target = torch.randint(0, 10, (size,), generator=generator)
        self.data = torch.randn(size, 784, generator=generator) + self.target[:, None] * 0.1
        self.log_dir = log_dir

    def __len__(self):
        return len(self.target)

    def __getitem__(self, index):
        time.sleep(0.004)  # slow enough that a signal lands inside an epoch
        if rehearsing():
            return self.data[index], self.target[index]
        with open(os.path.join(self.log_dir, f"seen-{os.getpid()}.txt"), "a") as file:
            file.write(f"{index}\\n")
        return self.data[index], self.target[index]
'''


def _torchrun(tmp_path, processes, *args, extra=()):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *extra,
               str(ROOT / "train.py"), *args]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process, timeout=240):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _linear_config(tmp_path, batch_size, **trainer):
    (tmp_path / "net.py").write_text(LINEAR_NET)
    config = tiny_config(tmp_path, **trainer)
    config["arch"] = {"type": f"{tmp_path}/net.py:Net", "args": {}}
    config["data_loader"]["args"].update(limit=264, batch_size=batch_size)  # 200 train: a short last batch
    config["lr_scheduler"] = None
    config["optimizer"] = {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}}
    return config


def test_two_processes_of_half_the_batch_equal_one_process(tmp_path):
    one = write_config(tmp_path, _linear_config(tmp_path, 32), "one.yaml")
    assert train.main(["-c", str(one), "--run-id", "one"]) == 0
    two = write_config(tmp_path, _linear_config(tmp_path, 16, tensorboard=True,
                                                loggers=["tensorboard", "csv", "mlflow"]), "two.yaml")
    status, out, err = _finish(_torchrun(tmp_path, 2, "-c", str(two), "--run-id", "two"))
    assert status == 0, err
    single, double = (load(run_dir(tmp_path, run) / "checkpoint-last.pth") for run in ("one", "two"))
    assert double["world_size"] == 2 and len(double["rng_per_rank"]) == 2
    assert single["global_step"] == double["global_step"] == 14
    for name, tensor in single["state_dict"].items():
        torch.testing.assert_close(double["state_dict"][name], tensor, rtol=0, atol=1e-6)
    assert double["monitor_best"] == pytest.approx(single["monitor_best"], abs=1e-6), "val_loss over all 64 samples"
    assert "processes  2 (DDP) x batch 16 = global batch 32" in out
    files = sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / "saved").rglob("*")
                   if "/two" in str(path) and path.is_file())
    assert [name for name in files if "events.out" in name].__len__() == 1
    assert sorted(name.rsplit("/", 1)[1] for name in files if "events.out" not in name) == [
        "checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "checkpoint-last.pth", "config.yaml", "info.log",
        "metrics.csv", "model_best.pth", "run.json"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/saved/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])  # rank 0's alone
    assert tracked.info.run_name == "tiny/two" and tracked.data.metrics["best/val_loss"] == double["monitor_best"]
    assert len(client.get_metric_history(tracked.info.run_id, "epoch/val_loss")) == 2

    status, out, _ = _finish(subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "test.py"), "-r",
         str(run_dir(tmp_path, "two") / "model_best.pth"), "--trust-checkpoint-config"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert status == 0
    sharded = json.loads((run_dir(tmp_path, "two") / "model_best.test.json").read_text())
    assert test_script.main(["-r", str(run_dir(tmp_path, "two") / "model_best.pth"), "--trust-checkpoint-config"]) == 0
    whole = json.loads((run_dir(tmp_path, "two") / "model_best.test.json").read_text())
    assert sharded["loss"] == pytest.approx(whole["loss"], abs=1e-6) and sharded["accuracy"] == whole["accuracy"]


def test_a_bad_config_under_torchrun_is_one_line_on_every_rank(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    status, out, err = _finish(_torchrun(tmp_path, 2, "-c", str(path), "optimizer.type=Adamm"))
    assert status != 0
    expected = ("error: override 'optimizer.type=Adamm': optimizer.type: unknown type 'Adamm' in torch.optim "
                "(did you mean 'Adam'?)")
    assert (out + err).count(expected) == 1
    assert "exitcode  : 2" in err, "every rank exits 2"
    assert not (tmp_path / "saved").exists()


RANK_ONE_FAILS = """import torch
from torch.utils.data import Dataset
class OddOnRankOne(Dataset):
    def __len__(self):
        return 96
    def __getitem__(self, index):
        if torch.distributed.get_rank() == 1:
            raise ValueError(f"sample {index} cannot be read on rank 1")
        return torch.zeros(784), index % 10
"""


def test_a_rehearsal_that_fails_on_one_rank_stops_every_rank_before_anything_is_written(tmp_path):
    (tmp_path / "odd.py").write_text(RANK_ONE_FAILS)
    config = _linear_config(tmp_path, 16, monitor="off")
    config["data_loader"] = {"type": f"{tmp_path}/odd.py:OddOnRankOne", "args": {"batch_size": 16, "num_workers": 0}}
    status, out, err = _finish(_torchrun(tmp_path, 2, "-c", str(write_config(tmp_path, config))))
    assert status != 0 and not (tmp_path / "saved").exists()
    assert err.count("error: ValueError: sample") == 1 and "cannot be read on rank 1" in err and "odd.py" in err
    assert "nothing was written" in err
    assert err.count("error: another rank's rehearsal of its first batch failed (that rank's error says why)") == 1


def _children(pid):
    return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]


def _wait_for(path, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _wait_for_reads(log_dir, samples, process, timeout=120.0):
    """Until the Counted dataset has served `samples` training reads over every process."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if sum(len(file.read_text().split()) for file in log_dir.glob("seen-*.txt")) >= samples:
            return
        time.sleep(0.002)


def _stopped_config(tmp_path):
    config = tiny_config(tmp_path, log_step=1, epochs=2)
    config["data_loader"]["args"].update(limit=1600, batch_size=16)
    return write_config(tmp_path, config)


@pytest.fixture(scope="module")
def uninterrupted_on_two_processes(tmp_path_factory):
    """Where a stopped two-process run must end once resumed: the same run without a stop."""
    tmp_path = tmp_path_factory.mktemp("reference")
    assert _finish(_torchrun(tmp_path, 2, "-c", str(_stopped_config(tmp_path)), "--run-id", "reference"))[0] == 0
    return load(run_dir(tmp_path, "reference") / "checkpoint-last.pth")


@pytest.mark.parametrize("target", ["every-rank", "one-rank"])
def test_sigterm_then_resume_on_two_processes_is_bit_identical(tmp_path, target, uninterrupted_on_two_processes):
    path = _stopped_config(tmp_path)
    process = _torchrun(tmp_path, 2, "-c", str(path), "--run-id", "stopped")
    run = run_dir(tmp_path, "stopped")
    _wait_for(run / "checkpoint-epoch1.pth", process)
    ranks = _children(process.pid)
    assert len(ranks) == 2
    if target == "every-rank":
        process.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    else:
        subprocess.run(["kill", "-TERM", str(ranks[1])], check=True)
    status, out, err = _finish(process)
    assert status != 0 and "Stopped by SIGTERM; resume with: torchrun --nproc_per_node 2 train.py --resume" in out + err
    stopped = load(run / "checkpoint-last.pth")
    assert stopped["epoch"] == 1 and 0 < stopped["batches_in_epoch"] < 50, "stopped during epoch 2"
    starts = [(run / "checkpoint-last.pth", [])]  # mid-epoch 2
    if target == "every-rank":
        starts.append((run / "checkpoint-epoch1.pth", ["--run-id", "from-epoch1"]))  # and at the epoch boundary
    expected = uninterrupted_on_two_processes
    for start, run_id in starts:
        status, _, err = _finish(_torchrun(tmp_path, 2, "-r", str(start), *run_id))
        assert status == 0, err
        resumed = load(run_dir(tmp_path, run_id[1] if run_id else "stopped") / "checkpoint-last.pth")
        for name, tensor in expected["state_dict"].items():
            assert torch.equal(tensor, resumed["state_dict"][name]), name
        for index, state in expected["optimizer"]["state"].items():
            assert all(torch.equal(value, resumed["optimizer"]["state"][index][key]) for key, value in state.items())


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_a_world_size_change_continues_at_the_next_unseen_sample(tmp_path, first, second):
    (tmp_path / "counted.py").write_text(COUNTING_DATASET)
    (tmp_path / "net.py").write_text(LINEAR_NET)
    config = tiny_config(tmp_path, epochs=2, log_step=1, monitor="off", save_every_steps=1)
    config["arch"] = {"type": f"{tmp_path}/net.py:Net", "args": {}}
    config["data_loader"] = {"type": f"{tmp_path}/counted.py:Counted",
                             "args": {"size": 240, "log_dir": str(tmp_path), "batch_size": 32 // first,
                                      "num_workers": 0}}
    path = write_config(tmp_path, config)
    process = _torchrun(tmp_path, first, "-c", str(path), "--run-id", "changing")
    run = run_dir(tmp_path, "changing")
    _wait_for_reads(tmp_path, 240 + 32, process)  # a batch into epoch 2, whose 7 more batches sleep >= 0.9 s
    process.send_signal(signal.SIGTERM)
    _finish(process)
    stopped = load(run / "checkpoint-last.pth")
    assert stopped["world_size"] == first and stopped["epoch"] == 1 and stopped["batches_in_epoch"] < 8
    status, out, err = _finish(_torchrun(tmp_path, second, "-r", str(run), f"data_loader.args.batch_size={32 // second}",
                                         "--trust-checkpoint-config"))
    assert status == 0, err
    assert (out + err).count(f"Resuming {second} processes from a checkpoint of {first}") == second
    seen = collections.Counter(int(line) for file in tmp_path.glob("seen-*.txt") for line in file.read_text().split())
    assert seen == {index: 2 for index in range(240)}, "two epochs: every sample twice, none skipped or repeated"
    assert load(run / "checkpoint-last.pth")["world_size"] == second


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_loopback_train_together(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_torchrun(tmp_path, 1, "-c", str(path), "--run-id", "nodes",
                       extra=("--nnodes", "2", "--node_rank", str(rank), "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", endpoint, "--rdzv-id", "torchkiln-test"))
             for rank in range(2)]
    results = [_finish(node) for node in nodes]
    assert [status for status, _, _ in results] == [0, 0], results[0][2] + results[1][2]
    checkpoint = load(run_dir(tmp_path, "nodes") / "checkpoint-last.pth")
    assert checkpoint["world_size"] == 2 and checkpoint["global_step"] == 4, "4 global batches of 2 x 32"


def test_find_lr_under_torchrun_runs_on_rank_0_with_the_global_batch(tmp_path):
    config = tiny_config(tmp_path)
    config["lr_scheduler"] = None
    status, out, err = _finish(_torchrun(tmp_path, 2, "-c", str(write_config(tmp_path, config)), "--find-lr",
                                         "--run-id", "lr"))
    assert status == 0, err
    assert out.count("LR range test: 100 steps from 1e-07 to ") == 1 and "batches of 64 " in out
    assert "  to use it:  torchrun --nproc_per_node 2 train.py -c " in out
    assert (tmp_path / "saved/log/tiny/lr/lr_find.csv").is_file()


def _loss_check_on_rank(rank, init_file, out_dir):
    from utils.metrics import MetricTracker
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tracker = MetricTracker("loss", "loss_aux", device=torch.device("cpu"))
    tracker.update("loss", torch.tensor(float("nan") if rank == 1 else 0.5), 4)
    tracker.update("loss_aux", 0.25, 4)  # a number, summed on the host
    local = MetricTracker("loss", device=torch.device("cpu"), synced=False)
    local.update("loss", torch.tensor(0.5), 4)
    (out_dir / f"rank{rank}.json").write_text(json.dumps([tracker.all_finite(["loss", "loss_aux"]),
                                                          tracker.all_finite(["loss_aux"]),
                                                          local.all_finite(["loss"])]))
    torch.distributed.destroy_process_group()


def test_a_nan_loss_on_one_rank_is_seen_by_every_rank(tmp_path):
    torch.multiprocessing.spawn(_loss_check_on_rank, args=(tmp_path / "init", tmp_path), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True, True], rank
