"""Run reports: ``report.md`` and ``metrics.png`` per run; one table and trade-off plots per sweep.

A run directory holds what the ServerApp wrote (``metrics.jsonl`` as rounds finish,
``metrics.json`` and the encrypted, signed ``model.ckpt`` at the end), what the launcher wrote
(``launch.json``: engine, status, wall time, traffic seen by the SuperLink), what Hydra wrote
(``.hydra/config.yaml``, ``.hydra/overrides.yaml``) and what ``iiotfl export`` measured
(``export/export.json``). :func:`write_report` renders whatever is there, so a failed run still
gets a report that says how far it got.

Every task names its own primary metric and direction (``metrics.json``: ``primary_metric``,
``higher_is_better``; :class:`tasks.Task`): reports headline that metric, never a fixed one.

:func:`write_summary` collects every run directory below a directory (a ``-m`` sweep, or several)
into ``summary.md`` (one table: task, strategy, privacy, link, codec, status, primary metric, epsilon,
bytes per gateway and round, wall and round time, the reason of each failed run), ``summary.csv``
(the same, machine-readable) and one ``sweep-<task>.png`` per task (metric against epsilon, bytes
up per gateway and round, wall time; one series per strategy). :class:`MultirunSummary` runs it at
the end of every sweep.
"""

from __future__ import annotations

import csv
import math
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def load_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line cut short by a crash is left out."""
    from iiotfl.privacy.ledger import read_jsonl

    rows = [row for row in read_jsonl(Path(run_dir) / "metrics.jsonl") if "round" in row]
    for row in rows:
        row.setdefault("server", {})
        row.setdefault("clients", [])
        row.setdefault("round_time", 0.0)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config: ``config.yaml`` (resolved, written when the run started) or
    Hydra's ``.hydra/config.yaml`` (also there for a run refused by the config checks)."""
    import yaml

    for path in (Path(run_dir) / "config.yaml", Path(run_dir) / ".hydra" / "config.yaml"):
        if path.exists():
            try:
                cfg = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(cfg, dict):
                return cfg
    return {}


def load_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of the run (``.hydra/overrides.yaml``), hydra.* left out."""
    import yaml

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(o) for o in items if not str(o).lstrip("+~").startswith("hydra.")]


def metric_of(final: dict[str, Any], task: str | None) -> tuple[str | None, bool | None]:
    """(primary metric, higher is better) of the run's task: from ``metrics.json``, else from the
    class of ``task`` (a run that failed before the end), else (None, None)."""
    if final.get("primary_metric"):
        return str(final["primary_metric"]), bool(final.get("higher_is_better", False))
    if task:
        try:
            from iiotfl.tasks import task_class

            cls = task_class(task)
            return str(cls.primary_metric), bool(cls.higher_is_better)
        except Exception:  # noqa: BLE001 - a task this checkout does not have
            pass
    return None, None


def privacy_spent(mechanism: str, final: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mechanism, epsilon and delta a run spent. No DP: epsilon = inf. Sample-level DP: the largest
    epsilon of any gateway (each composes over its own rounds); client-level: the fleet's."""
    mechanism = mechanism or (final.get("privacy") or {}).get("mechanism") or "none"
    if mechanism == "none":
        return {"dp": "none", "epsilon": math.inf, "delta": None}
    eps, delta = None, None
    for r in rounds:
        p = r.get("privacy") or {}
        for key in ("epsilon", "device_epsilon_max"):
            v = p.get(key)
            if _finite(v) and (eps is None or v > eps):
                eps = float(v)
        if p.get("delta") is not None:
            delta = p["delta"]
    for c in (final.get("privacy") or {}).get("checks") or []:  # sample-level: per gateway, recomputed
        v = c.get("reported")
        if _finite(v) and (eps is None or v > eps):
            eps, delta = float(v), c.get("delta", delta)
    return {"dp": mechanism, "epsilon": eps, "delta": delta}


