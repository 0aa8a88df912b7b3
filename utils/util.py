"""pytorch-template's small helpers, kept under their old names so that project code importing them runs."""

import json
from collections import OrderedDict
from itertools import repeat
from pathlib import Path
from typing import Any, Iterable, Iterator


def read_json(fname: str | Path) -> OrderedDict:
    """A JSON file as an ordered mapping."""
    with Path(fname).open("rt") as handle:
        return json.load(handle, object_hook=OrderedDict)


def write_json(content: Any, fname: str | Path) -> None:
    """Write `content` as indented JSON, in its own key order."""
    with Path(fname).open("wt") as handle:
        json.dump(content, handle, indent=4, sort_keys=False)


def ensure_dir(dirname: str | Path) -> None:
    """Create a directory (and its parents) if it does not exist."""
    Path(dirname).mkdir(parents=True, exist_ok=True)


def inf_loop(data_loader: Iterable) -> Iterator:
    """Endless batches: pass after pass over the loader (iteration-based training)."""
    for loader in repeat(data_loader):
        yield from loader
