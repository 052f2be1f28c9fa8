"""``report.md`` of one run (with ``metrics.png`` and ``links.png``), rendered from whatever the run
directory holds (:mod:`.runs`), so a failed run still gets a report that says how far it got.

Sections, in order: what the launcher noted (links, transport, SuperLink restarts, notes), the
headline figures (status, the task's primary metric and which evaluation it comes from
(:func:`evaluation_text`; none: why), the worst and median plant, privacy spent, bytes), each
plant's own evaluation of the final model (:func:`plants_section`), one row per round,
the gateways by class (when the rounds recorded them) and their estimated energy, privacy (:mod:`.privacy`), the
on-device model of ``iiotfl export``, and the logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iiotfl.server.report.plots import plot_classes, plot_rounds
from iiotfl.server.report.privacy import epsilon_text, privacy_section
from iiotfl.server.report.runs import (
    GATEWAY_FIGURES,
    gateway_classes,
    load_outages,
    load_rounds,
    metric_columns,
    offline_per_class,
    per_class,
    plant_spread_of,
    read_json,
    run_summary,
)
from iiotfl.server.report.text import cell, direction, finite, fmt, metric_label
from iiotfl.server.roundlog import energy_per_class


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` (and ``metrics.png``) from what the run directory holds."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    launch = read_json(run_dir / "launch.json")
    final = read_json(run_dir / "metrics.json")
    s = run_summary(run_dir)
    lines = ["# iiotfl run report", ""]
    lines += _launch_notes(launch, s["links"])  # links.json, else what the launcher said
    lines += _headline(s, final)
    lines += plants_section(rounds, final, s)
    lines += _rounds_section(rounds, s, run_dir)
    lines += versions_section(rounds, s["metric"])
    lines += _classes_section(rounds, run_dir)
    lines += _energy_section(rounds, run_dir)
    lines += privacy_section(run_dir, final)
    lines += export_section(run_dir)
    if launch.get("logs"):
        lines += ["", "## Logs", ""] + [f"- {name}: `{path}`" for name, path in launch["logs"].items()]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _launch_notes(launch: dict[str, Any], links: str | None) -> list[str]:
    """What the launcher recorded about the run's setting: links, transport, restarts, notes."""
    lines = []
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
    return lines


EVALUATED_ON = {"server": "the server's held-out test set", "gateways": "the gateways' own held-out data"}


def _who(failure: dict[str, Any]) -> str:
    part = failure.get("partition")
    return f"gateway {part}" if part is not None else f"gateway (node {failure.get('node')})"


def _why_none(s: dict[str, Any]) -> str:
    """Why a run has no metric."""
    if s.get("evaluation_note"):
        return str(s["evaluation_note"])
    if s.get("status") not in (None, "completed"):
        return "the run ended before the model was evaluated"
    return "metrics.json records no evaluation"


def _gateways_counted(s: dict[str, Any]) -> str:
    n, asked = s.get("evaluation_gateways"), s.get("evaluation_asked")
    return f"{fmt(n)} of {fmt(asked)} gateways" if asked is not None else f"{fmt(n)} gateways"


def evaluation_text(s: dict[str, Any]) -> str:
    """Which evaluation the run's metric comes from (:func:`run_summary`'s ``evaluation`` fields), one
    sentence; without one, why."""
    source = s.get("evaluation")
    if source == "server" and s.get("final_metric") is not None:
        return "the server's held-out test set, after every round"
    if source == "gateways" and s.get("final_metric") is not None:
        failed = "; ".join(f"{_who(f)}: {f.get('reason')}" for f in s.get("evaluation_failed") or [])
        return ("the gateways' own held-out data (no server-side test set): the final model scored by "
                f"{_gateways_counted(s)}, their mean weighted by held-out examples "
                f"({fmt(s.get('evaluation_examples'))} in all)" + (f"; none from {failed}" if failed else ""))
    return f"none — {_why_none(s)}"