def group_value(name: str, cfg: dict[str, Any], overrides: list[str]) -> str:
    """The option of config group ``name`` a run used: its override first (also right for a sweep
    point whose config could not be composed), else the composed config."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == name:
            return value
    section = cfg.get(name)
    if not isinstance(section, dict):
        return ""
    value = str(section.get("name", ""))
    if name == "link":  # a fleet with mixed links says so
        mix = (cfg.get("fleet") or {}).get("link_mix") or {} if isinstance(cfg.get("fleet"), dict) else {}
        if mix:
            value = "mix " + ", ".join(f"{k}:{v}" for k, v in mix.items())
    return value


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures one run is judged by (also one row of a sweep table)."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    launch = _read_json(run_dir / "launch.json")
    final = _read_json(run_dir / "metrics.json")
    cfg, overrides = load_config(run_dir), load_overrides(run_dir)
    task = final.get("task") or group_value("task", cfg, overrides)
    metric, higher = metric_of(final, task)
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
        "task": task,
        "rounds_done": len(trained),
        "metric": metric,
        "higher_is_better": higher,
        "initial_metric": first.get(metric) if metric else None,
        "final_metric": last.get(metric) if metric else None,
        **privacy_spent(group_value("privacy", cfg, overrides), final, rounds),
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


METRIC_LABELS = {"rmse": "RMSE", "rmse_last": "RMSE last cycle", "phm_score": "PHM08 score", "pr_auc": "PR-AUC",
                 "roc_auc": "ROC AUC", "f1": "F1", "accuracy": "accuracy", "precision": "precision",
                 "recall": "recall"}


def metric_label(name: str | None) -> str:
    """``rmse`` -> RMSE, ``pr_auc_machine`` -> PR-AUC machine; unknown names as they are."""
    if not name:
        return "metric"
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    for prefix in ("pr_auc", "roc_auc", "f1", "rmse"):
        if name.startswith(prefix + "_"):
            return f"{METRIC_LABELS[prefix]} {name[len(prefix) + 1:].replace('_', ' ')}"
    return name


def direction(higher_is_better: bool | None) -> str:
    return "" if higher_is_better is None else ("higher is better" if higher_is_better else "lower is better")


def metric_columns(rounds: list[dict[str, Any]], primary: str | None, most: int = 8) -> list[str]:
    """Server-side metrics of the rounds, the primary one first, at most ``most`` (num-examples left
    out; every metric is in metrics.jsonl)."""
    keys: list[str] = [primary] if primary else []
    for r in rounds:
        for k in r["server"]:
            if k not in keys and k != "num-examples":
                keys.append(k)
    return keys[:most]


def plot_rounds(rounds: list[dict[str, Any]], path: Path, metric: str | None = None,
                higher_is_better: bool | None = None) -> bool:
    """PNG of the server-side primary metric and mean client training loss per round."""
    scored = [r for r in rounds if r["server"]]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or next(iter(metric_columns(scored, None)), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["round"] for r in scored]
    # RMSE at the last cycle is in the same unit as RMSE: one axis for both
    for key in [metric] + (["rmse_last"] if metric == "rmse" else []):
        pts = [(n, r["server"][key]) for n, r in zip(x, scored) if _finite(r["server"].get(key))]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=metric_label(key))
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("RUL error [cycles]" if metric == "rmse" else
                       f"{metric_label(metric)}" + (f" ({direction(higher_is_better)})" if higher_is_better is not None else ""))
    axes[0].set_title("Global model on held-out data")
    axes[0].legend()
    trained = [r for r in rounds if r["clients"]]
    positive = True
    for part in sorted({c.get("partition") for r in trained for c in r["clients"]}, key=str):
        pts = [(r["round"], c["train_loss"]) for r in trained for c in r["clients"]
               if c.get("partition") == part and _finite(c.get("train_loss"))]
        if not pts:
            continue
        positive = positive and all(v > 0 for _, v in pts)
        axes[1].plot(*zip(*pts), marker=".", label=f"gateway {int(part)}" if part is not None else "gateway")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("local training loss (MSE of RUL/cap)" if metric == "rmse" else "local training loss")
    if positive:
        axes[1].set_yscale("log")
    axes[1].set_title("Local training per gateway")
    if trained:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _epsilon_text(s: dict[str, Any]) -> str:
    if s["dp"] == "none":
        return "no differential privacy (epsilon = infinity)"
    kind = {"sample": "sample-level DP, largest per-gateway epsilon", "client": "client-level DP, fleet epsilon"}
    eps = _fmt(s["epsilon"]) if s["epsilon"] is not None else "not reported"
    return f"{kind.get(s['dp'], s['dp'])} {eps}" + (f" at delta {_fmt(s['delta'])}" if s["delta"] is not None else "")


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` (and ``metrics.png``) from what the run directory holds."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    launch = _read_json(run_dir / "launch.json")
    final = _read_json(run_dir / "metrics.json")
    s = run_summary(run_dir)
    metric = s["metric"]
    links = _read_json(run_dir / "links.json").get("emulation") or launch.get("links")
    lines = ["# iiotfl run report", ""]
    if links:
        lines += [f"**Links: {links}.**", ""]
    if launch.get("transport"):
        lines += [f"**Transport: {launch['transport']}.**", ""]
    for event in launch.get("resumed") or []:
        lines += [f"**The SuperLink died (exit code {event['superlink_exit']}) {event['at_s']:.0f} s into the run; it "
                  f"was restarted on its state database and the run resumed after round {event['after_round']} "
                  "from that round's checkpoint.**", ""]
    for note in launch.get("notes", []):
        lines.append(f"> {note}")
    if launch.get("notes"):
        lines.append("")
    headline = (f"- global {metric_label(metric)} ({direction(s['higher_is_better'])}): "
                f"{_fmt(s['initial_metric'])} (initial) → {_fmt(s['final_metric'])} (final)") if metric else \
        "- global metric: - (no server-side evaluation recorded)"
    if s["final_rmse_last"] is not None or s["final_phm_score"] is not None:  # predictive maintenance
        headline += (f"; RMSE at last cycle {_fmt(s['final_rmse_last'])}, PHM08 score {_fmt(s['final_phm_score'])}")
    columns = metric_columns(rounds, metric)
    lines += [
        f"- status: **{s['status']}**" + (f" — {s['error']}" if s["error"] else ""),
        f"- task: {s['task'] or '-'}, engine: {_fmt(s['engine'])}, gateways: {_fmt(s['gateways'])}",
        f"- rounds completed: {s['rounds_done']}, wall time: {_fmt(s['wall_s'])} s, "
        f"mean round: {_fmt(s['mean_round_s'])} s",
        headline,
        f"- privacy: {_epsilon_text(s)}",
        f"- model: {_fmt(final.get('parameters'))} parameters, {_fmt(final.get('model_bytes'))} bytes",
        f"- bytes per gateway per round (model payload): up {_fmt(s['bytes_up_per_client_round'])}, "
        f"down {_fmt(s['bytes_down_per_client_round'])}; all traffic seen by the SuperLink: "
        f"{_fmt(s['superlink_bytes'])} bytes",
        "",
        "## Rounds",
        "",
        "| round | time [s] | simulated [s] | " + "".join(f"{metric_label(k)} | " for k in columns)
        + "gateways | late | mean train loss |",
        "|---:|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|",
    ]
    for r in rounds:
        sv, cl = r["server"], r["clients"]
        losses = [c["train_loss"] for c in cl if "train_loss" in c]
        loss = sum(losses) / len(losses) if losses else None
        lines.append(
            f"| {r['round']} | {_fmt(r['round_time'])} | {_fmt(r.get('sim_round_s'))} | "
            + "".join(f"{_fmt(sv.get(k))} | " for k in columns)
            + f"{r.get('aggregated', len(cl))} | {len(r.get('late') or [])} | {_fmt(loss)} |"
        )
    hidden = metric_columns(rounds, metric, most=10**6)[len(columns):]
    if hidden:
        lines += ["", f"Also evaluated each round (in metrics.jsonl): {', '.join(hidden)}."]
    if plot_rounds(rounds, run_dir / "metrics.png", metric, s["higher_is_better"]):
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
    from iiotfl.privacy.ledger import load

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
             ]
    f32 = (ex.get("metrics") or {}).get("float32") or {}
    primary = [ex["primary_metric"]] if ex.get("primary_metric") in f32 else []
    keys = (primary + [k for k in f32 if k not in primary and k != "num-examples"])[:4]  # the task's own, primary first
    lines += ["| model | TorchScript size [B] | latency per sample [µs] | " + " | ".join(keys) + " |",
              "|---|---:|---:|" + "---:|" * len(keys)]
    for name in ("float32", "int8"):
        m = ex["metrics"].get(name) or {}
        lines.append(f"| {name} | {_fmt(ex[f'{name}_bytes'])} | {_fmt(ex['latency_us'][name])} | "
                     + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    if ex["metrics"]:
        i8 = ex["metrics"]["int8"]
        delta = ", ".join(f"{k} {i8[k] - f32[k]:+.4g}" for k in keys if k in i8)
        unit = " cycles" if "rmse" in keys else ""
        lines += ["", f"Change int8 − float32 on the server's test data: {delta}; largest change of one prediction: "
                      f"{_fmt(ex['max_abs_prediction_change'])}{unit}."]
    lines += ["", f"Latency: {ex['latency_setup']}."]
    if ex.get("note"):
        lines += ["", f"Note: {ex['note']}."]
    return lines


# --- sweeps ---------------------------------------------------------------------------------

GROUPS = ("task", "strategy", "privacy", "link", "codec")  # one column each in the sweep table

SUMMARY_COLUMNS = (
    "run", *GROUPS, "overrides", "status", "metric", "higher_is_better", "initial_metric", "final_metric",
    "epsilon", "delta", "bytes_up_per_client_round", "bytes_down_per_client_round", "wall_s", "mean_round_s",
    "sim_round_s", "engine", "gateways", "rounds_done", "late_replies", "initial_rmse", "final_rmse",
    "final_rmse_last", "final_phm_score", "error",
)

_SKIP_DIRS = {"flwr", "logs", "checkpoints", "export", "certs", "he-keys", ".hydra"}


def is_run_dir(path: Path) -> bool:
    """A run directory: what ``iiotfl run`` (one run or one point of a sweep) writes."""
    path = Path(path)
    return any((path / name).exists() for name in ("launch.json", "metrics.jsonl", "metrics.json")) \
        or (path / ".hydra" / "config.yaml").exists()


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory at or below ``root`` (a sweep, a day of sweeps, ``runs/``), in natural order."""
    import os
    import re

    root = Path(root)
    found = []
    for here, dirs, _ in os.walk(root):
        if is_run_dir(Path(here)):
            found.append(Path(here))
            dirs[:] = []  # a run's own folders (flwr/, logs/, ...) hold no runs
            continue
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]

    def key(p: Path) -> list[Any]:
        rel = p.relative_to(root).as_posix()
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", rel) if t]

    return sorted(found, key=key)


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


