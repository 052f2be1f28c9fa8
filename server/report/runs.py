"""Reading one run directory: what each writer left there, tolerant of a run that stopped early.

A run directory holds what the ServerApp wrote (``metrics.jsonl`` as rounds finish,
``metrics.json`` and the encrypted, signed ``model.ckpt`` at the end, ``privacy_ledger.jsonl``),
what the launcher wrote (``launch.json``: engine, status, wall time, traffic seen by the
SuperLink; ``links.json``, ``outages.jsonl``), what Hydra wrote (``.hydra/config.yaml``,
``.hydra/overrides.yaml``) and what ``iiotfl export`` / ``iiotfl audit`` measured
(``export/export.json``, ``audit.json``). Every reader here returns an empty value for a file
that is missing or cut short; none raises on a failed run.

Every task names its own primary metric and direction (``metrics.json``: ``primary_metric``,
``higher_is_better``; :class:`tasks.Task`): :func:`metric_of` reads them, never a fixed one.
:func:`evaluation_of` says which evaluation the metric comes from (``metrics.json``'s
``evaluation``: the server's held-out test set, or the gateways' own held-out data when the
run had no server-side test set) and, when there is none, why. :func:`plants_of` reads each
plant's own figure for the final model (``gateway_evaluation``: per gateway, and the spread over
the plants: worst, median, best).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from iiotfl.privacy.ledger import read_jsonl
from iiotfl.server.plants import plant_spread
from iiotfl.server.report.text import finite, mean
from iiotfl.tasks import task_class

RUN_FILES = ("launch.json", "metrics.jsonl", "metrics.json")  # any of them (or .hydra/config.yaml): a run
SKIP_DIRS = {"flwr", "logs", "checkpoints", "export", "certs", "he-keys", ".hydra"}  # a run's own folders

GATEWAY_FIGURES = ("bytes_up", "bytes_down", "wire_up", "wire_down", "compute_s", "transfer_s", "wait_s",
                   "before_process_s", "startup_s", "message_s", "after_reply_s", "round_s", "bound_s", "sim_s")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line cut short by a crash is left out."""
    rows = [row for row in read_jsonl(Path(run_dir) / "metrics.jsonl") if "round" in row]
    for row in rows:
        row.setdefault("server", {})
        row.setdefault("clients", [])
        row.setdefault("round_time", 0.0)
    return rows


def load_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config: ``config.yaml`` (resolved, written when the run started) or
    Hydra's ``.hydra/config.yaml`` (also there for a run refused by the config checks)."""
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
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(o) for o in items if not str(o).lstrip("+~").startswith("hydra.")]


def load_outages(run_dir: Path) -> list[dict[str, Any]]:
    """The link down/up events of ``outages.jsonl`` (none: [])."""
    return read_jsonl(Path(run_dir) / "outages.jsonl")


def metric_of(final: dict[str, Any], task: str | None) -> tuple[str | None, bool | None]:
    """(primary metric, higher is better) of the run's task: from ``metrics.json``, else from the
    class of ``task`` (a run that failed before the end), else (None, None)."""
    if final.get("primary_metric"):
        return str(final["primary_metric"]), bool(final.get("higher_is_better", False))
    if task:
        try:
            cls = task_class(task)
            return str(cls.primary_metric), bool(cls.higher_is_better)
        except Exception:  # noqa: BLE001 - a task this checkout does not have
            pass
    return None, None


def evaluation_of(final: dict[str, Any], rounds: list[dict[str, Any]], metric: str | None) -> dict[str, Any]:
    """Which evaluation the run's metric comes from, and its initial and final value.

    ``evaluation``: "server" (the server's held-out test set, every round), "gateways" (the final
    model on the gateways' own held-out data: their mean weighted by held-out examples; no initial
    value), "none" (``evaluation_note`` says why) or None (nothing recorded yet: a run that stopped
    before its end). A run written before ``metrics.json`` had ``evaluation`` counts as "server"
    when its rounds were scored."""
    scored = [r["server"] for r in rounds if metric and r["server"].get(metric) is not None]
    source = final.get("evaluation") or ("server" if scored else None)
    gateway = final.get("gateway_evaluation") or {}
    out: dict[str, Any] = {"evaluation": source, "initial_metric": None, "final_metric": None,
                           "evaluation_gateways": gateway.get("gateways"), "evaluation_asked": gateway.get("asked"),
                           "evaluation_examples": (gateway.get("metrics") or {}).get("num-examples"),
                           "evaluation_failed": list(gateway.get("failed") or []),
                           "evaluation_note": str(final.get("evaluation_note") or "")}
    if source == "server" and scored:
        out.update(initial_metric=scored[0][metric], final_metric=scored[-1][metric])
    elif source == "gateways":
        value = final.get("final_metric")
        out["final_metric"] = value if value is not None else (gateway.get("metrics") or {}).get(metric or "")
    return out


