"""The engines a run can use, by ``engine.name``: a class each, with its own config checks.

An engine is a :class:`~iiotfl.server.launch.deployment.Deployment` subclass (the local fleet
is ``Deployment`` itself) with ``validate(cfg)`` (its ``engine.*`` keys, raising
:class:`~iiotfl.configs.ConfigError`) and ``resume_refusal`` (why its runs cannot go on after
a SuperLink restart; None: they can). Adding one is a class and a line in :data:`ENGINES`.
"""

from __future__ import annotations

from typing import Any, Mapping

from iiotfl.configs import choice
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