def metric_line(s: dict[str, Any]) -> str:
    """The run's metric in one line (``iiotfl run`` prints it at the end): value, direction and which
    evaluation it comes from; without one, why."""
    metric, source, value = s.get("metric"), s.get("evaluation"), s.get("final_metric")
    label = metric_label(metric) if metric else "metric"
    if source not in EVALUATED_ON or value is None:
        return f"no {label}: {_why_none(s)}"
    how = f" ({direction(s['higher_is_better'])})" if s.get("higher_is_better") is not None else ""
    where = EVALUATED_ON[source]
    if source == "gateways":
        where += (f" (no server-side test set; the mean of {_gateways_counted(s)}, weighted by held-out "
                  "examples)")
    return f"final {label}{how}: {fmt(value)}, on {where}"


def _headline(s: dict[str, Any], final: dict[str, Any]) -> list[str]:
    """The figures the run is judged by (:func:`run_summary`), one bullet each."""
    metric = s["metric"]
    if not metric:
        headline = "- global metric: - (not evaluated)"
    elif s["evaluation"] in EVALUATED_ON and s["final_metric"] is not None:
        initial = f"{fmt(s['initial_metric'])} (initial) → " if s["evaluation"] == "server" else ""
        headline = (f"- global {metric_label(metric)} ({direction(s['higher_is_better'])}): "
                    f"{initial}{fmt(s['final_metric'])} (final)")
    else:
        headline = f"- global {metric_label(metric)} ({direction(s['higher_is_better'])}): - (not evaluated)"
    if s["final_rmse_last"] is not None or s["final_phm_score"] is not None:  # predictive maintenance
        headline += (f"; RMSE at last cycle {fmt(s['final_rmse_last'])}, PHM08 score {fmt(s['final_phm_score'])}")
    spread = plant_spread_of(final, metric, s["higher_is_better"])  # each plant's own data, the final model
    return [
        f"- status: **{s['status']}**" + (f" — {s['error']}" if s["error"] else ""),
        f"- task: {s['task'] or '-'}, engine: {fmt(s['engine'])}, gateways: {fmt(s['gateways'])}",
        f"- rounds completed: {s['rounds_done']}, wall time: {fmt(s['wall_s'])} s, "
        f"mean round: {fmt(s['mean_round_s'])} s",
        headline,
        f"- evaluation: {evaluation_text(s)}",
        *([f"- per plant (the final model on each gateway's own held-out data): {spread_text(spread)}"]
          if spread else []),
        f"- privacy: {epsilon_text(s)}",
        f"- model: {fmt(final.get('parameters'))} parameters, {fmt(final.get('model_bytes'))} bytes",
        f"- bytes per gateway per round (model payload): up {fmt(s['bytes_up_per_client_round'])}, "
        f"down {fmt(s['bytes_down_per_client_round'])}; all traffic seen by the SuperLink: "
        f"{fmt(s['superlink_bytes'])} bytes",
    ]


def _plant(partition: Any, node: Any = None) -> str:
    return f"gateway {partition}" if partition is not None else f"gateway (node {node})" if node is not None \
        else "a gateway"


def spread_text(spread: dict[str, Any]) -> str:
    """The worst, median and best plant in one sentence (``gateway_evaluation.spread``)."""
    label = metric_label(spread.get("metric"))
    worst, median, best = spread["worst"], spread["median"], spread["best"]
    middle = list(median.get("partitions") or [])
    where = (f" ({_plant(middle[0])})" if len(middle) == 1
             else f" (the mean of gateways {middle[0]} and {middle[1]})" if len(middle) == 2 and None not in middle
             else "")
    return (f"worst {label} {fmt(worst['value'])} ({_plant(worst.get('partition'), worst.get('node'))}), "
            f"median {fmt(median['value'])}{where}, best {fmt(best['value'])} "
            f"({_plant(best.get('partition'), best.get('node'))}), over {spread['gateways']} "
            + ("plant" if spread["gateways"] == 1 else "plants"))


