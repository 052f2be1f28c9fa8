"""The checks of a whole run's config, before anything starts.

Each layer checks its own part, and this module calls them in order: the run's shared keys
(seed, fleet, train), the task's (``tasks/<name>``), the codec's (``strategies/codecs.py``), the
privacy mode's (``privacy/modes.py``), the strategy's (its registry entry), the poisoning
scenario's (``clients/poison.py``) and the link and device profiles (``links/``). The valid
names of every group come from the registries. The launcher adds the engine's own checks
(``server/launch``). Every check raises :class:`~iiotfl.configs.ConfigError` with one line
naming the key and the fix.
"""

from __future__ import annotations

from typing import Any, Mapping

from iiotfl.clients.poison import validate_poison
from iiotfl.clients.training import OPTIMIZERS
from iiotfl.configs import ConfigError, choice, flag, integer, number, require
from iiotfl.links.outages import OUTAGE_MODES
from iiotfl.links.profiles import ProfileError, gateway_profiles
from iiotfl.privacy.modes import privacy_mode, validate_privacy
from iiotfl.strategies import strategy_spec, validate_strategy
from iiotfl.strategies.codecs import validate_codec
from iiotfl.tasks import TASKS, task_class

__all__ = ["ConfigError", "validate"]


def _validate_run(cfg: Mapping[str, Any]) -> int:
    """The keys every run has: seed, fleet size and rounds, local training. Returns fleet.gateways."""
    integer(cfg, "seed", 0)
    gateways = integer(cfg, "fleet.gateways", 1, 250 * 250)
    integer(cfg, "fleet.rounds", 1)
    number(cfg, "fleet.fraction_train", 0.0, 1.0, low_open=True)
    number(cfg, "fleet.fraction_evaluate", 0.0, 1.0)
    if "evaluate_plants" in cfg["fleet"]:  # a config written before the key existed: true
        flag(cfg, "fleet.evaluate_plants")
    if cfg["fleet"].get("personalise_epochs"):
        integer(cfg, "fleet.personalise_epochs", 0, 1000)
        if cfg["privacy"]["name"] != "none":
            raise ConfigError(f"config: fleet.personalise_epochs with privacy={cfg['privacy']['name']}: the "
                              "fine-tuned model's metrics would leave each plant outside the DP accounting; set "
                              "fleet.personalise_epochs=0 or privacy=none")
    if require(cfg, "fleet.min_gateways") is not None:
        integer(cfg, "fleet.min_gateways", 1, gateways)
    number(cfg, "fleet.round_timeout", 0.0, 1e7, low_open=True)
    if cfg["fleet"].get("resend_after_s") is not None:
        number(cfg, "fleet.resend_after_s", 0.0, 1e7, low_open=True)
    if cfg["fleet"].get("resume_attempts") is not None:
        integer(cfg, "fleet.resume_attempts", 0, 100)
    number(cfg, "engine.startup_timeout", 0.0, 1e5, low_open=True)
    integer(cfg, "train.local_epochs", 1)
    integer(cfg, "train.batch_size", 1)
    number(cfg, "train.lr", 0.0, 10.0, low_open=True)
    choice(cfg, "train.optimizer", OPTIMIZERS)
    number(cfg, "train.momentum", 0.0, 0.99)
    integer(cfg, "train.torch_threads", 1)
    return gateways


def _validate_selection(cfg: Mapping[str, Any], gateways: int) -> None:
    """Which gateways a round samples, how many replies it waits for, when they are offline."""
    if require(cfg, "fleet.clients_per_round") is not None:
        integer(cfg, "fleet.clients_per_round", 1, gateways)
    number(cfg, "fleet.over_selection", 0.0, 10.0)
    integer(cfg, "fleet.min_replies", 1, gateways)
    if cfg["fleet"].get("max_update_norm") is not None:
        number(cfg, "fleet.max_update_norm", 0.0, 1e30, low_open=True)
    choice(cfg, "fleet.outage.mode", OUTAGE_MODES)


def _validate_privacy_with_strategy(cfg: Mapping[str, Any]) -> None:
    """A privacy mode the strategy's gateways do not apply is refused, never claimed in the report."""
    mode, spec = privacy_mode(cfg), strategy_spec(cfg)
    if mode.on_device and spec.sample_dp_refusal:
        raise ConfigError(f"config: privacy={mode.name} with strategy={spec.name} is refused: {spec.sample_dp_refusal}")


def validate(cfg: Mapping[str, Any]) -> None:
    """Check every value the run uses (all but the engine's); raise ConfigError on the first bad one."""
    choice(cfg, "task.name", tuple(TASKS), group="task")
    gateways = _validate_run(cfg)
    task_class(cfg["task"]["name"]).validate(cfg)  # the task's own keys (tasks/<name>/__init__.py)
    validate_codec(cfg)
    _validate_selection(cfg, gateways)
    validate_privacy(cfg)
    validate_strategy(cfg)
    _validate_privacy_with_strategy(cfg)
    validate_poison(cfg)
    try:
        gateway_profiles(cfg)
    except ProfileError as err:
        raise ConfigError(str(err)) from None
