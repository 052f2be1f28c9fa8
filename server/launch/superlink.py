"""The SuperLink side of a local run: ports, the ``flower-superlink`` command line, the ``flwr``
connection the run is submitted through, and what Flower says about the run afterwards.

Every launcher writes ``<run>/flwr/config.toml`` with one connection, ``iiotfl``
(:data:`CONNECTION`), and submits with ``flwr run <app> iiotfl --run-config ... --stream``;
``flwr run``'s output (and so the run id Flower prints) goes to ``logs/serverapp.log``.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from iiotfl.clients.processes import BIN
from iiotfl.compat.flower import LOG
from iiotfl.security import certs

APP_DIR = Path(__file__).resolve().parents[2]  # the Flower App: pyproject.toml + packages
CONNECTION = "iiotfl"


class LaunchError(RuntimeError):
    """The deployment could not be brought up or the run failed; one line says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(log: Path) -> str:
    last = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:] if log.exists() else []
    return f" (its last line: {last[0].strip()[:200]!r})" if last else ""


def wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    """Until something listens on 127.0.0.1:``port``; LaunchError if ``proc`` exits first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"{what} exited with code {proc.returncode} during start-up{_last_line(log)}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise LaunchError(f"{what} did not listen on port {port} within {timeout:.0f}s; see {log}")


def superlink_argv(port: int, *, certs_dir: Path | None, database: Path | None = None,
                   simulation: bool = False) -> list[str]:
    """``flower-superlink`` on 127.0.0.1:``port``: on ``database`` (state that survives a restart), with
    TLS and SuperNode authentication from ``certs_dir`` (None: ``--insecure``), or ``--simulation``."""
    argv = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    if certs_dir is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(certs_dir / certs.CA_CRT),
                 "--ssl-certfile", str(certs_dir / certs.SERVER_CRT),
                 "--ssl-keyfile", str(certs_dir / certs.SERVER_KEY), "--enable-supernode-auth"]
    if simulation:
        argv.append("--simulation")
    return argv


def write_connection(home: Path, conn: Mapping[str, Any]) -> None:
    """``home/config.toml`` with ``conn`` as the default (and only) connection, :data:`CONNECTION`."""
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: dict(conn)}}))


def submit_argv(run_config: Path) -> list[str]:
    return [str(BIN / "flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config), "--stream"]


def run_id(log: Path) -> int | None:
    """The run id ``flwr run`` printed in ``log`` (the last: a reused run dir keeps old logs)."""
    found = re.findall(LOG["run_started"], log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def run_info(run_id: int, env: Mapping[str, str]) -> dict[str, Any]:
    """``flwr ls`` of run ``run_id`` (status, network traffic); {} if Flower does not say."""
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, text=True, env=dict(env), timeout=60,
    )
    try:
        return json.loads(out.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return {}