def plant_spread_of(final: dict[str, Any], metric: str | None, higher: bool | None) -> dict[str, Any] | None:
    """The spread of the primary metric over the plants for the final model (``gateway_evaluation.spread``; for a
    run written before it, computed from ``per_gateway``); None without a per-plant evaluation."""
    gateway = final.get("gateway_evaluation") or {}
    spread = gateway.get("spread")
    if isinstance(spread, dict) and spread.get("metric") == metric:
        return spread
    return plant_spread(gateway.get("per_gateway") or [], metric, bool(higher)) if metric else None


def plants_of(final: dict[str, Any], metric: str | None, higher: bool | None) -> dict[str, Any]:
    """The run's per-plant figures for a sweep row: ``plants`` (how many gave the primary metric),
    ``plant_worst`` / ``plant_median`` / ``plant_best`` (its worst, median and best value) and
    ``plant_worst_partition``; all None without a per-plant evaluation."""
    spread = plant_spread_of(final, metric, higher) or {}
    return {"plants": spread.get("gateways"), "plant_worst": (spread.get("worst") or {}).get("value"),
            "plant_worst_partition": (spread.get("worst") or {}).get("partition"),
            "plant_median": (spread.get("median") or {}).get("value"),
            "plant_best": (spread.get("best") or {}).get("value")}


