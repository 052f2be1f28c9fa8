"""The privacy modes of the ``privacy`` config group and their checks.

* ``none``: no differential privacy.
* ``sample``: DP-SGD on every gateway (Opacus; ``clients/training.py``), per-device budgets,
  each device's ε in the ledger (``privacy/accounting.py``).
* ``client``: client-level DP, Flower's DP wrappers around FedAvg, or noise shares added on the
  gateways under encrypted or masked aggregation (``strategies/client_dp.py``, the strategy's
  ``client_dp`` entry); the fleet's ε in the ledger.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from iiotfl.configs import ConfigError, choice, no_checks, number
from iiotfl.tasks import get_task

Config = Mapping[str, Any]


@dataclass(frozen=True)
class PrivacyMode:
    """One option of the ``privacy`` group, as the ClientApp, the ledger and the reports see it."""

    name: str
    validate: Callable[[Config], None]  # the mode's own keys
    on_device: bool                     # DP-SGD on each device: per-device budgets and epsilon
    epsilon_scope: str                  # what the epsilon it reports is (report wording)
    protects: str                       # what it protects (report wording)


def _validate_budget(cfg: Config) -> None:
    """epsilon / budget / noise_multiplier / delta, which every DP mode shares."""
    priv = cfg["privacy"]
    for key in ("epsilon", "budget", "noise_multiplier"):
        if priv.get(key) is not None:
            number(cfg, f"privacy.{key}", 0.0, 1e6, low_open=True)
    if priv.get("delta") is not None:
        value = priv["delta"]
        if not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
            raise ConfigError(f"config: privacy.delta={value!r} is invalid; it must be in (0, 1), "
                              "well below 1 / records (or null for the default)")
    if not priv.get("epsilon") and not priv.get("noise_multiplier"):
        raise ConfigError("config: privacy needs privacy.epsilon (a target) or privacy.noise_multiplier")


def _validate_sample(cfg: Config) -> None:
    _validate_budget(cfg)
    number(cfg, "privacy.max_grad_norm", 0.0, 1e6, low_open=True)
    from opacus.validators import ModuleValidator  # heavy: only when privacy=sample is checked

    model = get_task(cfg["task"], cfg["seed"]).build_model()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"config: privacy=sample needs a model DP-SGD can train; {type(model).__name__} has "
                          f"{'; '.join(sorted({str(e).splitlines()[0] for e in errors}))} (e.g. use GroupNorm "
                          "instead of BatchNorm)")


def _validate_client(cfg: Config) -> None:
    _validate_budget(cfg)
    number(cfg, "privacy.clipping_norm", 0.0, 1e6, low_open=True)
    choice(cfg, "privacy.clipping", ("server", "client"))
    if cfg["codec"]["name"] != "none":
        raise ConfigError("config: privacy=client clips and averages full float32 weights (Flower's DP wrappers); "
                          "use codec=none with it")
    if float(cfg["fleet"]["fraction_train"]) != 1.0 or cfg["fleet"].get("clients_per_round"):
        raise ConfigError("config: privacy=client accounts every gateway in every round; keep "
                          "fleet.fraction_train=1.0 and fleet.clients_per_round=null")


PRIVACY_MODES: dict[str, PrivacyMode] = {mode.name: mode for mode in (
    PrivacyMode("none", no_checks, on_device=False, epsilon_scope="no differential privacy",
                protects="No differential privacy: updates left the gateways without noise (epsilon = infinity)."),
    PrivacyMode("sample", _validate_sample, on_device=True,
                epsilon_scope="sample-level DP, largest per-gateway epsilon",
                protects="Sample-level DP: DP-SGD (Opacus) on every gateway protects each record of that plant; "
                         "epsilon is per gateway, composed over every round it trained in."),
    PrivacyMode("client", _validate_client, on_device=False, epsilon_scope="client-level DP, fleet epsilon",
                protects="Client-level DP: Flower's DP wrappers clip each gateway's update and add Gaussian noise "
                         "to the sum, protecting a whole plant's participation; epsilon (Flower's RDP accountant) "
                         "is the fleet's."),
)}


def privacy_mode(cfg: Config) -> PrivacyMode:
    """The registry entry of the run's ``privacy.name``."""
    return PRIVACY_MODES[cfg["privacy"]["name"]]


def validate_privacy(cfg: Config) -> None:
    """privacy=none | sample | client: the mode's name from the registry, then its own keys."""
    choice(cfg, "privacy.name", tuple(PRIVACY_MODES), group="privacy")
    privacy_mode(cfg).validate(cfg)
