"""Run reports: ``report.md`` and ``metrics.png`` per run, one summary table per multirun.

A run directory holds what the ServerApp wrote (``metrics.jsonl`` as rounds finish,
``metrics.json`` and the encrypted, signed ``model.ckpt`` at the end), what the launcher wrote
(``launch.json``: engine, status, wall time, traffic seen by the SuperLink) and what
``iiotfl export`` measured (``export/export.json``).
:func:`write_report` renders whatever is there, so a failed run still gets a report
that says how far it got.
"""

from __future__ import annotations

import csv
import math
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
    up = [c["bytes-up"] for r in trained for c in r["clients"] if "bytes-up" in c]
    down = [c["bytes-down"] for r in trained for c in r["clients"] if "bytes-down" in c]
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
        "sim_round_s": _mean([r.get("sim_round_s") for r in trained]),
        "late_replies": sum(len(r.get("late") or []) for r in trained),
        "links": (_read_json(run_dir / "links.json").get("emulation") or launch.get("links") or ""),
        "error": launch.get("error", ""),
    }


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


GATEWAY_FIGURES = ("bytes_up", "bytes_down", "wire_up", "wire_down", "compute_s", "transfer_s", "wait_s",
                   "round_s", "bound_s", "sim_s")


def per_class(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean per-gateway-round figures for each gateway class (link/device)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rounds:
        for g in r.get("gateways") or []:
            groups.setdefault(g.get("class") or "?", []).append(g)
    out = {}
    for cls, rows in sorted(groups.items()):
        done = [g for g in rows if g.get("status") == "aggregated"]
        out[cls] = {
            "gateways": len({g.get("partition") for g in rows}),
            "replies": len(done),
            "late": sum(g.get("status") == "late" for g in rows),
            **{k: _mean([g.get(k) for g in (rows if k.startswith("wire") else done)]) for k in GATEWAY_FIGURES},
        }
    return out


def plot_classes(classes: dict[str, dict[str, Any]], path: Path) -> bool:
    """Stacked compute / transfer / waiting per gateway class, the link-bound clock beside."""
    if not classes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(classes)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bottom = [0.0] * len(names)
    for key, colour in (("compute_s", "tab:blue"), ("transfer_s", "tab:orange"), ("wait_s", "tab:grey")):
        vals = [classes[n][key] or 0.0 for n in names]
        axes[0].bar(names, vals, bottom=bottom, label=key[:-2], color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[0].scatter(names, [classes[n]["sim_s"] or 0.0 for n in names], marker="_", s=600, color="k",
                    label="simulated clock", zorder=3)
    axes[0].set_ylabel("seconds per gateway and round")
    axes[0].legend(fontsize=7)
    width = 0.2
    for j, key in enumerate(("bytes_up", "bytes_down", "wire_up", "wire_down")):
        axes[1].bar([i + (j - 1.5) * width for i in range(len(names))],
                    [(classes[n][key] or 0.0) / 1000 for n in names], width, label=key)
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylabel("kB per gateway and round")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
        pts = [(r["round"], c["train_loss"]) for r in trained for c in r["clients"]
               if c.get("partition") == part and "train_loss" in c]
        if not pts:
            continue
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
    links = _read_json(run_dir / "links.json").get("emulation") or launch.get("links")
    lines = ["# iiotfl run report", ""]
    if links:
        lines += [f"**Links: {links}.**", ""]
    if launch.get("transport"):
        lines += [f"**Transport: {launch['transport']}.**", ""]
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
        "| round | time [s] | simulated [s] | RMSE | RMSE last cycle | PHM08 score | gateways | late | mean train loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        sv, cl = r["server"], r["clients"]
        losses = [c["train_loss"] for c in cl if "train_loss" in c]
        loss = sum(losses) / len(losses) if losses else None
        lines.append(
            f"| {r['round']} | {_fmt(r['round_time'])} | {_fmt(r.get('sim_round_s'))} | {_fmt(sv.get('rmse'))} "
            f"| {_fmt(sv.get('rmse_last'))} | {_fmt(sv.get('phm_score'))} | {r.get('aggregated', len(cl))} "
            f"| {len(r.get('late') or [])} "
            f"| {_fmt(loss)} |"
        )
    if plot_rounds(rounds, run_dir / "metrics.png"):
        lines += ["", "![metrics per round](metrics.png)"]
    classes = per_class(rounds)
    if classes:
        lines += [
            "", "## Gateways by class (link/device)", "",
            "Means per gateway and round. Application bytes: the Flower message payload; wire bytes: the "
            "gateway's veth counters (headers, retransmissions, Flower's polling and heartbeats included). "
            "Round time (push to reply) = compute (the ClientApp's handler) + transfer (bytes over the link "
            "rates plus round trips) + waiting (the rest). Link bound: compute + transfer. Simulated: the "
            "clock of engine=sim (link bound + Flower's own per-exchange overhead + outage waiting).",
            "",
            "| class | gateways | replies | late | app up [B] | app down [B] | wire up [B] | wire down [B] "
            "| compute [s] | transfer [s] | waiting [s] | round [s] | link bound [s] | simulated [s] |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cls, c in classes.items():
            lines.append(f"| {cls} | {c['gateways']} | {c['replies']} | {c['late']} | "
                         + " | ".join(_fmt(c[k]) for k in GATEWAY_FIGURES) + " |")
        if plot_classes(classes, run_dir / "links.png"):
            lines += ["", "![time and bytes per gateway class](links.png)"]
        late = [(r["round"], r["late"]) for r in rounds if r.get("late")]
        if late:
            lines += ["", "Late (excluded) gateways: " + "; ".join(f"round {n}: {g}" for n, g in late)]
        outages = run_dir / "outages.jsonl"
        if outages.exists():
            events = [json.loads(x) for x in outages.read_text().splitlines() if x.strip()]
            lines += ["", "Outages: " + "; ".join(
                f"gateway {e['gateway']} {e['state']} at {e['t']:.1f}s (round {e['round']})" for e in events)]
    lines += privacy_section(run_dir, final)
    lines += export_section(run_dir)
    if launch.get("logs"):
        lines += ["", "## Logs", ""] + [f"- {name}: `{path}`" for name, path in launch["logs"].items()]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def privacy_section(run_dir: Path, final: dict[str, Any]) -> list[str]:
    """What left each plant, in what form, at what privacy cost (from privacy_ledger.jsonl)."""
    from privacy.ledger import load

    rows = load(run_dir / "privacy_ledger.jsonl")
    if not rows:
        return []
    info = final.get("privacy") or {}
    mechanism = info.get("mechanism") or "none"
    lines = ["", "## Privacy: what left each plant", ""]
    lines.append({
        "none": "No differential privacy: updates left the gateways without noise (epsilon = infinity).",
        "sample": "Sample-level DP: DP-SGD (Opacus) on every gateway protects each record of that plant; epsilon "
                  "is per gateway, composed over every round it trained in.",
        "client": "Client-level DP: Flower's DP wrappers clip each gateway's update and add Gaussian noise to the "
                  "sum, protecting a whole plant's participation; epsilon (Flower's RDP accountant) is the fleet's.",
    }.get(mechanism, mechanism))
    lines += ["", "| gateway | rounds sent | bytes sent | form | clip norm | noise multiplier | epsilon spent | delta "
              "| budget left | stopped |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    by_gw: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_gw.setdefault(r["gateway"], []).append(r)
    for gw, rs in sorted(by_gw.items(), key=lambda kv: (kv[0] is None, kv[0])):
        sent = [r for r in rs if r["status"] == "sent" and r["round"] > 0]
        last = (sent or rs)[-1]
        stopped = next((f"round {r['round']}: budget spent" for r in rs if r["status"] == "budget-spent"), "")
        forms = sorted({r["form"] for r in rs if r["status"] == "sent"}) or ["nothing"]
        lines.append(f"| {gw} | {len(sent)} | {_fmt(sum(r['bytes_sent'] or 0 for r in rs))} | {'; '.join(forms)} "
                     f"| {_fmt(last.get('clip_norm'))} | {_fmt(last.get('noise_multiplier'))} "
                     f"| {_fmt(last.get('epsilon'))} | {_fmt(last.get('delta'))} | {_fmt(last.get('budget_left'))} "
                     f"| {stopped} |")
    checks = info.get("checks") or []
    if checks:
        lines += ["", "Accounting check (every reported epsilon recomputed with Google's dp-accounting; it must "
                  "agree with the RDP figure within 2%):", "",
                  "| scope | delta | reported | dp-accounting RDP | dp-accounting PLD | agrees |",
                  "|---|---:|---:|---:|---:|---|"]
        for c in checks:
            lines.append(f"| {c['scope']} | {_fmt(c['delta'])} | {_fmt(c['reported'])} | {_fmt(c['rdp'])} "
                         f"| {_fmt(c['pld'])} | {'yes' if c['ok'] else '**NO — CHECK FAILED**'} |")
    audit = _read_json(run_dir / "audit.json")
    if audit:
        eps = audit.get("epsilon")
        lines += ["", f"Membership-inference audit of the final model (`iiotfl audit`; epsilon "
                      f"{_fmt(eps) if eps is not None else 'infinity'}, delta {_fmt(audit.get('delta'))}; the bound is "
                      "e^epsilon x FPR + delta):", "",
                  "| attack | ROC AUC | TPR at 1% FPR | bound | TPR at 0.1% FPR | bound |", "|---|---:|---:|---:|---:|---:|"]
        for name in ("loss_threshold", "lira"):
            if name in audit:
                a = audit[name]
                lines.append(f"| {name} | {_fmt(a['auc'])} | {_fmt(a['at_fpr_1%']['tpr'])} "
                             f"| {_fmt(a['at_fpr_1%'].get('bound'))} | {_fmt(a['at_fpr_0.1%']['tpr'])} "
                             f"| {_fmt(a['at_fpr_0.1%'].get('bound'))} |")
    for note in final.get("notes") or []:
        lines += ["", f"Note: {note}."]
    return lines


def export_section(run_dir: Path) -> list[str]:
    """The on-device model of ``iiotfl export``: size, latency and metrics, int8 beside float32."""
    ex = _read_json(run_dir / "export" / "export.json")
    if not ex:
        return []
    lines = ["", "## On-device model (`iiotfl export`)", "",
             f"`{ex['file']}`: dynamic int8 TorchScript (quantised layers: {', '.join(ex['quantised_layers'])}; "
             "the rest stays float32), signed with the run's artefact key; `server.export.load_export` checks the "
             "signature (`verify.pub`) before loading it.", "",
             "| model | TorchScript size [B] | latency per sample [µs] | RMSE | RMSE last cycle | PHM08 score |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("float32", "int8"):
        m = ex["metrics"].get(name) or {}
        lines.append(f"| {name} | {_fmt(ex[f'{name}_bytes'])} | {_fmt(ex['latency_us'][name])} | {_fmt(m.get('rmse'))} "
                     f"| {_fmt(m.get('rmse_last'))} | {_fmt(m.get('phm_score'))} |")
    if ex["metrics"]:
        f32, i8 = ex["metrics"]["float32"], ex["metrics"]["int8"]
        delta = ", ".join(f"{k} {i8[k] - f32[k]:+.4g}" for k in ("rmse", "rmse_last", "phm_score"))
        lines += ["", f"Change int8 − float32 on the server's test data: {delta}; largest change of one prediction: "
                      f"{_fmt(ex['max_abs_prediction_change'])} cycles."]
    lines += ["", f"Latency: {ex['latency_setup']}."]
    if ex.get("note"):
        lines += ["", f"Note: {ex['note']}."]
    return lines


SUMMARY_COLUMNS = (
    "run", "overrides", "status", "engine", "gateways", "rounds_done", "initial_rmse", "final_rmse",
    "final_rmse_last", "final_phm_score", "mean_round_s", "sim_round_s", "wall_s", "bytes_up_per_client_round",
    "bytes_down_per_client_round", "late_replies", "error",
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
