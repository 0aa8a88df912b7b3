"""Compare runs: python compare.py saved/models/Mnist_LeNet/* [--group-by seed] [--csv|--md] [--plot out.png].

Reads each run's config.yaml and metrics.csv (and run.json for wall time) only: no tracker, no network. Prints
the config keys whose values differ between the runs, the monitored metric's best and last values, epochs,
wall time and steps/s; --group-by KEY folds runs that differ only in KEY into mean ± std.
"""

import argparse
import glob
import sys
from pathlib import Path

from utils.errors import ConfigError, exit_after


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare runs from their config.yaml and metrics.csv.")
    parser.add_argument(
        "runs", nargs="+", help="run directories (saved/models/<name>/<id>), or a quoted glob"
    )
    parser.add_argument("--metric", help="the metric to compare (default: the runs' monitored metric)")
    parser.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="KEY",
        help="fold runs that differ only in KEY (e.g. seed) into mean ± std; repeatable",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_const", const="csv", dest="form", help="print CSV")
    form.add_argument("--md", action="store_const", const="md", dest="form", help="print a Markdown table")
    parser.add_argument(
        "--plot", metavar="OUT.png", help="draw the metric's curve of every run into this file"
    )
    return parser


def expand(patterns: list[str]) -> list[Path]:
    """Run directories from paths and globs (a shell expands unquoted ones first), each once, in order."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"{pattern}: matches no run directory")
        paths += [
            Path(match) for match in matches if Path(match).resolve() not in {p.resolve() for p in paths}
        ]
    return paths


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 printed, 2 bad input (a path that is not a run, an unknown key)."""
    from logger.comparison import grouped, metric_of, plot, read_run, render, table

    args = make_parser().parse_args(argv)
    try:
        runs = [read_run(path) for path in expand(args.runs)]
        metric = metric_of(runs, args.metric)
        if not any(metric[1] in run.curves for run in runs):
            known = sorted({name for run in runs for name in run.curves})
            raise ConfigError(
                f"--metric {metric[1]}: not in these runs' metrics.csv (they have: {', '.join(known)})"
            )
        header, rows = table(runs, metric)
        if args.group_by:
            header, rows = grouped(header, runs, args.group_by)
        if args.plot:
            plot(runs, metric, Path(args.plot))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(header, rows, args.form or "text"))
    if args.plot:
        print(f"{metric[1]} curves written to {args.plot}")
    return 0


if __name__ == "__main__":
    exit_after(main())
