"""The fast settings `auto` chooses per device, with the reason the header prints; CUDA's choices are checked
as logic here (a torch.device("cuda") needs no GPU), and run on a GPU by bench/gpu.py."""
import pytest
import torch
from torch import nn

import builders
from utils.fast_defaults import choose_channels_last, choose_precision, cudnn_benchmark, optimizer_kernels

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


@pytest.mark.parametrize("device, models, expected", [
    (CPU, CNN, ["precision 32, channels_last off, background_saves off (auto: fastest on the CPU)"]),
    (CPU, MLP, ["precision 32, background_saves off (auto: fastest on the CPU); channels_last off (auto: no 2-D "
                "convolutions)"]),
])
def test_the_header_says_what_auto_chose_and_why(device, models, expected):
    options = {"precision": "auto", "channels_last": "auto", "background_saves": "auto", "deterministic": False}
    resolved, speed = builders.fast_options(options, device, models)
    assert speed == expected and resolved["precision"] == "32" and resolved["channels_last"] is False
    assert resolved["background_saves"] is False
    chosen = {"precision": "32", "channels_last": False, "background_saves": True}
    _, nothing_auto = builders.fast_options({**options, **chosen}, device, models)
    assert nothing_auto == [], "settings the config chose are not repeated"


def test_on_cuda_the_header_lists_each_choice_with_its_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    options = {"precision": "auto", "channels_last": "auto", "background_saves": "auto", "deterministic": True}
    resolved, speed = builders.fast_options(options, CUDA, CNN)
    assert (resolved["precision"], resolved["channels_last"], resolved["background_saves"]) == ("bf16-mixed", True,
                                                                                                True)
    assert speed == ["precision bf16-mixed (auto: the GPU has bfloat16); channels_last on (auto: convolutions on "
                     "CUDA); background_saves on (auto: the host is free while the CUDA trains); cudnn.benchmark off "
                     "(deterministic: true)"]


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
