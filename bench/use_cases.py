"""Per-task benchmark: the federated model against the same model trained centrally.

For each use case, one JSON line per strategy ("bench": "strategy") and one summary line
("bench": "tasks"):
  task, source              the task and its data source
  metric, higher_is_better  the task's primary metric
  federated                 FedAvg's final global model (`iiotfl run engine=sim`, gateways, rounds below)
  best, best_metric         the option of --strategies with the best final metric, and that metric
  centralised               the same model trained on the pooled training data of all gateways for
                            rounds x local epochs, normalised the same way, scored on the same test data
  trivial                   the task's trivial baseline where it has one (persistence / majority class)
  gap, best_gap             federated (best) - centralised (positive = federated better)
  within_5pct               whether the best strategy is within 5 % of centralised
  worst_plant, best_worst_plant  the worst gateway's metric on its own held-out data (FedAvg, best)
  wall_s                    FedAvg's run, start to exit

--skew: quality control's heterogeneity sweep instead: for each skew s (task.plants.label_skew and
feature_skew both s), centralised, FedAvg and --option, with their worst plant.

An option is a strategy name with its settings after "@": ``fedavgm@server_lr=2@server_momentum=0.3`` runs
``strategy=fedavgm strategy.server_lr=2 strategy.server_momentum=0.3``; a setting with a dot is an override as
it is (``fedavg@train.optimizer=sgd``), and so is a config group (``fedavg@privacy=sample``, ``@codec=int8``).
Each strategy line gives ``vs_centralised_pct`` (negative: worse than centralised). Rounds and gateways default to
the fleet's defaults (8 and 4).

Usage: python bench/use_cases.py [--rounds 8] [--gateways 4] [--only TASK] [--strategies fedavg,scaffold,...]
       [--skew 0,1,2,4 --option fedavgm@server_lr=2@server_momentum=0.3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iiotfl.clients.training import train_local
from iiotfl.configs import compose
from iiotfl.tasks import get_task
from iiotfl.tasks.moments import combine

ROOT = Path(__file__).resolve().parent.parent

CASES = [  # (label, overrides)
    ("predictive_maintenance", ["task=predictive_maintenance"]),
    ("energy_anomaly/scada", ["task=energy_anomaly", "task.data.source=scada"]),
    ("energy_anomaly/smart_meter", ["task=energy_anomaly", "task.data.source=smart_meter"]),
    ("quality_control", ["task=quality_control"]),
]


# server momentum with a step of 2: the setting that closes most of quality control's gap (docs/use-cases.md)
SERVER_STEP = "fedavgm@server_lr=2@server_momentum=0.3"

# the task's own trivial-baseline figure, reported by its evaluate()
TRIVIAL = {"energy_anomaly": "persistence_pr_auc",  # |x_t - x_(t-1)| as the anomaly score
           "quality_control": "prevalence_machine"}  # majority class: PR-AUC = prevalence


def federated(overrides: list[str], run_dir: Path) -> tuple[dict, float, float | None]:
    """The final server metrics, the wall time and the worst plant's primary metric of one `engine=sim` run."""
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "iiotfl"), "run", "engine=sim", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"federated run failed: {proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "metrics.json").read_text())
    spread = (summary.get("gateway_evaluation") or {}).get("spread") or {}
    worst = (spread.get("worst") or {}).get("value")
    return rows[-1]["server"], time.perf_counter() - start, worst


GROUPS = ("privacy", "codec", "link", "engine")  # config groups an option may pick (fedavg@privacy=sample)


def option(name: str) -> list[str]:
    """The overrides of one option: ``fedavgm@server_lr=2`` -> strategy=fedavgm strategy.server_lr=2."""
    strategy, *settings = name.split("@")

    def override(setting: str) -> str:  # a dotted key or a config group as it is, else one of the strategy's
        key = setting.split("=")[0]
        return setting if "." in key or key in GROUPS else f"strategy.{setting}"

    return [f"strategy={strategy}", *map(override, settings)]


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def skew_sweep(args: argparse.Namespace) -> None:
    """Quality control: centralised, FedAvg and --option against the plants' label and feature skew."""
    for s in [float(v) for v in args.skew.split(",")]:
        overrides = ["task=quality_control", f"fleet.gateways={args.gateways}", f"fleet.rounds={args.rounds}",
                     f"task.plants.label_skew={s}", f"task.plants.feature_skew={s}"]
        cfg = compose(overrides)
        task = get_task(cfg["task"], cfg["seed"])
        key = task.primary_metric
        central, _ = centralised(cfg)
        row = {"bench": "skew", "task": "quality_control", "skew": s, "metric": key,
               "centralised": _r(central[key])}
        for name in dict.fromkeys(["fedavg", args.option]):
            with tempfile.TemporaryDirectory() as tmp:
                fed, _, worst = federated([*overrides, *option(name)], Path(tmp) / "run")
            row[name] = _r(fed[key])
            row[f"{name}_worst_plant"] = _r(worst)
        print(json.dumps(row), flush=True)


