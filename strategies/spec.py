"""What a strategy states about itself: the entry every aggregation strategy adds to the registry.

A strategy is one file in ``strategies/`` that defines its Flower strategy class and one
:class:`StrategySpec`, and one line in ``strategies/__init__.py``'s ``STRATEGIES``. Everything
else — the config checks, the ServerApp, the launcher (key provisioning, resume), the ledger
and the reports — asks the spec instead of comparing the strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp.strategy import Strategy

from iiotfl.configs import ConfigError, number

Config = Mapping[str, Any]
# What a spec builds: a Message-API strategy, or Flower's legacy one for a spec with a runner of its own (SecAgg+)
BuiltStrategy = Strategy | LegacyStrategy


@dataclass
class BuildContext:
    """What ``StrategySpec.build`` gets besides the config."""

    common: dict[str, Any]                      # CodecFedAvg's sampling/codec/downlink keyword arguments
    keys: Path | None = None                    # the HE key directory (strategy.keys or the launcher's)
    dp: Any = None                              # distributed DP noise shares (privacy=client on he/secagg)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategySpec:
    """One aggregation strategy, as the rest of the project sees it."""

    name: str
    build: Callable[[Config, BuildContext], BuiltStrategy]
    validate: Callable[[Config], None]
    uplink: str            # what a gateway's update is on the uplink: "plaintext", "encrypted" or "masked"
    describe: str          # how an update leaves a gateway (ledger and report wording; an encrypted or
                           # masked uplink's text has a {noise} field for the DP noise share added first)
    client_dp: str | None  # privacy=client: "wrappers" (Flower's DP wrappers around the mean),
                           # "distributed" (noise shares added on the gateways), None (refused)
    resume_refusal: str | None = None  # why a run cannot resume after a SuperLink restart (None: it can)
    sample_dp_refusal: str | None = None  # why privacy=sample (DP-SGD on the gateways) cannot run with it
    also_sent: str | None = None       # what else leaves a gateway with each update (the privacy ledger's form)
    needs_keys: bool = False           # HE key set: the local fleet provisions one when strategy.keys is null
    extra_exchanges: int = 0           # message exchanges a round needs besides the train one (decrypt, unmask)
    device_update: Callable[..., Any] | None = None  # the gateway's reply records for an update (mask):
                                                     # (context, config, update, view, cfg, rng, run_id)
                                                     # -> (records, extra metrics)
    runner: Callable[..., Any] | None = None  # a workflow of its own (SecAgg+ in Flower's legacy workflow):
                                              # (grid, context, cfg, model, train_config, evaluate, rounds,
                                              # strategy, examples) -> (final arrays, client evaluation)

    @property
    def server_sees_updates(self) -> bool:
        """Whether the server sees each gateway's update (not only their sum)."""
        return self.uplink == "plaintext"


def refuse_client_dp(cfg: Config, why: str) -> None:
    """A strategy that cannot carry ``privacy=client`` refuses it in one line: ``why``, and what to use instead."""
    if cfg["privacy"]["name"] == "client":
        raise ConfigError(f"config: strategy={cfg['strategy']['name']} with privacy=client: {why}; use privacy=sample "
                          "(DP-SGD on the gateways) with it, or strategy=fedavg")


def server_step(cfg: Config) -> dict[str, float]:
    """``strategy.server_lr`` and ``strategy.server_momentum``, checked: FedAvgM's server step (1.0 and 0.0 are
    FedAvg's), for ``fedavgm`` and for the secure sums of ``he`` and ``mask`` (a config written before they had
    them: FedAvg's)."""
    st = cfg["strategy"]
    return {"server_lr": number(cfg, "strategy.server_lr", 0.0, 100.0, low_open=True) if "server_lr" in st else 1.0,
            "server_momentum": (number(cfg, "strategy.server_momentum", 0.0, 0.999) if "server_momentum" in st
                                else 0.0)}

