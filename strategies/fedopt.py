"""Server-side optimisers: Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad behind the codec machinery.

FedAvg applies the mean of the gateways' updates as it is. These treat that mean as a pseudo-gradient
and take a server optimiser's step with it: momentum (FedAvgM, Hsu et al. 2019) or an adaptive step
per weight (FedAdam, FedYogi, FedAdagrad; Reddi et al., "Adaptive Federated Optimization", 2021). On
unlike plants the mean update of one round is small and noisy (the gateways' moves partly cancel);
momentum and per-weight scaling carry it further and steadier.

Each class is :class:`CodecFedAvg` in front of Flower's own strategy (``flwr.serverapp.strategy``):
CodecFedAvg decodes every update into weights and hands them to ``super().aggregate_train``, which is
Flower's optimiser here (its FedAvg mean, then its step). Flower's optimisers keep the round's global
model from their ``configure_train``, which CodecFedAvg replaces, so :meth:`configure_train` records
it first. With a lossy delta downlink (``int8``/``int4``/``sparse``) the gateways start from the
server's exact view of the model, within the codec's error of the global one; that error enters the
pseudo-gradient, and the next round's delta carries the rest.

Not with ``privacy=client``: Flower's DP wrappers calibrate their noise to the mean of clipped
updates, and the optimiser's step is not that mean. ``privacy=sample`` (DP-SGD on the gateways)
composes. A run does not resume after a SuperLink restart: the optimiser's moments are not in the
checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from iiotfl.configs import number
from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.spec import BuildContext, StrategySpec, refuse_client_dp, server_step


class _ServerOpt(CodecFedAvg):
    """CodecFedAvg's sampling, downlink and decoding; the Flower optimiser after it in the class order."""

    current_arrays: Any  # Flower's: an ArrayRecord (FedAvgM) or a dict of numpy arrays (FedOpt's)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # what Flower's configure_train would record: the global model this round's pseudo-gradient is taken from
        if isinstance(self, FedAvgM):
            self.current_arrays = arrays
        else:
            self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)


class CodecFedAvgM(_ServerOpt, FedAvgM):
    """global ← global − server_lr · v, v ← server_momentum · v + (global − mean of the gateways' models)."""


class CodecFedAdam(_ServerOpt, FedAdam):
    """Adam on the pseudo-gradient: a step of about ``eta`` per weight, scaled by its history."""


class CodecFedYogi(_ServerOpt, FedYogi):
    """FedAdam with Yogi's additive second moment (grows more slowly where updates are sparse)."""


class CodecFedAdagrad(_ServerOpt, FedAdagrad):
    """Adagrad on the pseudo-gradient: per-weight steps shrink with the sum of past squares."""


def _validate(cfg: Mapping[str, Any]) -> None:
    name = cfg["strategy"]["name"]
    refuse_client_dp(cfg, f"Flower's DP wrappers calibrate the noise to the mean of clipped updates, and {name}'s "
                          "server step is not that mean, so the reported epsilon would be false")
    if name == "fedavgm":
        server_step(cfg)
        return
    number(cfg, "strategy.eta", 0.0, 100.0, low_open=True)
    number(cfg, "strategy.tau", 0.0, 1.0, low_open=True)
    if name != "fedadagrad":
        number(cfg, "strategy.beta_1", 0.0, 0.999)
        number(cfg, "strategy.beta_2", 0.0, 0.9999)


def _build(cls: type[CodecFedAvg], keys: tuple[str, ...]):
    def build(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecFedAvg:
        s = cfg["strategy"]
        names = {"server_lr": "server_learning_rate"}  # this config's key -> Flower's argument
        options: dict[str, Any] = {names.get(k, k): float(s[k]) for k in keys}
        return cls(**ctx.common, **options)
    return build


_DESCRIBE = "the codec's encoding of the update; the server sees each gateway's update"
_RESUME = "the server optimiser's moments are not in the checkpoint; start the run again"


def _spec(name: str, cls: type[CodecFedAvg], keys: tuple[str, ...]) -> StrategySpec:
    return StrategySpec(name=name, build=_build(cls, keys), validate=_validate, uplink="plaintext",
                        describe=_DESCRIBE, client_dp=None, resume_refusal=_RESUME)


FEDAVGM = _spec("fedavgm", CodecFedAvgM, ("server_lr", "server_momentum"))
FEDADAM = _spec("fedadam", CodecFedAdam, ("eta", "beta_1", "beta_2", "tau"))
FEDYOGI = _spec("fedyogi", CodecFedYogi, ("eta", "beta_1", "beta_2", "tau"))
FEDADAGRAD = _spec("fedadagrad", CodecFedAdagrad, ("eta", "tau"))
