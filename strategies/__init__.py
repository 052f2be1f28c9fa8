"""Aggregation strategies. ``build_strategy`` maps the config to a Flower strategy.

``fedavg`` is Flower's FedAvg (Message API) extended in ``codec_fedavg.py`` with the
update codec of the ``codec`` group (``codecs.py``), the delta-encoded downlink and
over-selection: configure_train samples ``ceil(K x (1 + fleet.over_selection))`` of
the connected gateways, aggregate_train decodes their updates and averages them
weighted by the ``num-examples`` each reports. With ``privacy=client`` it is Flower's
FedAvg inside Flower's DP wrappers (``client_dp.py``).

``krum`` / ``median`` / ``trimmed_mean`` are Flower's Krum (Multi-Krum), FedMedian and
FedTrimmedAvg behind the same sampling and decoding (``robust.py``): plaintext updates
only, so never with ``he``/``secagg`` (alternative choices), ``privacy=client`` or
``codec=topk`` (``configs.validate`` says why).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.serverapp.strategy import Strategy

from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.codecs import get_codec
from iiotfl.strategies.robust import ROBUST, build_robust


DP_MIN_FRACTION = 0.7  # distributed DP noise still meets its target when 30% of the gateways drop out


def distributed_dp(cfg: Mapping[str, Any]):
    """Client-level DP inside encrypted/masked aggregation: noise shares from the gateways."""
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    from iiotfl.strategies.client_dp import fleet_delta, noise_multiplier, privacy_config
    from iiotfl.strategies.he_fedavg import HEDP

    n = int(cfg["fleet"]["gateways"])
    return HEDP(noise_multiplier(cfg), float(cfg["privacy"]["clipping_norm"]),
                min_devices=max(2, math.ceil(DP_MIN_FRACTION * n)), accountant=RdpAccountant(privacy_config(cfg)),
                population=n, delta=fleet_delta(cfg))


def build_strategy(
    cfg: Mapping[str, Any],
    train_metrics_aggr_fn: Callable | None = None,
    on_sampled: Callable[[int, list[int], int], None] | None = None,
) -> Strategy:
    fleet = cfg["fleet"]
    name = cfg["strategy"]["name"]
    codec = cfg.get("codec") or {"name": "none", "downlink": "full"}
    private = (cfg.get("privacy") or {}).get("name") == "client"
    if private and name == "fedavg":
        from iiotfl.strategies.client_dp import build_client_dp

        return build_client_dp(cfg)
    common = dict(
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
    if name == "fedavg":
        return CodecFedAvg(**common)
    if name in ROBUST:
        return build_robust(cfg, common)
    dp = distributed_dp(cfg) if private else None
    if name == "secagg":
        from iiotfl.strategies.secagg import SecAggFedAvg

        n = int(fleet.get("min_gateways") or fleet["gateways"])
        return SecAggFedAvg(dp=dp, fraction_fit=float(fleet["fraction_train"]), fraction_evaluate=0.0,
                            min_fit_clients=min(3, n), min_available_clients=n)
    if name == "he":
        from iiotfl.strategies.he_fedavg import HEFedAvg

        st = cfg["strategy"]
        return HEFedAvg(keys=Path(st["keys"]) / "server.he", initial_range=float(st["initial_range"]),
                        range_factor=float(st["range_factor"]), min_aggregate=int(st["min_aggregate"]), dp=dp,
                        **common)
    raise ValueError(f"unknown strategy {name!r}; choose strategy=fedavg, krum, median, trimmed_mean, he or secagg")
