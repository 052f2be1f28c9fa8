"""Per-task benchmark: the federated model against the same model trained centrally.

For each use case, one JSON line:
  task, source              the task and its data source
  metric, higher_is_better  the task's primary metric
  federated                 final global model of `iiotfl run engine=sim` (gateways, rounds below)
  centralised               the same model trained on the pooled training data of all gateways for
                            rounds x local epochs, normalised the same way, scored on the same test data
  trivial                   the task's trivial baseline where it has one (persistence / majority class)
  gap                       federated - centralised (positive = federated better when higher is better)
  wall_s                    the federated run, start to exit

Usage: python bench/use_cases.py [--rounds 5] [--gateways 4] [--only TASK]
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


# the task's own trivial-baseline figure, reported by its evaluate()
TRIVIAL = {"energy_anomaly": "persistence_pr_auc",  # |x_t - x_(t-1)| as the anomaly score
           "quality_control": "prevalence_machine"}  # majority class: PR-AUC = prevalence


def federated(overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "iiotfl"), "run", "engine=sim", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"federated run failed: {proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["server"], time.perf_counter() - start


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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gateways", type=int, default=4)
    ap.add_argument("--only")
    args = ap.parse_args()
    for label, overrides in CASES:
        if args.only and not label.startswith(args.only):
            continue
        overrides = [*overrides, f"fleet.gateways={args.gateways}", f"fleet.rounds={args.rounds}"]
        cfg = compose(overrides)
        task = get_task(cfg["task"], cfg["seed"])
        key = task.primary_metric
        with tempfile.TemporaryDirectory() as tmp:
            fed, wall = federated(overrides, Path(tmp) / "run")
        central, untrained = centralised(cfg)
        trivial = central.get(TRIVIAL.get(task.name, ""))
        sign = 1 if task.higher_is_better else -1
        print(json.dumps({
            "bench": "tasks", "task": label, "gateways": args.gateways, "rounds": args.rounds,
            "metric": key, "higher_is_better": task.higher_is_better,
            "federated": round(fed[key], 4), "centralised": round(central[key], 4),
            "untrained": round(untrained[key], 4), "trivial": None if trivial is None else round(trivial, 4),
            "gap": round(sign * (fed[key] - central[key]), 4), "wall_s": round(wall, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
