"""Shared helpers: tiny configs on the bundled MNIST digits, in temporary directories."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = str(ROOT / "data" / "mnist-5k")

TINY = {
    "name": "tiny",
    "n_gpu": 0,
    "seed": 7,
    "arch": {"type": "MnistModel", "args": {}},
    "data_loader": {
        "type": "MnistDataLoader",
        "args": {"data_dir": DATA_DIR, "batch_size": 32, "shuffle": True, "validation_split": 64,
                 "num_workers": 0, "limit": 320},
    },
    "optimizer": {"type": "Adam", "args": {"lr": 3e-3}},
    "loss": "nll_loss",
    "metrics": ["accuracy"],
    "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}},
    "trainer": {"epochs": 2, "save_dir": "saved", "monitor": "min val_loss", "tensorboard": False,
                "progress_bar": False, "verbosity": 1},
}


REHEARSING = '''
def rehearsing():
    """Whether torchkiln's rehearsal is loading this sample (before the run starts; not a training read)."""
    import sys
    frame = sys._getframe()
    while frame is not None and not frame.f_code.co_filename.endswith("rehearsal.py"):
        frame = frame.f_back
    return frame is not None
'''


def tiny_config(tmp_path: Path, **trainer: object) -> dict:
    """TINY with save_dir under tmp_path and the given trainer options."""
    config = copy.deepcopy(TINY)
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    config["trainer"].update(trainer)
    return config


def write_config(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config) if path.suffix == ".json" else yaml.safe_dump(config, sort_keys=False))
    return path


def run_dir(tmp_path: Path, run_id: str, name: str = "tiny") -> Path:
    return tmp_path / "saved" / "models" / name / run_id


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_consistent(state: dict, path: Path) -> Path:
    """torch.save a changed checkpoint with its digests recomputed, as an attacker or a careful editor would:
    what is tested next is what lies behind the content check."""
    from utils.checkpoint import content_digests

    state = {key: value for key, value in state.items() if key != "digests"}
    torch.save({**state, "digests": content_digests(state)}, path)
    return path


def run_script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run an entry script in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical weights, optimizer state and learning rate."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][index][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, name)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (saved/, markers) land in the test's own directory."""
    monkeypatch.chdir(tmp_path)
