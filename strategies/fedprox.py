"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", 2020): Flower's FedProx behind
the codec machinery, with the proximal term on the gateways.

The server is FedAvg; what changes is local training. Every train message carries ``proximal-mu``
(Flower's FedProx key), and each gateway pulls its weights back towards the round's starting model
after every optimiser step, by lr × mu of the distance (``clients/training.proximal_pull``). On
unlike plants this keeps a gateway's local epochs from drifting far towards its own plant.

The pull is a step of its own (decoupled, as AdamW's weight decay) rather than a term in the loss.
For SGD the two are the same; under Adam, the default local optimiser, a term in the loss would be
rescaled by Adam's per-weight normalisation. Under ``privacy=sample`` the pull stays outside
DP-SGD's per-sample clipping and noise. It depends on no example, so it costs no privacy.
``privacy=client`` is refused: its path builds Flower's FedAvg inside the DP wrappers, which would
not send ``proximal-mu``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from iiotfl.configs import number
from iiotfl.strategies import wire
from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.spec import BuildContext, StrategySpec, refuse_client_dp


class CodecFedProx(CodecFedAvg, FedProx):
    """CodecFedAvg's sampling, downlink and decoding; Flower's FedProx's ``proximal-mu`` in every train message."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[wire.PROXIMAL_MU] = float(self.proximal_mu)  # what FedProx.configure_train adds
        return super().configure_train(server_round, arrays, config, grid)


def _validate(cfg: Mapping[str, Any]) -> None:
    refuse_client_dp(cfg, "client-level DP runs Flower's FedAvg inside its DP wrappers, which would not send "
                          "proximal-mu")
    number(cfg, "strategy.proximal_mu", 0.0, 1e4)


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecFedProx:
    return CodecFedProx(**ctx.common, proximal_mu=float(cfg["strategy"]["proximal_mu"]))


SPEC = StrategySpec(
    name="fedprox", build=build, validate=_validate, uplink="plaintext", client_dp=None,
    describe="the codec's encoding of the update; the server sees each gateway's update",
)
