"""The engines a run can use, by ``engine.name``: a class each, with its own config checks.

An engine is a :class:`~iiotfl.server.launch.deployment.Deployment` subclass (the local fleet
is ``Deployment`` itself) with ``validate(cfg)`` (its ``engine.*`` keys, raising
:class:`~iiotfl.configs.ConfigError`) and ``resume_refusal`` (why its runs cannot go on after
a SuperLink restart; None: they can). Adding one is a class and a line in :data:`ENGINES`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from iiotfl.configs import ConfigError, choice
from iiotfl.server import checks
from iiotfl.server.launch.deployment import Deployment
from iiotfl.server.launch.remote import RemoteDeployment
from iiotfl.server.launch.sim import SimDeployment

ENGINES: dict[str, type[Deployment]] = {"fleet": Deployment, "sim": SimDeployment, "remote": RemoteDeployment}


def engine_class(cfg: Mapping[str, Any]) -> type[Deployment]:
    """The Deployment class of ``cfg``'s engine (``engine.name`` already validated)."""
    return ENGINES[cfg["engine"]["name"]]


def validate_engine(cfg: Mapping[str, Any]) -> None:
    """``engine.name`` is a known engine, and that engine's own keys; ConfigError on the first bad one."""
    name = choice(cfg, "engine.name", tuple(ENGINES), group="engine")
    ENGINES[name].validate(cfg)


def validate(cfg: Mapping[str, Any]) -> None:
    """Every check of a run before anything starts: the ServerApp's (``server/checks.py``), then the engine's."""
    checks.validate(cfg)
    validate_engine(cfg)


def check_data_files(cfg: Mapping[str, Any]) -> None:
    """The data files the run will read exist and are readable, before any process starts: each
    local gateway's ``task.data.path`` (``{partition}`` filled in) and the server's held-out files."""
    data = cfg["task"].get("data") or {}
    if data.get("source", "generator") == "generator":
        return
    files: list[tuple[str, str]] = []
    if data.get("path") and engine_class(cfg).local_gateways:
        files += [(f"task.data.path (gateway {p})", str(data["path"]).format(partition=p))
                  for p in range(int(cfg["fleet"]["gateways"]))]
    files += [(f"task.data.{key}", str(data[key])) for key in ("test_path", "test_rul_path", "calibration_path")
              if data.get(key)]
    for what, name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            why = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"config: {what}: {path} {why}; give the file (\"{{partition}}\" is replaced by the "
                              "gateway's partition id) or task.data.source=generator")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"config: {what}: {path} is not readable by this user; fix its permissions")
