"""Start a new project from this template: python new_project.py ../MyProject [--with-data]

The copy holds the framework, the entry scripts, the example model, data loader and configs to edit. Left out
unless --with-data: the bundled MNIST digits (data/) and what only the template needs (its tests, which train
on those digits, its benchmarks and CI script). With --with-data the copy trains configs/mnist.yaml offline
and passes the template's tests, as the template does.
"""

import argparse
import shutil
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent
IGNORED = shutil.ignore_patterns(
    ".git",
    "saved",
    "__pycache__",
    ".pytest_cache",
    "*.egg-info",
    ".venv",
    "venv",
    "env",
    ".mypy_cache",
    ".ruff_cache",
)
TEMPLATE_ONLY = ("data", "tests", "bench", ".ci")  # top-level: kept with --with-data


def new_project(target: Path, with_data: bool = False) -> str | None:
    """Copy the template to `target`; the reason it refused, or None when done."""
    target = target.expanduser().resolve()
    if target == TEMPLATE or TEMPLATE in target.parents:
        return f"{target}: is inside the template itself; choose a directory outside {TEMPLATE}"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        return f"{target}: already exists and is not empty; choose a new or empty directory"

    def ignored(directory: str, names: list[str]) -> set[str]:
        left_out = set(IGNORED(directory, names))
        if not with_data and Path(directory).resolve() == TEMPLATE:
            left_out |= set(TEMPLATE_ONLY) & set(names)
        return left_out

    shutil.copytree(TEMPLATE, target, ignore=ignored, dirs_exist_ok=True)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a new or empty directory")
    parser.add_argument(
        "--with-data",
        action="store_true",
        help="also copy the bundled MNIST digits and the template's tests, benchmarks and CI script",
    )
    args = parser.parse_args(argv)
    problem = new_project(Path(args.target), args.with_data)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"New project at {Path(args.target).resolve()}")
    if not args.with_data:
        print(
            "  left out: data/ (the bundled MNIST digits), tests/, bench/ and .ci/ of the template; "
            "--with-data keeps them (configs/mnist.yaml trains on those digits)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
