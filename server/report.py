"""Run reports: ``report.md`` and ``metrics.png`` per run, one summary table per multirun.

A run directory holds what the ServerApp wrote (``metrics.jsonl`` as rounds finish,
``metrics.json`` and ``model.pt`` at the end) and what the launcher wrote
(``launch.json``: engine, status, wall time, traffic seen by the SuperLink).
:func:`write_report` renders whatever is there, so a failed run still gets a report
that says how far it got.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def load_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures one run is judged by (also one row of a multirun table)."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    launch = _read_json(run_dir / "launch.json")
    scored = [r for r in rounds if r["server"]]
    trained = [r for r in rounds if r["round"] > 0]
    up = [c.get("bytes-up", 0) for r in trained for c in r["clients"]]
    down = [c.get("bytes-down", 0) for r in trained for c in r["clients"]]
    first = scored[0]["server"] if scored else {}
    last = scored[-1]["server"] if scored else {}
    return {
        "status": launch.get("status", "completed" if (run_dir / "metrics.json").exists() else "unknown"),
        "engine": launch.get("engine", ""),
        "gateways": launch.get("gateways", ""),
        "rounds_done": len(trained),
        "initial_rmse": first.get("rmse"),
        "final_rmse": last.get("rmse"),
        "final_rmse_last": last.get("rmse_last"),
        "final_phm_score": last.get("phm_score"),
        "mean_round_s": sum(r["round_time"] for r in trained) / len(trained) if trained else None,
        "wall_s": launch.get("wall_s"),
        "bytes_up_per_client_round": sum(up) / len(up) if up else None,
        "bytes_down_per_client_round": sum(down) / len(down) if down else None,
        "superlink_bytes": launch.get("traffic", {}).get("total-bytes"),
        "error": launch.get("error", ""),
    }


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> bool:
    """PNG of server-side metrics and mean client training loss per round."""
    scored = [r for r in rounds if r["server"]]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["round"] for r in scored]
    for key in ("rmse", "rmse_last"):
        axes[0].plot(x, [r["server"].get(key) for r in scored], marker="o", label=key)
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("RUL error [cycles]")
    axes[0].set_title("Global model on held-out units")
    axes[0].legend()
    trained = [r for r in rounds if r["clients"]]
    for part in sorted({c.get("partition") for r in trained for c in r["clients"]}, key=str):
        pts = [(r["round"], c["train_loss"]) for r in trained for c in r["clients"] if c.get("partition") == part]
        axes[1].plot(*zip(*pts), marker=".", label=f"gateway {int(part)}" if part is not None else "gateway")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("local training loss (MSE of RUL/cap)")
    axes[1].set_yscale("log")
    axes[1].set_title("Local training per gateway")
    if trained:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` (and ``metrics.png``) from what the run directory holds."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    launch = _read_json(run_dir / "launch.json")
    final = _read_json(run_dir / "metrics.json")
    s = run_summary(run_dir)
    lines = ["# iiotfl run report", ""]
    for note in launch.get("notes", []):
        lines.append(f"> {note}")
    if launch.get("notes"):
        lines.append("")
    lines += [
        f"- status: **{s['status']}**" + (f" — {s['error']}" if s["error"] else ""),
        f"- task: {final.get('task', '-')}, engine: {_fmt(s['engine'])}, gateways: {_fmt(s['gateways'])}",
        f"- rounds completed: {s['rounds_done']}, wall time: {_fmt(s['wall_s'])} s, "
        f"mean round: {_fmt(s['mean_round_s'])} s",
        f"- global RMSE: {_fmt(s['initial_rmse'])} (initial) → {_fmt(s['final_rmse'])} (final); "
        f"at last cycle {_fmt(s['final_rmse_last'])}, PHM08 score {_fmt(s['final_phm_score'])}",
        f"- model: {_fmt(final.get('parameters'))} parameters, {_fmt(final.get('model_bytes'))} bytes",
        f"- bytes per gateway per round (model payload): up {_fmt(s['bytes_up_per_client_round'])}, "
        f"down {_fmt(s['bytes_down_per_client_round'])}; all traffic seen by the SuperLink: "
        f"{_fmt(s['superlink_bytes'])} bytes",
        "",
        "## Rounds",
        "",
        "| round | time [s] | RMSE | RMSE last cycle | PHM08 score | gateways | mean train loss |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        sv, cl = r["server"], r["clients"]
        loss = sum(c["train_loss"] for c in cl) / len(cl) if cl else None
        lines.append(
            f"| {r['round']} | {_fmt(r['round_time'])} | {_fmt(sv.get('rmse'))} | {_fmt(sv.get('rmse_last'))} "
            f"| {_fmt(sv.get('phm_score'))} | {len(cl)} | {_fmt(loss)} |"
        )
    if plot_rounds(rounds, run_dir / "metrics.png"):
        lines += ["", "![metrics per round](metrics.png)"]
    if launch.get("logs"):
        lines += ["", "## Logs", ""] + [f"- {name}: `{path}`" for name, path in launch["logs"].items()]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


SUMMARY_COLUMNS = (
    "run", "overrides", "status", "engine", "gateways", "rounds_done", "initial_rmse", "final_rmse",
    "final_rmse_last", "final_phm_score", "mean_round_s", "wall_s", "bytes_up_per_client_round", "error",
)


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path]:
    """One CSV and one markdown table across the runs of a multirun directory."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for run in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").exists()),
                      key=lambda p: (len(p.name), p.name)):
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = ""
        if overrides_file.exists():
            import yaml

            overrides = " ".join(yaml.safe_load(overrides_file.read_text()) or [])
        rows.append({"run": run.name, "overrides": overrides, **run_summary(run)})
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


class MultirunSummary(Callback):
    """Hydra callback: at the end of a ``-m`` sweep, write summary.csv and summary.md."""

    def on_multirun_end(self, config, **kwargs) -> None:
        csv_path, md_path = write_summary(Path(config.hydra.sweep.dir))
        print(f"summary of the sweep: {md_path}")
