"""iiotfl report DIR: rewrite the report of a run, or summarise a sweep.

DIR a run directory: its report.md is re-rendered (and metrics.png). Any other directory (a sweep,
a day of sweeps, any folder of runs): summary.md (one table over every run below it, trade-off
plots), summary.csv and one sweep-<task>.png per task. Prints the file written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iiotfl.server.cli.base import description, summary, usage_error
from iiotfl.server.report import report


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("report", help=summary(__doc__), description=description(__doc__))
    p.add_argument("dir", metavar="DIR", help="a run directory, or a directory of runs (a sweep)")
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    if not Path(args.dir).is_dir():
        return usage_error(args, "iiotfl report needs one run or sweep directory")
    try:
        print(report(args.dir))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
