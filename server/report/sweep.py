"""One report over many runs: every run directory below a directory (a ``-m`` sweep, or several).

:func:`write_summary` writes ``summary.md`` (one table: task, strategy, privacy, link, codec,
status, primary metric, its worst and median plant, epsilon, bytes per gateway and round, wall
and round time, the reason of each failed run), ``summary.csv`` (the same, machine-readable,
columns :data:`SUMMARY_COLUMNS`) and one ``sweep-<task>.png`` per task (metric against epsilon,
bytes up per gateway and round, wall time; one series per strategy). :class:`MultirunSummary`
runs it at the end of every sweep.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from iiotfl.server.report.plots import plot_sweep, strategy_colours
from iiotfl.server.report.privacy import epsilon_cell
from iiotfl.server.report.runs import find_runs, group_value, load_config, load_overrides, run_summary
from iiotfl.server.report.text import cell, finite, fmt, metric_label

GROUPS = ("task", "strategy", "privacy", "link", "codec")  # one column each in the sweep table

SUMMARY_COLUMNS = (
    "run", *GROUPS, "overrides", "status", "metric", "higher_is_better", "initial_metric", "final_metric",
    "evaluation", "plant_worst", "plant_worst_partition", "plant_median", "plant_best", "plants",
    "epsilon", "delta", "bytes_up_per_client_round", "bytes_down_per_client_round", "wall_s",
    "mean_round_s", "sim_round_s", "engine", "gateways", "rounds_done", "late_replies", "initial_rmse", "final_rmse",
    "final_rmse_last", "final_phm_score", "error",
)

NUMERIC_HEADS = ("initial", "final", "worst plant", "median plant", "ε", "bytes up / gw / round",
                 "bytes down / gw / round", "wall [s]", "round [s]",
                 "simulated round [s]")  # right-aligned columns of summary.md

ABOUT_TABLE = (
    "Metric: each task's primary metric on the server's held-out data after the last round (**bold**: the "
    "task's best completed run; ↓ lower is better, ↑ higher is better); \"(gateways)\": a run without a "
    "server-side test set, its final model scored by the gateways on their own held-out data (their mean "
    "weighted by held-out examples, no initial value), ranked only against such runs. Worst / median plant: the "
    "same metric for the final model on the worst and the median gateway's own held-out data (each plant's "
    "evaluation, report.md \"Per plant\"; -: the run has none). ε: privacy spent "
    "(sample-level DP: the largest per-gateway ε; client-level: the fleet's; ∞: no DP). Bytes: the model payload "
    "per gateway and round. Round: mean measured round time; simulated: the engine=sim link clock.")

ABOUT_PLOTS = (
    "Completed runs only. Left: the metric against ε (runs without DP at the right edge, ∞, and the best of "
    "them as a dashed line per strategy; solid lines join sample-level DP runs, dotted ones client-level); "
    "middle: against kB up per gateway and round; right: against the run's wall time. One colour and "
    "marker per strategy; labels name what else differs between the points.")


def sweep_rows(root: str | Path) -> list[dict[str, Any]]:
    """One row per run directory below ``root``: the run's groups, overrides and :func:`run_summary`."""
    root = Path(root)
    rows = []
    for run in find_runs(root):
        overrides = load_overrides(run)
        cfg = load_config(run)
        summary = run_summary(run)
        groups = {g: group_value(g, cfg, overrides) for g in GROUPS}
        if not groups["task"]:
            groups["task"] = summary["task"] or ""
        rows.append({"run": run.relative_to(root).as_posix() if run != root else ".", **summary, **groups,
                     "all_overrides": overrides})
    # overrides shared by every run go above the table; a row lists the ones that vary and are not a group
    common = set.intersection(*(set(r["all_overrides"]) for r in rows)) if rows else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["all_overrides"]
                                  if o not in common and o.lstrip("+~").partition("=")[0] not in GROUPS)
    for r in rows:
        r["common_overrides"] = sorted(common)
    return rows