def centralised(cfg: dict) -> tuple[dict, dict]:
    torch.set_num_threads(int(cfg["train"]["torch_threads"]))
    task = get_task(cfg["task"], cfg["seed"])
    n = int(cfg["fleet"]["gateways"])
    trains = [task.gateway_data(p)[0] for p in range(n)]
    normaliser = task.normaliser(combine([task.feature_sums(t) for t in trains]))
    xs, ys = zip(*(task.windows(t, normaliser) for t in trains))
    x, y = np.concatenate(xs), np.concatenate(ys)
    model = task.build_model()
    test = task.server_test_data(n)
    untrained = task.evaluate(model, test, normaliser)
    for epoch in range(int(cfg["fleet"]["rounds"]) * int(cfg["train"]["local_epochs"])):
        train_local(model, x, task.target(y), epochs=1, batch_size=int(cfg["train"]["batch_size"]),
                    lr=float(cfg["train"]["lr"]), seed=epoch, loss_fn=task.loss())
    return task.evaluate(model, test, normaliser), untrained


def main() -> None:
    ap = argparse.ArgumentParser()
    fleet = compose([])["fleet"]
    ap.add_argument("--rounds", type=int, default=int(fleet["rounds"]))
    ap.add_argument("--gateways", type=int, default=int(fleet["gateways"]))
    ap.add_argument("--only")
    ap.add_argument("--strategies", default=f"fedavg,{SERVER_STEP},fedprox,scaffold")
    ap.add_argument("--skew", help="quality control's heterogeneity sweep, e.g. 0,1,2,4")
    ap.add_argument("--option", default=SERVER_STEP, help="the option beside FedAvg in --skew")
    args = ap.parse_args()
    if args.skew:
        skew_sweep(args)
        return
    strategies = list(dict.fromkeys(["fedavg", *args.strategies.split(",")]))
    for label, overrides in CASES:
        if args.only and not label.startswith(args.only):
            continue
        overrides = [*overrides, f"fleet.gateways={args.gateways}", f"fleet.rounds={args.rounds}"]
        cfg = compose(overrides)
        task = get_task(cfg["task"], cfg["seed"])
        key = task.primary_metric
        sign = 1 if task.higher_is_better else -1
        central, untrained = centralised(cfg)
        runs: dict[str, tuple[float, float | None]] = {}
        wall = 0.0
        for name in strategies:
            with tempfile.TemporaryDirectory() as tmp:
                fed, seconds, worst = federated([*overrides, *option(name)], Path(tmp) / "run")
            runs[name] = (fed[key], worst)
            wall = seconds if name == "fedavg" else wall
            print(json.dumps({"bench": "strategy", "task": label, "strategy": name, "metric": key,
                              "final": _r(fed[key]), "centralised": _r(central[key]),
                              "vs_centralised_pct": _r(100 * sign * (fed[key] - central[key]) / abs(central[key])),
                              "worst_plant": _r(worst), "wall_s": round(seconds, 1)}), flush=True)
        best = max(runs, key=lambda n: sign * runs[n][0])
        trivial = central.get(TRIVIAL.get(task.name, ""))
        print(json.dumps({
            "bench": "tasks", "task": label, "gateways": args.gateways, "rounds": args.rounds,
            "metric": key, "higher_is_better": task.higher_is_better,
            "federated": _r(runs["fedavg"][0]), "best": best, "best_metric": _r(runs[best][0]),
            "centralised": _r(central[key]), "untrained": _r(untrained[key]), "trivial": _r(trivial),
            "gap": _r(sign * (runs["fedavg"][0] - central[key])), "best_gap": _r(sign * (runs[best][0] - central[key])),
            "within_5pct": bool(sign * (runs[best][0] - central[key]) >= -0.05 * abs(central[key])),
            "worst_plant": _r(runs["fedavg"][1]), "best_worst_plant": _r(runs[best][1]), "wall_s": round(wall, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
