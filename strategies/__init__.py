"""Aggregation strategies. ``build_strategy`` maps the config to a Flower strategy.

``fedavg`` is Flower's FedAvg (Message API) extended in ``codec_fedavg.py`` with the
update codec of the ``codec`` group (``codecs.py``), the delta-encoded downlink and
over-selection: configure_train samples ``ceil(K x (1 + fleet.over_selection))`` of
the connected gateways, aggregate_train decodes their updates and averages them
weighted by the ``num-examples`` each reports. With ``privacy=client`` it is Flower's
FedAvg inside Flower's DP wrappers (``client_dp.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.serverapp.strategy import Strategy

from strategies.codec_fedavg import CodecFedAvg
from strategies.codecs import get_codec


def build_strategy(
    cfg: Mapping[str, Any],
    train_metrics_aggr_fn: Callable | None = None,
    on_sampled: Callable[[int, list[int], int], None] | None = None,
) -> Strategy:
    fleet = cfg["fleet"]
    name = cfg["strategy"]["name"]
    codec = cfg.get("codec") or {"name": "none", "downlink": "full"}
    if (cfg.get("privacy") or {}).get("name") == "client":
        from strategies.client_dp import build_client_dp

        return build_client_dp(cfg)
    if name == "fedavg":
        return CodecFedAvg(
            codec=get_codec(codec),
            downlink=str(codec.get("downlink", "full")),
            clients_per_round=fleet.get("clients_per_round"),
            over_selection=float(fleet.get("over_selection") or 0.0),
            seed=int(cfg["seed"]),
            on_sampled=on_sampled,
            fraction_train=float(fleet["fraction_train"]),
            fraction_evaluate=float(fleet["fraction_evaluate"]),
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=int(fleet.get("min_replies") or 1),
            train_metrics_aggr_fn=train_metrics_aggr_fn,
        )
    raise ValueError(f"unknown strategy {name!r}; choose strategy=fedavg")
