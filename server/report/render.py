"""``iiotfl report DIR``: a run directory gets its ``report.md`` (re)written; any other directory
gets ``summary.md`` over every run below it."""

from __future__ import annotations

from pathlib import Path

from iiotfl.server.report.run_report import write_report
from iiotfl.server.report.runs import find_runs, is_run_dir
from iiotfl.server.report.sweep import write_summary


def report(target: str | Path) -> Path:
    """The report of ``target`` (a run: report.md; a sweep or any folder of runs: summary.md), its
    path returned. Raises FileNotFoundError when there is no run at or below ``target``."""
    target = Path(target)
    if is_run_dir(target):
        return write_report(target)
    if not find_runs(target):
        raise FileNotFoundError(f"{target} holds no run directory (launch.json, metrics.json or .hydra/config.yaml); "
                                "give a run directory or a sweep directory (multirun/<date>/<time>)")
    return write_summary(target)[1]
