"""Start a new project from this template: python new_project.py ../MyProject"""

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


def new_project(target: Path) -> str | None:
    """Copy the template to `target`; the reason it refused, or None when done."""
    target = target.expanduser().resolve()
    if target == TEMPLATE or TEMPLATE in target.parents:
        return f"{target}: is inside the template itself; choose a directory outside {TEMPLATE}"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        return f"{target}: already exists and is not empty; choose a new or empty directory"
    shutil.copytree(TEMPLATE, target, ignore=IGNORED, dirs_exist_ok=True)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python new_project.py TARGET_DIRECTORY", file=sys.stderr)
        return 2
    problem = new_project(Path(argv[0]))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"New project at {Path(argv[0]).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
