"""Run reports: ``report.md`` and ``metrics.png`` per run; one table and trade-off plots per sweep.

A run directory holds what the ServerApp, the launcher, Hydra and ``iiotfl export`` / ``audit``
wrote (:mod:`.runs` reads each file, tolerant of a run that stopped early).
:func:`write_report` renders whatever is there, so a failed run still gets a report that says
how far it got (:mod:`.run_report`, privacy part :mod:`.privacy`, figures :mod:`.plots`).

Every task names its own primary metric and direction (``metrics.json``: ``primary_metric``,
``higher_is_better``; :class:`tasks.Task`): reports headline that metric, never a fixed one, and
say which evaluation it comes from (``metrics.json``'s ``evaluation``: the server's held-out test
set, or the gateways' own held-out data when there is none; none: why). Each plant's own figure
for the final model (``gateway_evaluation``) is a section of its own, "Per plant", with the worst
and median plant, which the sweep table shows per run.

:func:`write_summary` collects every run directory below a directory into ``summary.md``,
``summary.csv`` and one ``sweep-<task>.png`` per task (:mod:`.sweep`); :class:`MultirunSummary`
(the Hydra callback ``configs/config.yaml`` names) runs it at the end of every sweep.
:func:`report` is ``iiotfl report DIR`` (:mod:`.render`).

Modules, imports one way: text <- runs <- plots, privacy <- run_report, sweep <- render.
"""

from iiotfl.server.report.plots import plot_classes, plot_rounds, plot_sweep
from iiotfl.server.report.privacy import privacy_section
from iiotfl.server.report.render import report
from iiotfl.server.report.run_report import evaluation_text, export_section, metric_line, plants_section, write_report
from iiotfl.server.report.runs import (
    GATEWAY_FIGURES,
    evaluation_of,
    find_runs,
    group_value,
    is_run_dir,
    load_config,
    load_overrides,
    load_rounds,
    metric_columns,
    metric_of,
    per_class,
    plants_of,
    privacy_spent,
    run_summary,
)
from iiotfl.server.report.sweep import GROUPS, SUMMARY_COLUMNS, MultirunSummary, sweep_rows, write_summary
from iiotfl.server.report.text import METRIC_LABELS, direction, metric_label

__all__ = [
    "GATEWAY_FIGURES",
    "GROUPS",
    "METRIC_LABELS",
    "SUMMARY_COLUMNS",
    "MultirunSummary",
    "direction",
    "evaluation_of",
    "evaluation_text",
    "export_section",
    "find_runs",
    "group_value",
    "is_run_dir",
    "load_config",
    "load_overrides",
    "load_rounds",
    "metric_columns",
    "metric_label",
    "metric_line",
    "metric_of",
    "per_class",
    "plants_of",
    "plants_section",
    "plot_classes",
    "plot_rounds",
    "plot_sweep",
    "privacy_section",
    "privacy_spent",
    "report",
    "run_summary",
    "sweep_rows",
    "write_report",
    "write_summary",
]
