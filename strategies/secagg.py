"""SecAgg+: Flower's own secure aggregation, wired into the same app and config.

``strategy=secagg`` runs Flower's ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod``
(gateways) around Flower's legacy ``FedAvg``, which is the API SecAgg+ is built on:

* **setup / share keys**: each gateway makes two key pairs and Shamir-shares its secrets
  with ``num_shares`` neighbours; ``reconstruction_threshold`` shares rebuild them.
* **collect masked vectors**: each gateway trains (``clients/app.py``, legacy fit
  format), clips every weight to ``±clipping_range``, quantises it to
  ``quantization_range`` levels, multiplies by its weight (num-examples ÷ ``max_weight``;
  the server scales counts so the largest gateway's ratio is 1, DP sets every ratio to 1)
  and adds pairwise and private masks modulo ``modulus_range``.
* **unmask**: the survivors send the shares that remove the masks (a dropped gateway's
  pairwise masks are rebuilt from its neighbours' shares). The server learns only the
  weighted sum of the gateways that sent a masked vector.

Parameters are checked by :func:`validate`; values beyond ``clipping_range``
would be silently saturated by Flower, so every gateway reports the fraction it had to
clip (``secagg-saturated``) and the server logs a warning when it is not zero.

Under client-level DP each gateway clips its *update* to ``clipping_norm`` and adds
its share of the Gaussian noise before masking (:class:`strategies.he_fedavg.HEDP`
sizes the shares and keeps the accounting); every weight is then equal.
"""

from __future__ import annotations

import numbers
from logging import INFO, WARNING
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.common import FitIns, Parameters, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from iiotfl.configs import ConfigError, integer, number, require
from iiotfl.strategies import wire
from iiotfl.strategies.spec import BuildContext, StrategySpec


def workflow(cfg: Mapping[str, Any]) -> SecAggPlusWorkflow:
    st = cfg["strategy"]
    return SecAggPlusWorkflow(
        num_shares=st["num_shares"], reconstruction_threshold=st["reconstruction_threshold"],
        max_weight=float(st["max_weight"]), clipping_range=float(st["clipping_range"]),
        quantization_range=int(st["quantization_range"]), modulus_range=int(st["modulus_range"]),
        timeout=float(cfg["fleet"]["round_timeout"]),
    )


class SecAggFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg, fed by SecAgg+ with the sum only; our train config per round."""

    def __init__(self, *, train_config: Mapping[str, Any] | None = None, dp=None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_config = dict(train_config or {})  # set by the ServerApp once statistics are in
        self.dp = dp

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list:
        pairs = super().configure_fit(server_round, parameters, client_manager)
        config = {**self.train_config, wire.SERVER_ROUND: server_round}
        if self.dp is not None:
            config.update({wire.HE_DP_CLIP: self.dp.clipping_norm, wire.HE_DP_SIGMA: self.dp.share_sigma})
        return [(proxy, FitIns(ins.parameters, dict(config))) for proxy, ins in pairs]

    def privacy_spent(self):
        return self.dp.spent() if self.dp is not None else None

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        for _, res in results:
            saturated = float(res.metrics.get(wire.SECAGG_SATURATED, 0.0))
            if saturated > 0:
                log(WARNING, "SecAgg+: %.4f%% of a gateway's weights exceeded strategy.clipping_range and were "
                    "saturated; raise strategy.clipping_range", 100 * saturated)
        if failures:
            log(INFO, "SecAgg+ round %d: %d gateway(s) dropped out; their masks were removed", server_round,
                len(failures))
        if self.dp is not None and results:
            self.dp.record(len(results))
        return super().aggregate_fit(server_round, results, failures)


def to_parameters(arrays) -> Parameters:
    return ndarrays_to_parameters(list(arrays))



def run(grid: Grid, context: Context, cfg: Mapping[str, Any], model: torch.nn.Module, train_config: dict[str, Any],
        evaluate, num_rounds: int, strategy: SecAggFedAvg, examples: Mapping[int, int]) -> tuple[ArrayRecord, dict]:
    """strategy=secagg: Flower's DefaultWorkflow with SecAggPlusWorkflow as its fit step, on ``grid``."""
    # SecAgg+ multiplies each weight by num-examples / max_weight before quantising, so
    # a small ratio costs precision: scale the largest gateway's count up to max_weight
    train_config = {**train_config, wire.SECAGG_WEIGHT_SCALE: float(cfg["strategy"]["max_weight"])
                    / max(max(examples.values(), default=1), 1)}
    names = list(model.state_dict().keys())
    final: dict[str, ArrayRecord] = {}

    def as_record(ndarrays) -> ArrayRecord:
        return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in zip(names, ndarrays)})

    def evaluate_fn(server_round: int, ndarrays, config):  # noqa: ARG001
        final["arrays"] = as_record(ndarrays)
        scores = dict(evaluate(server_round, final["arrays"]))
        return float(next(iter(scores.values()), 0.0)), scores

    strategy.evaluate_fn = evaluate_fn
    strategy.train_config = dict(train_config)
    strategy.initial_parameters = to_parameters(v.detach().numpy() for v in model.state_dict().values())
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds,
                                                                round_timeout=float(cfg["fleet"]["round_timeout"])),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=workflow(cfg))(grid, legacy)
    return final["arrays"], {}

