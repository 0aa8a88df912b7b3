"""The GPU benchmark's every path runs: on the CPU in its small mode (the measurement needs a GPU)."""
import re

import pytest

from conftest import run_script


@pytest.mark.slow
def test_the_gpu_benchmark_runs_each_variant_in_its_small_mode():
    result = run_script("bench/gpu.py", "--small", "--steps", "2", "--repeats", "1", "--batch-size", "4",
                        timeout=600)
    assert result.returncode == 0, result.stderr
    for model in ("ResNet-18 (small)", "ViT tiny (small)"):
        for variant in ("(a) typical", "(b) tuned", "(c) torchkiln"):
            assert re.search(rf"^{re.escape(model)} +{re.escape(variant)} +[\d,]+ ", result.stdout, re.M), result.stdout
    assert ("speed row: precision 32, channels_last off, background_saves off (auto: fastest on the CPU); "
            "reuse_host_memory on (auto: glibc's malloc)") in result.stdout
