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

Parameters are checked in ``configs/__init__.py``; values beyond ``clipping_range``
would be silently saturated by Flower, so every gateway reports the fraction it had to
clip (``secagg-saturated``) and the server logs a warning when it is not zero.

Under client-level DP each gateway clips its *update* to ``clipping_norm`` and adds
its share of the Gaussian noise before masking (:class:`strategies.he_fedavg.HEDP`
sizes the shares and keeps the accounting); every weight is then equal.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any, Callable, Mapping

from flwr.common import FitIns, Parameters, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow


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

    def __init__(self, *, train_config: Mapping[str, Any] | None = None, on_round: Callable[[int, list], None] | None = None,
                 dp=None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_config = dict(train_config or {})  # set by the ServerApp once statistics are in
        self.on_round = on_round
        self.dp = dp

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list:
        pairs = super().configure_fit(server_round, parameters, client_manager)
        config = {**self.train_config, "server-round": server_round}
        if self.dp is not None:
            config.update({"he-dp-clip": self.dp.clipping_norm, "he-dp-sigma": self.dp.share_sigma})
        return [(proxy, FitIns(ins.parameters, dict(config))) for proxy, ins in pairs]

    def privacy_spent(self):
        return self.dp.spent() if self.dp is not None else None

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        for _, res in results:
            saturated = float(res.metrics.get("secagg-saturated", 0.0))
            if saturated > 0:
                log(WARNING, "SecAgg+: %.4f%% of a gateway's weights exceeded strategy.clipping_range and were "
                    "saturated; raise strategy.clipping_range", 100 * saturated)
        if failures:
            log(INFO, "SecAgg+ round %d: %d gateway(s) dropped out; their masks were removed", server_round,
                len(failures))
        if self.dp is not None and results:
            self.dp.record(len(results))
        if self.on_round:
            self.on_round(server_round, results)
        return super().aggregate_fit(server_round, results, failures)


def to_parameters(arrays) -> Parameters:
    return ndarrays_to_parameters(list(arrays))