def plants_section(rounds: list[dict[str, Any]], final: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """Each plant's own evaluation of the final model (metrics.json ``gateway_evaluation``): one row per gateway
    (its class, held-out examples, the task's metrics, primary first; the worst plant's value in bold), the worst
    and median plant, the gateways that gave no figures. Nothing for a run without it."""
    g = final.get("gateway_evaluation") or {}
    per, failed = list(g.get("per_gateway") or []), list(g.get("failed") or [])
    if not per and not failed:
        return []
    metric, higher = s.get("metric"), s.get("higher_is_better")
    spread = plant_spread_of(final, metric, higher)
    keys = [metric] if metric else []
    if metric and any(finite(r.get("personal-" + metric)) for r in per):  # fleet.personalise_epochs
        keys.append("personal-" + metric)
    for reply in per:
        keys += [k for k, v in reply.items() if k not in keys and k not in ("node", "partition", "num-examples")
                 and finite(v)]
    keys = keys[:5]  # the primary metric and the task's next four; every figure is in metrics.json
    classes = gateway_classes(rounds)
    whose = ("The run's metric above is the server's held-out test set; these are each plant's own figures."
             if s.get("evaluation") == "server" else
             "The run's metric above is their mean weighted by held-out examples."
             if s.get("evaluation") == "gateways" else "")
    arrow = "" if higher is None else (" ↑" if higher else " ↓")
    lines = ["", "## Per plant", "",
             f"The final global model (round {fmt(g.get('round'))}) scored by each gateway on its own held-out data "
             f"after the last round (Flower `evaluate` messages). {whose}".rstrip()]
    if per:
        lines += ["", "| gateway | class | held-out examples | "
                  + " | ".join(metric_label(k) + (arrow if k == metric else "") for k in keys) + " |",
                  "|---:|---|---:|" + "---:|" * len(keys)]
    worst = (spread or {}).get("worst") or {}
    for reply in per:
        values = [cell(reply.get(k)) for k in keys]
        if spread and (reply.get("partition"), reply.get("node")) == (worst.get("partition"), worst.get("node")) \
                and len(per) > 1:
            values[0] = f"**{values[0]}**"
        part = reply.get("partition")
        name = str(part) if part is not None else f"(node {reply.get('node')})"
        lines.append(f"| {name} | {classes.get(part, '-')} | {cell(reply.get('num-examples'))} | "
                     + " | ".join(values) + " |")
    if spread:
        lines += ["", f"Across the plants: {spread_text(spread)}."]
        personal = g.get("spread_personal")
        if personal:
            lines += ["", f"Each plant's model fine-tuned on its own data (`fleet.personalise_epochs`; it stays on the "
                          f"gateway, only its figures left): {spread_text(personal)}."]
    elif metric:
        lines += ["", f"No plant gave a {metric_label(metric)} for the final model."]
    if failed:
        lines += ["", "No figures from: " + "; ".join(f"{_plant(f.get('partition'), f.get('node'))}: "
                                                     f"{f.get('reason')}" for f in failed) + "."]
    return lines


def _rounds_section(rounds: list[dict[str, Any]], s: dict[str, Any], run_dir: Path) -> list[str]:
    """One row per round (time, the server-side metrics, replies, mean train loss) and metrics.png."""
    metric = s["metric"]
    columns = metric_columns(rounds, metric)
    lines = [
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
            f"| {r['round']} | {fmt(r['round_time'])} | {fmt(r.get('sim_round_s'))} | "
            + "".join(f"{fmt(sv.get(k))} | " for k in columns)
            + f"{r.get('aggregated', len(cl))} | {len(r.get('late') or [])} | {fmt(loss)} |"
        )
    if rounds and not any(r["server"] for r in rounds):
        lines += ["", "The rounds were not scored: the run had no server-side test set"
                  + (" (its final model was scored by the gateways, above)." if s.get("evaluation") == "gateways"
                     else ".")]
    hidden = metric_columns(rounds, metric, most=10**6)[len(columns):]
    if hidden:
        lines += ["", f"Also evaluated each round (in metrics.jsonl): {', '.join(hidden)}."]
    if plot_rounds(rounds, run_dir / "metrics.png", metric, s["higher_is_better"]):
        lines += ["", "![metrics per round](metrics.png)"]
    return lines


def versions_section(rounds: list[dict[str, Any]], metric: str) -> list[str]:
    """strategy=fedbuff: the global model's version history (when each version was made, the updates it
    applied, their staleness, the metric) and, per gateway class, the updates it contributed and their mean
    staleness. Nothing for a run of synchronous rounds."""
    versions = [r for r in rounds if r.get("version") is not None]
    if not versions:
        return []
    clock = "simulated" if versions[0].get("clock") == "simulated" else "measured"
    lines = ["", "## Global model versions", "",
             f"Buffered asynchronous aggregation (strategy=fedbuff): a version each time the buffer was applied. "
             f"Time: {clock} seconds since the first train message was sent. Staleness: versions made between the "
             "one an update was trained from and the one it was applied to.", "",
             f"| version | time [s] | updates applied | mean staleness | max staleness | dropped | "
             f"{metric_label(metric)} |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in versions:
        lines.append(f"| {r['version']} | {fmt(r.get('time_s'))} | {len(r.get('applied') or [])} | "
                     f"{fmt(r.get('staleness_mean'))} | {fmt(r.get('staleness_max'))} | "
                     f"{len(r.get('dropped') or [])} | {fmt((r.get('server') or {}).get(metric))} |")
    dropped = [(r["version"], d) for r in versions for d in r.get("dropped") or []]
    if dropped:
        lines += ["", "Dropped replies: " + "; ".join(f"version {v}: node {d['node']} (seq {d['seq']}): "
                                                      f"{d['reason']}" for v, d in dropped)]
    classes: dict[str, list[int]] = {}
    for r in versions:
        for g in r.get("gateways") or []:
            if g.get("status") == "aggregated" and g.get("staleness") is not None:
                classes.setdefault(g.get("class") or "?", []).append(int(g["staleness"]))
    lines += ["", "| class | updates applied | mean staleness | max staleness |", "|---|---:|---:|---:|"]
    for cls, stale in sorted(classes.items()):
        lines.append(f"| {cls} | {len(stale)} | {fmt(sum(stale) / len(stale))} | {max(stale)} |")
    return lines


def _classes_section(rounds: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """Time and bytes per gateway class (link/device), links.png, late gateways and outages."""
    classes = per_class(rounds)
    if not classes:
        return []
    lines = [
        "", "## Gateways by class (link/device)", "",
        "Means per gateway and round. Application bytes: the Flower message payload; wire bytes: the "
        "gateway's veth counters (headers, retransmissions, Flower's polling and heartbeats included). "
        "Round time (push to reply) = compute (the ClientApp's handler) + transfer (bytes over the link "
        "rates plus round trips) + waiting (the rest). The round again, by where it went: pull wait (the "
        "ServerApp's push until the message's process existed: the SuperNode's pull interval), process start "
        "(that process's start until the handler ran: a fork of the warm runtime or a new interpreter and its "
        "imports, the app's files), message in (with the warm runtime: the process waiting for the message's "
        "objects to come over the link; with Flower's own runtime that wait is part of the start), compute, "
        "push wait (the handler's end until the ServerApp "
        "had the reply: uplink, push, the ServerApp's poll). Link bound: compute + transfer. Simulated: the "
        "clock of engine=sim (link bound + Flower's own per-exchange overhead + outage waiting).",
        "",
        "| class | gateways | replies | late | app up [B] | app down [B] | wire up [B] | wire down [B] "
        "| compute [s] | transfer [s] | waiting [s] | pull wait [s] | process start [s] | message in [s] "
        "| push wait [s] | round [s] | link bound [s] | simulated [s] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cls, c in classes.items():
        lines.append(f"| {cls} | {c['gateways']} | {c['replies']} | {c['late']} | "
                     + " | ".join(fmt(c[k]) for k in GATEWAY_FIGURES) + " |")
    work = [r["round_time"] - r["train_s"] for r in rounds if r.get("train_s") is not None and r.get("round")]
    pushes = [r["push_s"] for r in rounds if r.get("push_s") is not None and r.get("round")]
    if work:
        lines += ["", "The ServerApp's own work per round, outside the gateways' exchange: "
                  f"{fmt(sum(work) / len(work))} s (evaluation, checkpoint, privacy ledger, report rows)"
                  + (f"; handing the round's messages to the SuperLink: {fmt(sum(pushes) / len(pushes))} s "
                     "(inside the round, overlapping the first gateways' pulls)" if pushes else "") + "."]
    if plot_classes(classes, run_dir / "links.png"):
        lines += ["", "![time and bytes per gateway class](links.png)"]
    late = [(r["round"], r["late"]) for r in rounds if r.get("late")]
    if late:
        lines += ["", "Late (excluded) gateways: " + "; ".join(f"round {n}: {g}" for n, g in late)]
    events = load_outages(run_dir)
    if events:
        lines += ["", "Outages: " + "; ".join(
            f"gateway {e['gateway']} {e['state']} at {e['t']:.1f}s (round {e['round']})" for e in events)]
    return lines


ENERGY_MODEL = (
    "An estimate from the link and device profiles, not a measurement. Radio: bytes sent × `tx_uj_per_byte` + "
    "bytes received × `rx_uj_per_byte` + `connect_mj` per connection, one connection per message exchange (the "
    "train message down and its reply up, and each exchange more a strategy needs); the wire bytes where the link "
    "counted them, else the application bytes (column \"bytes\"). Compute: `power_w` × the gateway's compute time "
    "(on engine=sim rescaled to the device's CPU share, as the simulated clock is). Not counted: idle listening "
    "and PSM/eDRX sleep between rounds, the round-0 statistics query, retransmissions other than those in the wire "
    "bytes. The constants and their sources: `configs/link/*.yaml`, `configs/device/*.yaml`."
)


def _energy_section(rounds: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """Estimated energy per gateway class (``energy_per_class``, also in metrics.json): per gateway and round, over
    the run, and the time each class's links were online and offline."""
    energy = energy_per_class(rounds)
    if not energy:
        return []
    span, offline = offline_per_class(rounds, load_outages(run_dir))
    lines = ["", "### Energy per round, estimated", "",
             "Per round: the mean per sampled gateway and round; run: per gateway of the class, and the whole "
             "class. Online / offline: per gateway, the rounds' wall time less the outages its link recorded "
             "(outages.jsonl; none recorded: online all along).", "",
             "| class | gateways | updates | bytes | radio [J/round] | compute [J/round] | total [J/round] "
             "| run [J/gateway] | run, class [J] | online [s] | offline [s] |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cls, e in energy.items():
        off = offline.get(cls, 0.0)
        lines.append(f"| {cls} | {e['gateways']} | {e['updates']} | {e['bytes']} | {fmt(e['radio_j_per_round'])} | "
                     f"{fmt(e['compute_j_per_round'])} | {fmt(e['total_j_per_round'])} | "
                     f"{fmt(e['total_j_per_gateway'])} | {fmt(e['total_j'])} | {fmt(span - off)} | {fmt(off)} |")
    return lines + ["", ENERGY_MODEL]


def export_section(run_dir: Path) -> list[str]:
    """The on-device model of ``iiotfl export``: size, latency and metrics, int8 beside float32."""
    ex = read_json(Path(run_dir) / "export" / "export.json")
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
        lines.append(f"| {name} | {fmt(ex[f'{name}_bytes'])} | {fmt(ex['latency_us'][name])} | "
                     + " | ".join(fmt(m.get(k)) for k in keys) + " |")
    if ex["metrics"]:
        i8 = ex["metrics"]["int8"]
        delta = ", ".join(f"{k} {i8[k] - f32[k]:+.4g}" for k in keys if k in i8)
        unit = " cycles" if "rmse" in keys else ""
        lines += ["", f"Change int8 − float32 on the server's test data: {delta}; largest change of one prediction: "
                      f"{fmt(ex['max_abs_prediction_change'])}{unit}."]
    lines += ["", f"Latency: {ex['latency_setup']}."]
    if ex.get("note"):
        lines += ["", f"Note: {ex['note']}."]
    return lines