def privacy_spent(mechanism: str, final: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mechanism, epsilon and delta a run spent. The mechanism is the one ``metrics.json`` recorded,
    else ``mechanism`` (the configured one: a run that failed before the end). No DP: epsilon =
    inf. Sample-level DP: the largest epsilon of any gateway (each composes over its own rounds);
    client-level: the fleet's."""
    recorded = final.get("privacy") or {}
    mechanism = recorded.get("mechanism") or mechanism or "none"
    if mechanism == "none":
        return {"dp": "none", "epsilon": math.inf, "delta": None}
    eps, delta = None, None
    for r in rounds:
        p = r.get("privacy") or {}
        for key in ("epsilon", "device_epsilon_max"):
            v = p.get(key)
            if finite(v) and (eps is None or v > eps):
                eps = float(v)
        if p.get("delta") is not None:
            delta = p["delta"]
    for c in recorded.get("checks") or []:  # sample-level: per gateway, recomputed
        v = c.get("reported")
        if finite(v) and (eps is None or v > eps):
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


def metric_columns(rounds: list[dict[str, Any]], primary: str | None, most: int = 8) -> list[str]:
    """Server-side metrics of the rounds, the primary one first, at most ``most`` (num-examples left
    out; every metric is in metrics.jsonl)."""
    keys: list[str] = [primary] if primary else []
    for r in rounds:
        for k in r["server"]:
            if k not in keys and k != "num-examples":
                keys.append(k)
    return keys[:most]


def _traffic(trained: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean model payload per gateway and round, both ways (metrics.jsonl: each client's bytes)."""
    up = [c["bytes-up"] for r in trained for c in r["clients"] if "bytes-up" in c]
    down = [c["bytes-down"] for r in trained for c in r["clients"] if "bytes-down" in c]
    return {"bytes_up_per_client_round": sum(up) / len(up) if up else None,
            "bytes_down_per_client_round": sum(down) / len(down) if down else None}


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures one run is judged by (also one row of a sweep table)."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    launch = read_json(run_dir / "launch.json")
    final = read_json(run_dir / "metrics.json")
    cfg, overrides = load_config(run_dir), load_overrides(run_dir)
    task = final.get("task") or group_value("task", cfg, overrides)
    metric, higher = metric_of(final, task)
    scored = [r for r in rounds if r["server"]]
    trained = [r for r in rounds if r["round"] > 0]
    first = scored[0]["server"] if scored else {}
    last = scored[-1]["server"] if scored else {}
    evaluation = evaluation_of(final, rounds, metric)
    return {
        "status": launch.get("status", "completed" if (run_dir / "metrics.json").exists() else "unknown"),
        "engine": launch.get("engine", ""),
        "gateways": launch.get("gateways", ""),
        "task": task,
        "rounds_done": len(trained),
        "metric": metric,
        "higher_is_better": higher,
        **evaluation,  # evaluation (where the metric comes from), initial_metric, final_metric, ...
        **plants_of(final, metric, higher),  # plants, plant_worst, plant_median, ...: each plant's own data
        **privacy_spent(group_value("privacy", cfg, overrides), final, rounds),
        "initial_rmse": first.get("rmse"),
        "final_rmse": last.get("rmse"),
        "final_rmse_last": last.get("rmse_last"),
        "final_phm_score": last.get("phm_score"),
        "mean_round_s": sum(r["round_time"] for r in trained) / len(trained) if trained else None,
        "wall_s": launch.get("wall_s"),
        **_traffic(trained),
        "superlink_bytes": launch.get("traffic", {}).get("total-bytes"),
        "sim_round_s": mean([r.get("sim_round_s") for r in trained]),
        "late_replies": sum(len(r.get("late") or []) for r in trained),
        "links": (read_json(run_dir / "links.json").get("emulation") or launch.get("links") or ""),
        "error": launch.get("error", ""),
    }


def gateway_classes(rounds: list[dict[str, Any]]) -> dict[Any, str]:
    """Partition -> the gateway's class (link/device) as the rounds recorded it (the last one seen)."""
    classes: dict[Any, str] = {}
    for r in rounds:
        for g in r.get("gateways") or []:
            if g.get("partition") is not None and g.get("class"):
                classes[g["partition"]] = str(g["class"])
    return classes


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
            **{k: mean([g.get(k) for g in (rows if k.startswith("wire") else done)]) for k in GATEWAY_FIGURES},
        }
    return out


def offline_per_class(rounds: list[dict[str, Any]], events: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """(seconds the rounds ran, from the initial evaluation to the last round; each gateway class's mean seconds
    offline in them): the link down/up events of ``outages.jsonl`` (seconds since the first round), a link still
    down at the end counting until then. No recorded outage: 0 for every class."""
    span = rounds[-1]["time"] - rounds[0]["time"] if rounds else 0.0
    down: dict[Any, float] = {}
    since: dict[Any, float] = {}
    for e in sorted(events, key=lambda e: float(e.get("t") or 0.0)):
        gw, t = e.get("gateway"), min(float(e.get("t") or 0.0), span)
        if e.get("state") == "down":
            since.setdefault(gw, t)
        elif gw in since:
            down[gw] = down.get(gw, 0.0) + t - since.pop(gw)
    for gw, t in since.items():
        down[gw] = down.get(gw, 0.0) + span - t
    members: dict[str, set] = {}
    for r in rounds:
        for g in r.get("gateways") or []:
            members.setdefault(g.get("class") or "?", set()).add(g.get("partition"))
    return span, {cls: sum(down.get(gw, 0.0) for gw in gws) / len(gws) for cls, gws in members.items()}


def is_run_dir(path: Path) -> bool:
    """A run directory: what ``iiotfl run`` (one run or one point of a sweep) writes."""
    path = Path(path)
    return any((path / name).exists() for name in RUN_FILES) or (path / ".hydra" / "config.yaml").exists()


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory at or below ``root`` (a sweep, a day of sweeps, ``runs/``), in natural order."""
    root = Path(root)
    found = []
    for here, dirs, _ in os.walk(root):
        if is_run_dir(Path(here)):
            found.append(Path(here))
            dirs[:] = []  # a run's own folders (flwr/, logs/, ...) hold no runs
            continue
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]

    def key(p: Path) -> list[Any]:
        rel = p.relative_to(root).as_posix()
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", rel) if t]

    return sorted(found, key=key)
