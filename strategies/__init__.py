"""Aggregation strategies, one file each, behind one registry.

``STRATEGIES`` maps the ``strategy`` config group's names to each file's
:class:`~iiotfl.strategies.spec.StrategySpec`: how the strategy is built, checked, what an
update is on the uplink, how the ledger and reports describe it, whether its runs resume.
Adding a strategy is one new file with its class and ``SPEC``, plus one line below.

* ``fedavg`` (``codec_fedavg.py``): Flower's FedAvg (Message API) with the update codec of
  the ``codec`` group (``codecs.py``), the delta-encoded downlink and over-selection. With
  ``privacy=client`` it is Flower's FedAvg inside Flower's DP wrappers (``client_dp.py``).
* ``krum`` / ``median`` / ``trimmed_mean`` (``robust.py``): Flower's Krum (Multi-Krum),
  FedMedian and FedTrimmedAvg behind the same sampling and decoding; plaintext updates only.
* ``he`` (``he_fedavg.py``, maths in ``he.py``): packed BFV FedAvg; the server adds
  ciphertexts and one gateway decrypts only the sum.
* ``secagg`` (``secagg.py``): Flower's SecAgg+ workflow around Flower's legacy FedAvg.
* ``fedavgm`` / ``fedadam`` / ``fedyogi`` / ``fedadagrad`` (``fedopt.py``): Flower's server
  optimisers (momentum, Adam, Yogi, Adagrad on the round's mean update) behind the same
  sampling and decoding; plaintext updates, not with ``privacy=client``.
* ``fedprox`` (``fedprox.py``): Flower's FedProx; FedAvg on the server, a proximal pull towards
  the round's model after every local step on the gateways.
* ``scaffold`` (``scaffold.py``, the gateway's side in ``clients/scaffold.py``): control
  variates that correct each gateway's local drift; twice the bytes both ways; not with ``privacy=client``.
* ``mask`` (``mask_fedavg.py``, maths in ``masking.py``): int8 steps in k-bit words under
  pairwise and Shamir-shared self masks; collusion-resistant, dropout-tolerant, 0.375× float32 up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

from iiotfl.compat.flower import RdpAccountant
from iiotfl.configs import ConfigError, choice
from iiotfl.strategies import codec_fedavg, fedbuff, fedopt, fedprox, he_fedavg, mask_fedavg, robust, scaffold, secagg
from iiotfl.strategies.client_dp import build_client_dp, client_level, fleet_delta, noise_multiplier, privacy_config
from iiotfl.strategies.codecs import get_codec
from iiotfl.strategies.he_fedavg import HEDP
from iiotfl.strategies.spec import BuildContext, BuiltStrategy, StrategySpec

__all__ = ["STRATEGIES", "BuildContext", "StrategySpec", "build_strategy", "strategy_spec", "validate_strategy"]

STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in (
    codec_fedavg.SPEC,
    robust.KRUM,
    robust.MEDIAN,
    robust.TRIMMED_MEAN,
    he_fedavg.SPEC,
    secagg.SPEC,
    mask_fedavg.SPEC,
    fedbuff.SPEC,
    fedopt.FEDAVGM,
    fedopt.FEDADAM,
    fedopt.FEDYOGI,
    fedopt.FEDADAGRAD,
    fedprox.SPEC,
    scaffold.SPEC,
)}

DP_MIN_FRACTION = 0.7  # distributed DP noise still meets its target when 30% of the gateways drop out


def strategy_spec(cfg: Mapping[str, Any]) -> StrategySpec:
    """The registry entry of the run's ``strategy.name``."""
    name = cfg["strategy"]["name"]
    if name not in STRATEGIES:
        raise ConfigError(f"config: strategy.name={name!r} is unknown; pick strategy=<one of {list(STRATEGIES)}>")
    return STRATEGIES[name]


def validate_strategy(cfg: Mapping[str, Any]) -> None:
    """The strategy's name, its own keys, and whether it can carry client-level DP."""
    choice(cfg, "strategy.name", tuple(STRATEGIES), group="strategy")
    strategy_spec(cfg).validate(cfg)


def distributed_dp(cfg: Mapping[str, Any]) -> HEDP:
    """Client-level DP inside encrypted/masked aggregation: noise shares from the gateways."""
    n = int(cfg["fleet"]["gateways"])
    return HEDP(noise_multiplier(cfg), float(cfg["privacy"]["clipping_norm"]),
                min_devices=max(2, math.ceil(DP_MIN_FRACTION * n)), accountant=RdpAccountant(privacy_config(cfg)),
                population=n, delta=fleet_delta(cfg))


def build_strategy(cfg: Mapping[str, Any], on_sampled: Callable[[int, list[int], int], None] | None = None,
                   keys: Path | None = None) -> BuiltStrategy:
    """The run's Flower strategy; ``keys``: the HE key directory the launcher provisioned."""
    spec = strategy_spec(cfg)
    private = client_level(cfg)
    if private and spec.client_dp == "wrappers":
        return build_client_dp(cfg)
    fleet = cfg["fleet"]
    common = dict(
        codec=get_codec(cfg["codec"]),
        downlink=str(cfg["codec"]["downlink"]),
        clients_per_round=fleet["clients_per_round"],
        over_selection=float(fleet["over_selection"]),
        seed=int(cfg["seed"]),
        on_sampled=on_sampled,
        fraction_train=float(fleet["fraction_train"]),
        fraction_evaluate=float(fleet["fraction_evaluate"]),
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=int(fleet["min_replies"]),
        max_update_norm=None if fleet.get("max_update_norm") is None else float(fleet["max_update_norm"]),
    )
    dp = distributed_dp(cfg) if private and spec.client_dp == "distributed" else None
    return spec.build(cfg, BuildContext(common=common, keys=keys, dp=dp))
