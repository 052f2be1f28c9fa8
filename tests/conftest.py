"""Shared fixtures: a small config and the project's CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iiotfl.clients import gateway
from iiotfl.compat.flower import task_identity

ROOT = Path(__file__).resolve().parent.parent
IIOTFL = Path(sys.executable).parent / "iiotfl"


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``iiotfl`` as a user would; returns the completed process (text output)."""
    return subprocess.run(
        [str(IIOTFL), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT
    )


def supernode_argv(dep, i: int, superlink: str) -> list[str]:
    """The flower-supernode command gateway ``i`` of deployment ``dep`` runs through its ``iiotfl gateway``."""
    argv = gateway.supernode_argv(gateway.parser().parse_args(dep.gateway_argv(i, superlink)[2:]))
    assert argv[1:3] == ["-m", "iiotfl.compat.supernode"]  # python -m iiotfl.compat.supernode FLOWER-ARGS
    return ["flower-supernode", *argv[3:]]


@pytest.fixture(scope="session", autouse=True)
def _absl_never_closes_the_captured_stderr():
    """dp-accounting imports absl, whose logging handler holds the sys.stderr of the moment it was
    imported (pytest's capture) and closes it when Hydra's `iiotfl run` reconfigures logging; later
    tests then fail on a closed file. Point it at the real stderr, which it never closes."""
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


@pytest.fixture(scope="session", autouse=True)
def _artefact_keys(tmp_path_factory):
    """Artefact keys (server/artefacts.py) of every run the tests start: never the user's own."""
    os.environ["IIOTFL_ARTEFACT_KEYS"] = str(tmp_path_factory.mktemp("artefact-keys"))
    os.environ["IIOTFL_PLANT_KEYS"] = str(tmp_path_factory.mktemp("plant-keys"))  # privacy/anonymise.py


@pytest.fixture(scope="session")
def task_cfg() -> dict:
    from iiotfl.configs import compose

    return compose()["task"]


@pytest.fixture(scope="session")
def fleet_run(tmp_path_factory):
    """One real local deployment shared by several checks: 3 gateways, 3 rounds, the
    default link (ethernet) and codec (float32). Also the float32 reference for codecs."""
    run_dir = tmp_path_factory.mktemp("fleet") / "run"
    proc = run_cli("run", "fleet.gateways=3", "fleet.rounds=3", f"hydra.run.dir={run_dir}")
    return run_dir, proc


@pytest.fixture
def serverapp_identity():
    """Messages the ServerApp creates take run and node ids from its task identity."""
    TaskIdentity = task_identity()
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, getattr(TaskIdentity, "_task_id", None))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id = saved[:2]
    if saved[2] is not None:
        TaskIdentity._task_id = saved[2]