def validate(cfg: Mapping[str, Any]) -> None:
    """strategy=secagg: SecAgg+'s parameters, and the combinations that cannot work."""
    gateways = int(cfg["fleet"]["gateways"])
    if cfg["codec"]["name"] != "none":
        raise ConfigError("config: strategy=secagg quantises updates itself; use codec=none with it")
    if gateways < 3:
        raise ConfigError("config: strategy=secagg needs fleet.gateways >= 3 (Flower's SecAgg+ needs more than "
                          "two shares)")
    shares = require(cfg, "strategy.num_shares")
    if not isinstance(shares, numbers.Real) or shares <= 0 or (isinstance(shares, int) and 1 < shares <= 2):
        raise ConfigError(f"config: strategy.num_shares={shares!r}; give an int > 2 or a fraction in (0, 1]")
    threshold = require(cfg, "strategy.reconstruction_threshold")
    if not isinstance(threshold, numbers.Real) or threshold <= 0 or (isinstance(threshold, float) and threshold > 1):
        raise ConfigError(f"config: strategy.reconstruction_threshold={threshold!r}; give an int >= 2 or a "
                          "fraction in (0, 1]")
    if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
        raise ConfigError("config: strategy.reconstruction_threshold must be below strategy.num_shares")
    number(cfg, "strategy.clipping_range", 0.0, 1e6, low_open=True)
    q = integer(cfg, "strategy.quantization_range", 2)
    m = integer(cfg, "strategy.modulus_range", 2, 2**32)
    if m & (m - 1):
        raise ConfigError(f"config: strategy.modulus_range={m} must be a power of two (at most 2^32)")
    if m < q * gateways:
        raise ConfigError(f"config: strategy.modulus_range={m} < gateways x quantization_range = {q * gateways}: "
                          "the masked sum would wrap around; lower strategy.quantization_range")
    number(cfg, "strategy.max_weight", 0.0, 1e12, low_open=True)


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> SecAggFedAvg:
    fleet = cfg["fleet"]
    n = int(fleet.get("min_gateways") or fleet["gateways"])
    return SecAggFedAvg(dp=ctx.dp, fraction_fit=float(fleet["fraction_train"]), fraction_evaluate=0.0,
                        min_fit_clients=min(3, n), min_available_clients=n)


SPEC = StrategySpec(
    name="secagg", build=build,
    extra_exchanges=3, validate=validate, uplink="masked", client_dp="distributed", runner=run,
    resume_refusal="strategy=secagg runs Flower's legacy workflow, which cannot start at a later round",
    sample_dp_refusal=("its gateways train in Flower's SecAgg+ workflow, which runs no DP-SGD, so no record "
                       "would be protected; use strategy=he with privacy=sample, or privacy=client with "
                       "strategy=secagg"),
    describe="model weights, {noise}quantised and masked (SecAgg+); the server learns only the sum",
)
