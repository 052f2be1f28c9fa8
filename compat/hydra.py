"""The project's one reach into Hydra's private API (``hydra._internal``; hydra-core 1.3, pinned in pyproject).

:func:`tolerate_sweep_composition_errors` wraps ``ConfigLoaderImpl.load_sweep_config``, which Hydra's
basic launcher calls to compose each point of a ``-m`` sweep just before running it, and which aborts
the whole sweep when one point cannot be composed (an override that one option of a swept group lacks,
a misspelt option). Wrapped, such a point gets the sweep's base config (composed without the point's
overrides) with

* ``hydra.overrides.task`` set to the point's own overrides (its run directory and report name them), and
* ``describe(error)`` under the config key ``key``,

so the task function can record the point as a failed run and the sweep goes on.

``tests/unit/test_cli.py`` fails, naming this module, when the installed Hydra moves or renames what it uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from omegaconf import DictConfig, open_dict, read_write

# What this module relies on: the class, its method, and the method's parameters (checked by tests/unit/test_cli.py).
SWEEP_LOADER = ConfigLoaderImpl
SWEEP_METHOD = "load_sweep_config"
SWEEP_PARAMETERS = ("self", "master_config", "sweep_overrides")

_MARK = "_iiotfl_tolerant"
_settings: dict[str, Any] = {}  # the key and describe of the latest call, read by the wrapper


def tolerate_sweep_composition_errors(key: str, describe: Callable[[Exception], str]) -> None:
    """Install the wrapper (once per process; a later call only replaces ``key`` and ``describe``)."""
    _settings.update(key=key, describe=describe)
    original = getattr(SWEEP_LOADER, SWEEP_METHOD)
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        try:
            return original(self, master_config, sweep_overrides)
        except Exception as err:  # noqa: BLE001 - ConfigCompositionException, MissingConfigException, ...
            cfg = original(self, master_config, [])
            with read_write(cfg), open_dict(cfg):
                cfg.hydra.overrides.task = list(sweep_overrides)
                cfg[_settings["key"]] = _settings["describe"](err)
            return cfg

    setattr(load_sweep_config, _MARK, True)
    setattr(SWEEP_LOADER, SWEEP_METHOD, load_sweep_config)
