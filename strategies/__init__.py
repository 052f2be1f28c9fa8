"""Aggregation strategies. ``build_strategy`` maps the ``strategy`` config group to a Flower strategy.

``fedavg`` is Flower's own FedAvg (Message API): configure_train samples
``fleet.fraction_train`` of the connected gateways, aggregate_train averages their
ArrayRecords weighted by the ``num-examples`` each reports.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.serverapp.strategy import FedAvg, Strategy


def build_strategy(cfg: Mapping[str, Any], train_metrics_aggr_fn: Callable | None = None) -> Strategy:
    fleet = cfg["fleet"]
    available = int(fleet["min_gateways"] or fleet["gateways"])
    name = cfg["strategy"]["name"]
    if name == "fedavg":
        return FedAvg(
            fraction_train=float(fleet["fraction_train"]),
            fraction_evaluate=float(fleet["fraction_evaluate"]),
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=available,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
        )
    raise ValueError(f"unknown strategy {name!r}; choose strategy=fedavg")
