"""run.json: what produced a run, so that a result can be traced to its code, data and environment.

Written when the run starts (command line, git state, versions, device, determinism, the resolved config's
hash, a fingerprint of the training data) and completed when it stops (status, wall time, steps, and the
sha256 of each checkpoint file, as `sha256sum` prints it). A dirty tree's diff is saved beside it as
run.diff. No environment variables are recorded.
"""

import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RECORD = "run.json"
DIFF = "run.diff"
LARGE = 100_000  # file lists longer than this are fingerprinted by name only, without a stat per file


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(run_dir: Path) -> dict[str, Any]:
    """The commit of the working directory's repository, whether the tree was dirty, and the diff saved."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "note": "not a git repository, or git is not installed"}
    status = _git("status", "--porcelain") or ""
    state = {"commit": commit.strip(), "dirty": bool(status.strip())}
    if state["dirty"]:
        (run_dir / DIFF).write_text(_git("diff", "HEAD", "--binary") or "")
        state["diff"] = DIFF
        state["untracked"] = [line[3:] for line in status.splitlines() if line.startswith("??")]
    return state


def data_fingerprint(dataset: Any) -> dict[str, Any]:
    """Length and a sha256 of the training data: of its arrays (`data`, `targets`) where the dataset holds
    them (torchvision's MNIST and CIFAR), else of its file list with sizes (ImageFolder's `samples`), else of
    its length only (said so). A Subset's indices count too."""
    digest, indices = hashlib.sha256(), None
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        indices, dataset = list(dataset.indices), dataset.dataset
    of = "length only (the dataset has no data arrays or file list to hash)"
    arrays = [getattr(dataset, name, None) for name in ("data", "targets")]
    if hasattr(arrays[0], "shape"):
        for array in arrays:
            if hasattr(array, "numpy"):
                array = array.numpy()
            digest.update(array.tobytes() if hasattr(array, "tobytes") else repr(array).encode())
        of = "data and targets arrays"
    elif isinstance(getattr(dataset, "samples", None), list):
        samples, sized = dataset.samples, len(dataset.samples) <= LARGE
        for path, target in samples:
            size = os.stat(path).st_size if sized else ""
            digest.update(f"{path}\t{size}\t{target}\n".encode())
        of = "file list with sizes" if sized else "file list (names only: over 100,000 files)"
    if indices is not None:
        digest.update(repr(indices).encode())
    try:
        length = len(dataset) if indices is None else len(indices)
    except TypeError:  # an IterableDataset
        length = None
    return {"type": type(dataset).__name__, "length": length, "sha256": digest.hexdigest(), "of": of}


def versions(device: Any) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and getattr(device, "type", "") == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "platform": platform.platform(),
    }


def determinism(seed: int, deterministic: bool) -> dict[str, Any]:
    import torch

    return {
        "seed": seed,
        "trainer.deterministic": deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
    }


def config_hash(config: dict) -> str:
    """sha256 of the resolved config as canonical JSON: equal hashes, equal configs."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def start_record(
    run_dir: Path, command: list[str], config: dict, device: Any, dataset: Any, resumed_from: Path | None
) -> None:
    """run.json as the run starts (a resumed run keeps its first record and adds this start to it)."""
    path = run_dir / RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    start = {
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "git": git_state(run_dir),
        "versions": versions(device),
        "determinism": determinism(config.get("seed"), config.get("trainer", {}).get("deterministic")),
        "config_sha256": config_hash(config),
        "data": data_fingerprint(dataset),
    }
    if record:
        record.setdefault("resumes", []).append(start)
    else:
        record = start
    _write(path, record)


def finish_record(run_dir: Path, status: str, seconds: float, steps: int) -> None:
    """Add how the run (or this part of it) ended, its training seconds over every part so far, its steps,
    and at a run's end the checkpoints it left."""
    path = run_dir / RECORD
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    parts = record.setdefault("part_seconds", [])  # one per start that stopped cleanly (kill -9 leaves none)
    parts.append(round(seconds, 3))
    record.update(status=status, seconds=round(sum(parts), 3), steps=steps)
    if status == "finished":  # not on a stop by signal, which must exit within its grace period
        record["checkpoints"] = _digests(run_dir)
    try:
        _write(path, record)
    except OSError as error:  # a full disk: the run's own error, already on its way, is the one to show
        logging.getLogger(__name__).warning("run.json was not completed: %s", error)


def _digests(run_dir: Path) -> dict[str, str]:
    hashed: dict[int, str] = {}  # by inode: model_best.pth and checkpoint-last.pth are links to an epoch file
    digests = {}
    for file in sorted(run_dir.glob("*.pth")):
        inode = file.stat().st_ino
        if inode not in hashed:
            digest = hashlib.sha256()
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            hashed[inode] = digest.hexdigest()
        digests[file.name] = hashed[inode]
    return digests


def _write(path: Path, record: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