def _best(rows: list[dict[str, Any]]) -> set[int]:
    """Indices of the best completed run of each task (by that task's primary metric)."""
    best: dict[str, tuple[float, int]] = {}
    for i, r in enumerate(rows):
        v = r.get("final_metric")
        if r["status"] != "completed" or not _finite(v):
            continue
        score = v if r.get("higher_is_better") else -v
        if r["task"] not in best or score > best[r["task"]][0]:
            best[r["task"]] = (score, i)
    return {i for _, i in best.values()}


def _epsilon_cell(r: dict[str, Any]) -> str:
    if not r.get("rounds_done") and r.get("status") != "completed":
        return "-"  # nothing was trained, nothing spent
    if r.get("dp") == "none":
        return "∞ (no DP)"
    return _fmt(r.get("epsilon"))


def _cell(value: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(_fmt(value).split()).replace("|", "\\|")


def plot_sweep(rows: list[dict[str, Any]], task: str, path: Path, colours: dict[str, Any]) -> bool:
    """Trade-offs of one task's completed runs: primary metric against epsilon (no DP at the right
    edge and as dashed reference lines), bytes up per gateway and round, and wall time. One series
    (colour, marker) per strategy; points labelled with what else differs between the runs."""
    done = [r for r in rows if r["task"] == task and r["status"] == "completed" and _finite(r.get("final_metric"))]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, higher = done[0]["metric"], done[0].get("higher_is_better")
    varying = [g for g in ("strategy", "privacy", "link", "codec") if len({r[g] for r in done}) > 1]
    label_keys = [g for g in varying if g != "strategy"]

    def label(r: dict[str, Any]) -> str:
        parts = [f"{g}={r[g]}" for g in label_keys] + ([r["overrides"]] if r["overrides"] else [])
        return ", ".join(p for p in parts if p)

    annotate = len(done) <= 16
    strategies = sorted({r["strategy"] for r in done})
    markers = "osD^v<>ph*"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    values = [r["final_metric"] for r in done]
    log_y = min(values) > 0 and max(values) / min(values) > 100

    # (1) metric vs epsilon
    ax = axes[0]
    finite_eps = [r["epsilon"] for r in done if r["dp"] != "none" and _finite(r.get("epsilon"))]
    log_x = bool(finite_eps) and min(finite_eps) > 0 and max(finite_eps) / min(finite_eps) > 20
    if finite_eps:
        x_inf = max(finite_eps) * (3.0 if log_x else 1.25) if max(finite_eps) > 0 else 1.0
    else:
        x_inf = 1.0
    styles = {"sample": "-", "client": ":"}
    for j, strat in enumerate(strategies):
        c, m = colours.get(strat), markers[j % len(markers)]
        mine = [r for r in done if r["strategy"] == strat]
        dp = [r for r in mine if r["dp"] != "none" and _finite(r.get("epsilon"))]
        plain = [r for r in mine if r["dp"] == "none"]
        labelled = False
        for mech in sorted({r["dp"] for r in dp}):  # one line per DP mechanism, along epsilon
            pts = sorted((r for r in dp if r["dp"] == mech), key=lambda r: r["epsilon"])
            ax.plot([r["epsilon"] for r in pts], [r["final_metric"] for r in pts], marker=m, color=c,
                    linestyle=styles.get(mech, "-"), label=None if labelled else strat)
            labelled = True
        if plain:
            ax.scatter([x_inf] * len(plain), [r["final_metric"] for r in plain], marker=m, color=c,
                       label=None if labelled else strat, zorder=3)
            ref = (max if higher else min)(r["final_metric"] for r in plain)
            ax.axhline(ref, color=c, linestyle="--", linewidth=0.9, alpha=0.7)
        if annotate:
            for r in dp + plain:
                x = r["epsilon"] if r["dp"] != "none" else x_inf
                ax.annotate(label(r), (x, r["final_metric"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if finite_eps:
        if log_x:
            ax.set_xscale("log")
            lo, hi = min(finite_eps) / 2, x_inf * 1.6
        else:
            lo, hi = min(0.0, min(finite_eps)), x_inf * 1.1
        ax.set_xlim(lo, hi)
        ticks = [t for t in ax.get_xticks() if lo <= t <= (x_inf / 1.7 if log_x else x_inf - 0.12 * (x_inf - lo))]
    else:  # no DP anywhere: one column of points at "no DP"
        ax.set_xlim(0.5, 1.5)
        ticks = []
    ax.minorticks_off()
    ax.set_xticks(list(ticks) + [x_inf], [f"{t:g}" for t in ticks] + ["∞\n(no DP)"])
    ax.set_xlabel("epsilon spent (privacy; dashed: best run without DP)")
    ax.set_ylabel(f"{metric_label(metric)} ({direction(higher)})")
    ax.set_title(f"{task}: {metric_label(metric)} vs privacy")

    # (2) metric vs bytes up per gateway and round; (3) metric vs wall time
    for ax, key, scale, xlabel, title in (
        (axes[1], "bytes_up_per_client_round", 1e-3, "kB up per gateway per round (model payload)", "vs communication"),
        (axes[2], "wall_s", 1.0, "wall time of the run [s]", "vs wall time"),
    ):
        xs = [r[key] for r in done if _finite(r.get(key)) and r[key] > 0]
        for j, strat in enumerate(strategies):
            pts = [r for r in done if r["strategy"] == strat and _finite(r.get(key))]
            if not pts:
                continue
            ax.scatter([r[key] * scale for r in pts], [r["final_metric"] for r in pts],
                       marker=markers[j % len(markers)], color=colours.get(strat), label=strat, zorder=3)
            if annotate:
                for r in pts:
                    ax.annotate(label(r), (r[key] * scale, r["final_metric"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{task}: {metric_label(metric)} {title}")
    for ax in axes:
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="strategy", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _slug(name: str) -> str:
    import re

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

    failed = [r for r in rows if r["status"] != "completed"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    md = ["# iiotfl sweep report", ""]
    md.append(f"{len(rows)} runs, {len(rows) - len(failed)} completed, {len(failed)} "
              + ("failed or unfinished (their reason is in the last column)." if failed else "failed."))
    common = rows[0]["common_overrides"] if rows else []
    if common:
        md += ["", "Overrides of every run: " + " ".join(f"`{o}`" for o in common)]
    md += ["", "Metric: each task's primary metric on the server's held-out data after the last round (**bold**: the "
           "task's best completed run; ↓ lower is better, ↑ higher is better). ε: privacy spent (sample-level DP: the "
           "largest per-gateway ε; client-level: the fleet's; ∞: no DP). Bytes: the model payload per gateway and "
           "round. Round: mean measured round time; simulated: the engine=sim link clock.", ""]
    show_overrides = any(r["overrides"] for r in rows)
    head = ["run", "task", "strategy", "privacy", "link", "codec"] + (["overrides"] if show_overrides else []) + [
        "status", "metric", "initial", "final", "ε", "bytes up / gw / round", "bytes down / gw / round", "wall [s]",
        "round [s]", "simulated round [s]", "error"]
    md += ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in (
        "initial", "final", "ε", "bytes up / gw / round", "bytes down / gw / round", "wall [s]", "round [s]",
        "simulated round [s]") else "---" for h in head) + "|"]
    best = _best(rows)
    for i, r in enumerate(rows):
        arrow = "" if r.get("higher_is_better") is None else (" ↑" if r["higher_is_better"] else " ↓")
        final = _fmt(r.get("final_metric"))
        cells = [r["run"], r["task"] or "-", r["strategy"] or "-", r["privacy"] or "-", r["link"] or "-",
                 r["codec"] or "-"] + ([r["overrides"] or "-"] if show_overrides else []) + [
            r["status"], (metric_label(r["metric"]) + arrow) if r["metric"] else "-", _fmt(r.get("initial_metric")),
            final, _epsilon_cell(r), _fmt(r.get("bytes_up_per_client_round")),
            _fmt(r.get("bytes_down_per_client_round")), _fmt(r.get("wall_s")), _fmt(r.get("mean_round_s")),
            _fmt(r.get("sim_round_s")), r.get("error") or ""]
        cells = [_cell(c) for c in cells]
        if i in best:
            cells[head.index("final")] = f"**{cells[head.index('final')]}**"
        if r["status"] != "completed":
            cells[head.index("status")] = f"**{cells[head.index('status')]}**"
        md.append("| " + " | ".join(cells) + " |")

    strategies = sorted({r["strategy"] for r in rows})
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    colours = {s: palette(i % 10) for i, s in enumerate(strategies)}
    plots = []
    for task in tasks:
        name = f"sweep-{_slug(task)}.png"
        if plot_sweep(rows, task, sweep_dir / name, colours):
            plots.append((task, name))
    if plots:
        md += ["", "## Trade-offs", "",
               "Completed runs only. Left: the metric against ε (runs without DP at the right edge, ∞, and the best of "
               "them as a dashed line per strategy; solid lines join sample-level DP runs, dotted ones client-level); "
               "middle: against kB up per gateway and round; right: against the run's wall time. One colour and "
               "marker per strategy; labels name what else differs between the points."]
        for task, name in plots:
            md += ["", f"### {task}", "", f"![{task}: trade-offs]({name})"]
    missing = [t for t in tasks if t not in {t2 for t2, _ in plots}]
    if missing:
        md += ["", "No completed run (nothing to plot) for: " + ", ".join(t or "unknown task" for t in missing) + "."]
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def report(target: str | Path) -> Path:
    """``iiotfl report DIR``: a run directory gets its ``report.md`` (re)written; any other directory
    gets ``summary.md`` over every run below it. Raises FileNotFoundError when there is none."""
    target = Path(target)
    if is_run_dir(target):
        return write_report(target)
    if not find_runs(target):
        raise FileNotFoundError(f"{target} holds no run directory (launch.json, metrics.json or .hydra/config.yaml); "
                                "give a run directory or a sweep directory (multirun/<date>/<time>)")
    return write_summary(target)[1]


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
