"""The ServerApp: one federated run, from normalisation statistics to the final model.

1. Wait until the fleet's gateways are connected.
2. Ask every gateway for its per-condition feature sums (``query.feature_stats``) and
   add them up: the fleet-wide normalisation, without any plant's own statistics.
3. Run the configured strategy (Flower's FedAvg) for ``fleet.rounds`` rounds; after
   every round the global model is scored on the held-out set and one line is
   appended to ``metrics.jsonl`` (this is what ``iiotfl run`` shows as progress).
4. Write the final model, ``metrics.json`` and the report into the output directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from configs import from_run_config
from server.report import write_report
from strategies import build_strategy
from tasks import get_task

app = ServerApp()


class RoundLog:
    """Collects per-round figures and appends them to ``metrics.jsonl`` as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.write_text("")
        self.start = time.time()
        self.last = self.start
        self.clients: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []

    def aggregate_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """FedAvg's train-metrics hook: keep each gateway's figures, return the weighted mean."""
        self.clients = [dict(rec["metrics"]) for rec in records if "metrics" in rec]
        return aggregate_metricrecords(records, weighting_key)

    def write(self, server_round: int, evaluation: dict[str, float]) -> None:
        now = time.time()
        row = {
            "round": server_round,
            "time": now - self.start,
            "round_time": now - self.last if server_round else 0.0,
            "server": evaluation,
            "clients": self.clients,
        }
        self.last = now
        self.clients = []
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or time.time() > deadline:
            return nodes
        time.sleep(0.5)


def federated_feature_sums(grid: Grid, nodes: list[int], timeout: float):
    """Sum of every gateway's per-condition (count, sum, sum of squares)."""
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.feature_stats")
        for n in nodes
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=timeout) if r.has_content()]
    if not replies:
        raise RuntimeError("no gateway answered the feature-statistics query; check the SuperNode logs")
    return sum(r.content["stats"].to_numpy_ndarrays()[0] for r in replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = from_run_config(context.run_config)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg["train"]["torch_threads"]))
    fleet = cfg["fleet"]
    task = get_task(cfg["task"], cfg["seed"])
    timeout = float(fleet["round_timeout"])

    nodes = wait_for_nodes(grid, int(fleet["min_gateways"] or fleet["gateways"]), timeout)
    sums = federated_feature_sums(grid, nodes, timeout)
    normaliser = task.normaliser(sums)
    test = task.server_test_data(int(fleet["gateways"]))
    model = task.build_model()
    log = RoundLog(out / "metrics.jsonl")

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scores: dict[str, float] = {}
        if test is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
            scores = task.evaluate(model, test, normaliser)
        log.write(server_round, scores)
        return MetricRecord(scores)

    strategy = build_strategy(cfg, train_metrics_aggr_fn=log.aggregate_train)
    norm = {"norm-sums": [float(v) for v in sums.ravel()], "norm-cols": int(sums.shape[1])}
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(fleet["rounds"]),
        timeout=timeout,
        train_config=ConfigRecord(
            {
                "local-epochs": int(cfg["train"]["local_epochs"]),
                "batch-size": int(cfg["train"]["batch_size"]),
                "lr": float(cfg["train"]["lr"]),
                **norm,
            }
        ),
        evaluate_config=ConfigRecord(norm),
        evaluate_fn=evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
    summary = {
        "task": task.name,
        "primary_metric": task.primary_metric,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": result.arrays.count_bytes(),
        "gateways_connected": len(nodes),
        "rounds": log.rows,
        "client_evaluation": {str(k): dict(v) for k, v in result.evaluate_metrics_clientapp.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_report(out)