def best_runs(rows: list[dict[str, Any]]) -> set[int]:
    """Indices of the best completed run of each task (by that task's primary metric); runs scored by the
    gateways on their own data (no server-side test set) are ranked among themselves."""
    best: dict[tuple[str, bool], tuple[float, int]] = {}
    for i, r in enumerate(rows):
        v = r.get("final_metric")
        if r["status"] != "completed" or not finite(v):
            continue
        score = v if r.get("higher_is_better") else -v
        key = (r["task"], r.get("evaluation") == "gateways")
        if key not in best or score > best[key][0]:
            best[key] = (score, i)
    return {i for _, i in best.values()}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "unknown") or "unknown"


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path]:
    """``summary.md`` (one table over every run below ``sweep_dir``, and the plots), ``summary.csv``
    and one ``sweep-<task>.png`` per task. Returns (csv, md)."""
    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    for old in sweep_dir.glob("sweep-*.png"):
        old.unlink()
    md = _table_lines(rows) + _plot_lines(rows, sweep_dir)
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def _table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The head of summary.md and its table: one row per run, the best of each task in bold."""
    failed = [r for r in rows if r["status"] != "completed"]
    md = ["# iiotfl sweep report", ""]
    md.append(f"{len(rows)} runs, {len(rows) - len(failed)} completed, {len(failed)} "
              + ("failed or unfinished (their reason is in the last column)." if failed else "failed."))
    common = rows[0]["common_overrides"] if rows else []
    if common:
        md += ["", "Overrides of every run: " + " ".join(f"`{o}`" for o in common)]
    md += ["", ABOUT_TABLE, ""]
    show_overrides = any(r["overrides"] for r in rows)
    head = ["run", *GROUPS] + (["overrides"] if show_overrides else []) + [
        "status", "metric", "initial", "final", "worst plant", "median plant", "ε", "bytes up / gw / round",
        "bytes down / gw / round", "wall [s]", "round [s]", "simulated round [s]", "error"]
    md += ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in NUMERIC_HEADS else "---" for h in head) + "|"]
    best = best_runs(rows)
    for i, r in enumerate(rows):
        cells = [cell(c) for c in _row_cells(r, show_overrides)]
        if i in best:
            cells[head.index("final")] = f"**{cells[head.index('final')]}**"
        if r["status"] != "completed":
            cells[head.index("status")] = f"**{cells[head.index('status')]}**"
        md.append("| " + " | ".join(cells) + " |")
    return md


def _row_cells(r: dict[str, Any], show_overrides: bool) -> list[Any]:
    """The cells of one run's row, before escaping."""
    arrow = "" if r.get("higher_is_better") is None else (" ↑" if r["higher_is_better"] else " ↓")
    final = fmt(r.get("final_metric")) + (" (gateways)" if r.get("evaluation") == "gateways" else "")
    return [r["run"], r["task"] or "-", r["strategy"] or "-", r["privacy"] or "-", r["link"] or "-",
            r["codec"] or "-"] + ([r["overrides"] or "-"] if show_overrides else []) + [
        r["status"], (metric_label(r["metric"]) + arrow) if r["metric"] else "-", fmt(r.get("initial_metric")),
        final, fmt(r.get("plant_worst")), fmt(r.get("plant_median")), epsilon_cell(r),
        fmt(r.get("bytes_up_per_client_round")), fmt(r.get("bytes_down_per_client_round")), fmt(r.get("wall_s")),
        fmt(r.get("mean_round_s")), fmt(r.get("sim_round_s")), r.get("error") or ""]


def _plot_lines(rows: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """One ``sweep-<task>.png`` per task with a completed run, and the part of summary.md showing them."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    colours = strategy_colours(sorted({r["strategy"] for r in rows}))
    plots = []
    for task in tasks:
        name = f"sweep-{_slug(task)}.png"
        if plot_sweep(rows, task, sweep_dir / name, colours):
            plots.append((task, name))
    md = []
    if plots:
        md += ["", "## Trade-offs", "", ABOUT_PLOTS]
        for task, name in plots:
            md += ["", f"### {task}", "", f"![{task}: trade-offs]({name})"]
    missing = [t for t in tasks if t not in {t2 for t2, _ in plots}]
    if missing:
        md += ["", "No completed run (nothing to plot) for: " + ", ".join(t or "unknown task" for t in missing) + "."]
    return md


class MultirunSummary(Callback):
    """Hydra callback: at the end of a ``-m`` sweep, write summary.md, summary.csv and the trade-off plots."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            _, md_path = write_summary(sweep_dir)
        except Exception as err:  # noqa: BLE001 - the runs are done; say why the summary is missing
            print(f"error: the sweep summary could not be written ({type(err).__name__}: {err}); "
                  f"retry with: iiotfl report {sweep_dir}")
            return
        rows = sweep_rows(sweep_dir)
        failed = [r for r in rows if r["status"] != "completed"]
        print(f"sweep report: {md_path} ({len(rows)} runs, {len(failed)} failed)")
        for r in failed:
            print(f"  failed: {sweep_dir / r['run']} — {r.get('error') or r['status']}")
