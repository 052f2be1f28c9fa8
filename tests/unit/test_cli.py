"""``iiotfl``: one app whose every command answers ``--help`` and does nothing else; the Hydra
private API that ``compat/hydra.py`` wraps is still where that module expects it."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The project is imported inside the tests: were Hydra's private API gone, importing the CLI would fail
# at collection and hide the one test that says what moved.
BIN = Path(sys.executable).parent
IIOTFL = BIN / "iiotfl"
COMMANDS = ("run", "report", "audit", "export", "keys", "certs", "gateway", "collect", "simulate", "front", "cleanup")


def iiotfl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(IIOTFL), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)], ids=["bare", "--help", "-h"])
def test_the_app_prints_its_usage_and_writes_nothing(tmp_path, args):
    proc = iiotfl(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: iiotfl"), proc.stdout
    for command in COMMANDS:
        assert command in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help_and_writes_nothing(tmp_path, command):
    proc = iiotfl(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"usage: iiotfl {command}" in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == [], "--help wrote into the working directory"


def test_run_help_also_lists_the_config_groups(tmp_path):
    proc = iiotfl("run", "-m", "engine=sim", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: iiotfl run" in proc.stdout and "== Configuration groups ==" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # neither runs/ nor multirun/


def test_unknown_command_is_one_line_and_exit_2(tmp_path):
    proc = iiotfl("trian", "x", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["error: unknown command 'trian'"], proc.stderr
    assert "usage: iiotfl" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_usage_of_a_command_is_exit_2(tmp_path):
    from iiotfl.server.cli import main

    assert main(["keys"]) == 2  # DIR missing: argparse's error and the command's usage
    assert main(["cleanup", "extra"]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_build_parser_has_one_subparser_per_command_module():
    from iiotfl.server.cli import COMMANDS as MODULES
    from iiotfl.server.cli import NAMES, build_parser

    assert NAMES == COMMANDS and len(MODULES) == len(COMMANDS)
    usage = build_parser().format_help()
    for command in COMMANDS:
        assert command in usage


# -- Hydra's private API (compat/hydra.py) ---------------------------------------------------------
HYDRA_PRIVATE = ("hydra._internal.config_loader_impl", "ConfigLoaderImpl", "load_sweep_config",
                 ("self", "master_config", "sweep_overrides"))


def test_hydra_private_api_used_by_compat_hydra_is_still_there():
    import hydra

    module, cls, method, params = HYDRA_PRIVATE
    moved = f"hydra-core {hydra.__version__} moved or renamed {module}.{cls}.{method}, which compat/hydra.py wraps"
    assert hydra.__version__.startswith("1.3."), f"hydra-core {hydra.__version__} is not the pinned 1.3.*: " \
                                                 "check compat/hydra.py against it, then the pin in pyproject.toml"
    try:
        loader = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        pytest.fail(f"{moved}: update compat/hydra.py")
    assert callable(getattr(loader, method, None)), f"{moved}: update compat/hydra.py"
    found = tuple(inspect.signature(getattr(loader, method)).parameters)  # through functools.wraps
    assert found == params, f"{moved}: its parameters are now {found}, not {params}; update compat/hydra.py"
    from iiotfl.compat.hydra import SWEEP_LOADER, SWEEP_METHOD, SWEEP_PARAMETERS

    assert (SWEEP_LOADER, SWEEP_METHOD, SWEEP_PARAMETERS) == (loader, method, params), "compat/hydra.py names " \
        "other private API than this test checks; make them agree"


def test_the_sweep_wrapper_is_installed_once():
    from iiotfl.compat.hydra import SWEEP_LOADER, tolerate_sweep_composition_errors
    from iiotfl.server.cli.run import COMPOSE_ERROR, _compose_error

    tolerate_sweep_composition_errors(COMPOSE_ERROR, _compose_error)
    wrapped = SWEEP_LOADER.load_sweep_config
    tolerate_sweep_composition_errors(COMPOSE_ERROR, _compose_error)  # as every `iiotfl run` in one process does
    assert SWEEP_LOADER.load_sweep_config is wrapped
    assert tuple(inspect.signature(wrapped).parameters) == HYDRA_PRIVATE[3]
