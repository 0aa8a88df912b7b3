"""The fast settings `auto` chooses per device, with the reason the header prints; CUDA's choices are checked
as logic here (a torch.device("cuda") needs no GPU), and run on a GPU by bench/gpu.py."""
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import builders
from conftest import ROOT
from utils.fast_defaults import (
    MALLOC_ENVIRONMENT,
    choose_channels_last,
    choose_host_memory,
    choose_precision,
    cudnn_benchmark,
    optimizer_kernels,
)

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
CNN, MLP = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())], [nn.Linear(4, 2)]


def test_precision_auto_is_bf16_where_the_gpu_has_it_and_32_elsewhere():
    assert choose_precision("auto", CUDA, bf16_supported=True).value == "bf16-mixed"
    assert choose_precision("auto", CUDA, bf16_supported=False).value == "32"
    assert choose_precision("auto", CPU).value == "32"
    assert choose_precision("16-mixed", CUDA, bf16_supported=True).value == "16-mixed", "a set value wins"


def test_channels_last_auto_is_for_convolutional_models_on_cuda():
    assert choose_channels_last("auto", CUDA, CNN).value is True
    assert choose_channels_last("auto", CUDA, MLP).value is False
    assert choose_channels_last("auto", CPU, CNN).value is False
    assert choose_channels_last(False, CUDA, CNN).value is False


def test_fused_kernels_on_cuda_unless_the_config_chose_its_kernels():
    assert optimizer_kernels(torch.optim.AdamW, {}, CUDA).value == {"fused": True}
    assert optimizer_kernels(torch.optim.SGD, {"lr": 0.1}, CUDA).value == {"fused": True}
    assert optimizer_kernels(torch.optim.Adam, {"foreach": False}, CUDA).value == {}
    assert optimizer_kernels(torch.optim.Adam, {}, CPU).value == {}

    class Custom(torch.optim.Optimizer):  # a user's optimizer without a fused implementation
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

    assert optimizer_kernels(Custom, {}, CUDA).value == {}


def test_deterministic_turns_cudnn_benchmark_off_and_says_so():
    assert cudnn_benchmark(CUDA, deterministic=False).value is True
    off = cudnn_benchmark(CUDA, deterministic=True)
    assert off.value is False and off.reason == "deterministic: true"


@pytest.fixture
def untuned_glibc(monkeypatch):
    """A process whose malloc is glibc's with its own defaults, as on CI and most Linux machines."""
    monkeypatch.setattr(platform, "libc_ver", lambda *args: ("glibc", "2.36"))
    for name in (*MALLOC_ENVIRONMENT, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)


AUTO = {"precision": "auto", "channels_last": "auto", "background_saves": "auto", "reuse_host_memory": "auto",
        "deterministic": False}


def test_host_memory_is_kept_where_glibc_serves_it_untuned(untuned_glibc, monkeypatch):
    chosen = choose_host_memory("auto")
    assert (chosen.value, chosen.reason) == (True, "auto: glibc's malloc")
    assert choose_host_memory(False).value is False
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    chosen = choose_host_memory("auto")
    assert (chosen.value, chosen.reason) == (False, "auto: the environment chose the allocator's settings")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert choose_host_memory("auto").value is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(platform, "libc_ver", lambda *args: ("", ""))  # macOS, musl
    chosen = choose_host_memory("auto")
    assert (chosen.value, chosen.reason) == (False, "auto: not glibc's malloc")


STEPS_FAULTS = """import resource, sys, torch
from torch import nn
from utils.fast_defaults import keep_host_memory
if sys.argv[1] == "kept":
    assert keep_host_memory()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.Flatten(),
                      nn.Linear(32 * 8 * 8, 10))
optimizer = torch.optim.Adam(model.parameters())
faults = 0
for step in range(40):  # batches of several sizes in turn: training, a short last one, validation's
    size = (128, 256, 128, 37, 64, 200)[step % 6]
    data, target = torch.randn(size, 1, 28, 28), torch.randint(0, 10, (size,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(data), target).backward()
    optimizer.step()
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before if step >= 12 else 0
print(faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_kept_host_memory_is_reused_without_faulting_its_pages_in_again():
    def page_faults_after_warm_up(mode: str) -> int:
        env = {key: value for key, value in os.environ.items() if key not in MALLOC_ENVIRONMENT}
        command = [sys.executable, "-c", STEPS_FAULTS, mode]
        return int(subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout)

    assert page_faults_after_warm_up("glibc defaults") > 5_000  # 22,000-123,000 in 8 runs on 2 cores
    assert page_faults_after_warm_up("kept") < 2_000  # 0 in 4 runs


@pytest.mark.parametrize("device, models, expected", [
    (CPU, CNN, ["precision 32, channels_last off, background_saves off (auto: fastest on the CPU); "
                "reuse_host_memory on (auto: glibc's malloc)"]),
    (CPU, MLP, ["precision 32, background_saves off (auto: fastest on the CPU); channels_last off (auto: no 2-D "
                "convolutions); reuse_host_memory on (auto: glibc's malloc)"]),
])
def test_the_header_says_what_auto_chose_and_why(untuned_glibc, device, models, expected):
    resolved, speed = builders.fast_options(AUTO, device, models)
    assert speed == expected and resolved["precision"] == "32" and resolved["channels_last"] is False
    assert resolved["background_saves"] is False and resolved["reuse_host_memory"] is True
    chosen = {"precision": "32", "channels_last": False, "background_saves": True, "reuse_host_memory": True}
    _, nothing_auto = builders.fast_options({**AUTO, **chosen}, device, models)
    assert nothing_auto == [], "settings the config chose are not repeated"


def test_on_cuda_the_header_lists_each_choice_with_its_reason(untuned_glibc, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    resolved, speed = builders.fast_options({**AUTO, "deterministic": True}, CUDA, CNN)
    assert (resolved["precision"], resolved["channels_last"], resolved["background_saves"]) == ("bf16-mixed", True,
                                                                                                True)
    assert speed == ["precision bf16-mixed (auto: the GPU has bfloat16); channels_last on (auto: convolutions on "
                     "CUDA); background_saves on (auto: the host is free while the CUDA trains); reuse_host_memory on "
                     "(auto: glibc's malloc); cudnn.benchmark off (deterministic: true)"]


def test_config_yaml_records_what_auto_became_and_keeps_auto_for_the_next_machine(tmp_path):
    import yaml

    import train
    from conftest import run_dir, tiny_config, write_config

    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "auto"]) == 0
    written = yaml.safe_load((run_dir(tmp_path, "auto") / "config.yaml").read_text())
    assert (written["trainer"]["precision"], written["trainer"]["channels_last"]) == ("auto", "auto")
    assert (written["resolved"]["precision"], written["resolved"]["channels_last"]) == ("32", False)
    assert written["trainer"]["background_saves"] == "auto" and written["resolved"]["background_saves"] is False
