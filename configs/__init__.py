"""Hydra config groups of iiotfl, the checkers their owners use, and their trip through Flower.

``iiotfl run`` composes ``config.yaml`` with one option per group (task/, strategy/,
fleet/, engine/, link/, device/, codec/, privacy/). Each default is written once, in the
group's YAML. Before anything starts, every value is checked by the layer that uses it
(``server/checks.py`` calls them in order) with :func:`require`, :func:`integer`,
:func:`number` and :func:`choice`, which raise :class:`ConfigError` with one line naming
the key and the fix.

The composed config reaches the ServerApp and the ClientApps as Flower run config:
``iiotfl-config`` holds it as JSON, ``output-dir`` says where the ServerApp writes
its artefacts; ``resume-round``, ``he-keys`` and ``run-uid`` carry what the launcher decided (a resumed
run, a provisioned HE key set, the run id). Under plain ``flwr run .`` the JSON is empty and the apps
compose the defaults here, with the few flat keys of ``[tool.flwr.app.config]`` applied.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, cast

CONFIG_DIR = Path(__file__).resolve().parent

# Flat run-config keys of pyproject.toml's [tool.flwr.app.config] -> config paths.
FLAT_KEYS = {
    "num-server-rounds": "fleet.rounds",
    "fraction-train": "fleet.fraction_train",
    "fraction-evaluate": "fleet.fraction_evaluate",
    "local-epochs": "train.local_epochs",
    "batch-size": "train.batch_size",
    "lr": "train.lr",
}


class ConfigError(ValueError):
    """A config value that cannot work, with the key and the fix in one line."""


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose config.yaml with Hydra's compose API and return a plain dict."""
    # Hydra is imported here: the ClientApp process imports this module and needs Hydra only
    # under plain `flwr run .`, where it composes the defaults.
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    data = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # the root config is a mapping
    data.pop("hydra", None)
    return data


def require(cfg: Mapping[str, Any], path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"config: {path} is missing; add it or restore the config group's default")
        node = node[part]
    return node


def integer(cfg: Mapping[str, Any], path: str, low: int, high: int | None = None) -> int:
    value = require(cfg, path)
    bad = not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low
    if bad or (high is not None and value > high):
        rng = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"config: {path}={value!r} is invalid; it must be an integer {rng} (e.g. {path}={low})")
    return int(value)


def flag(cfg: Mapping[str, Any], path: str) -> bool:
    """A boolean key: YAML's true or false, never a string (``engine.insecure='false'`` is refused, not taken
    as set)."""
    value = require(cfg, path)
    if not isinstance(value, bool):
        raise ConfigError(f"config: {path}={value!r} is invalid; it must be true or false, unquoted "
                          f"(e.g. {path}=false)")
    return value


def number(cfg: Mapping[str, Any], path: str, low: float, high: float, low_open: bool = False) -> float:
    value = require(cfg, path)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ConfigError(f"config: {path}={value!r} is invalid; it must be a number in {bound}")
    return float(value)


def choice(cfg: Mapping[str, Any], path: str, choices: tuple[str, ...], group: str | None = None) -> str:
    value = require(cfg, path)
    if value not in choices:
        how = f"pick {group}=<one of {list(choices)}>" if group else f"set {path} to one of {list(choices)}"
        raise ConfigError(f"config: {path}={value!r} is unknown; {how}")
    return str(value)


def no_checks(cfg: Mapping[str, Any]) -> None:
    """The check of a config option with no keys of its own."""


@dataclass(frozen=True)
class RunSettings:
    """What the ServerApp and the ClientApps get from Flower's run config."""

    cfg: dict[str, Any]
    output_dir: Path
    resume_round: int = 0        # a run resumed after a SuperLink restart continues after this round
    he_keys: Path | None = None  # the HE key directory the launcher provisioned (strategy.keys=null)
    defaults: bool = False       # no composed config came (plain `flwr run .`): the apps composed the defaults
    run_uid: str = ""            # the run's own id (kept across SuperLink restarts); artefacts are bound to it


def to_run_config(cfg: Mapping[str, Any], output_dir: str | Path, *, resume_round: int = 0,
                  he_keys: str | Path | None = None, run_uid: str = "") -> dict[str, Any]:
    """The Flower run config that carries ``cfg`` and the launcher's settings to the apps."""
    flat = {key: require(cfg, path) for key, path in FLAT_KEYS.items()}
    flat["iiotfl-config"] = json.dumps(cfg, sort_keys=True)
    flat["output-dir"] = str(Path(output_dir).resolve())
    flat["resume-round"] = int(resume_round)
    flat["he-keys"] = str(Path(he_keys).resolve()) if he_keys else ""
    flat["run-uid"] = str(run_uid)
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> RunSettings:
    """Recover the run's settings from a Flower run config (the defaults under plain ``flwr run .``)."""
    blob = run_config.get("iiotfl-config") or ""
    if blob:
        cfg = json.loads(blob)
    else:
        cfg = compose()
        for key, path in FLAT_KEYS.items():
            if key in run_config:
                section, leaf = path.split(".")
                cfg[section][leaf] = run_config[key]
    out = run_config.get("output-dir") or ""
    keys = run_config.get("he-keys") or ""
    return RunSettings(cfg=cfg, output_dir=Path(out) if out else Path("runs") / "flwr-run",
                       resume_round=int(run_config.get("resume-round") or 0), he_keys=Path(keys) if keys else None,
                       defaults=not blob, run_uid=str(run_config.get("run-uid") or ""))

