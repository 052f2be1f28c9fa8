"""``engine=remote``: run the job on an existing SuperLink with real gateways.

The SuperLink (``docker-compose.yml``'s ``superlink`` service, or one a plant pilot's
server runs) already has its gateways (``iiotfl gateway``). :class:`RemoteDeployment`
starts nothing of Flower's: it writes the ``flwr`` connection (address, and the CA
certificate unless ``engine.insecure``), submits the app with ``flwr run``, and the
launcher follows the run as for the local fleet. The ServerApp runs beside the SuperLink
and writes the run directory there, so run this on the SuperLink's machine, or share the
run directory (compose: the ``results`` volume).

If the SuperLink goes away mid-run (compose restarts it on its state database), ``flwr run``
ends; the launcher waits for it to come back and submits the job again, resuming from the
last checkpoint (``server/launch/run.py``, ``fleet.resume_attempts``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

from iiotfl.clients.gateway import GatewayError, wait_for_superlink
from iiotfl.compat.flower import LOG
from iiotfl.configs import ConfigError, flag, require
from iiotfl.security import certs
from iiotfl.server.launch.deployment import Deployment
from iiotfl.server.launch.superlink import LaunchError, write_connection


class RemoteDeployment(Deployment):
    """A Deployment whose SuperLink and SuperNodes run elsewhere."""

    name: ClassVar[str] = "remote"
    local_gateways: ClassVar[bool] = False  # each gateway reads its own files (`iiotfl gateway --data`)

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        """The SuperLink's address, and its CA certificate unless it runs without TLS."""
        address = str(require(cfg, "engine.superlink") or "")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"config: engine.superlink={address!r} is not host:port; give the SuperLink's address, "
                              "e.g. engine.superlink=superlink.plant.example:9093")
        if not flag(cfg, "engine.insecure") and not require(cfg, "engine.ca"):
            raise ConfigError("config: engine=remote needs engine.ca (the SuperLink's ca.crt from `iiotfl certs`), or "
                              "engine.insecure=true for a SuperLink started with --insecure")

    def start(self) -> None:
        eng = self.cfg["engine"]
        self.emulation = f"remote SuperLink {eng['superlink']}: real gateways on their own links"
        self.transport = ("INSECURE: no TLS (engine.insecure=true)" if eng.get("insecure")
                          else f"TLS (CA {eng['ca']}); node authentication as the SuperLink enforces it")
        (self.run_dir / "links.json").write_text(json.dumps({"emulation": self.emulation, "gateways": []}, indent=2))
        self.write_connection()

    def write_connection(self) -> None:
        eng = self.cfg["engine"]
        ca = None if eng.get("insecure") else Path(str(eng.get("ca") or ""))
        if ca is not None and not ca.is_file():
            raise LaunchError(f"engine.ca={eng.get('ca')!r} is not a file; pass the SuperLink's ca.crt "
                              "(`iiotfl certs`) or engine.insecure=true for a SuperLink without TLS")
        write_connection(self.home, certs.flwr_connection(str(eng["superlink"]), ca))

    def serverapp_alive(self) -> bool:
        return True  # it runs on the SuperLink's machine; `flwr run --stream` ends with it

    def dead_supernodes(self) -> list[str]:
        return []

    def superlink_lost(self) -> bool:
        """``flwr run`` ended because the SuperLink became unreachable, before the run finished."""
        client = self.procs.get("serverapp")
        if client is None or client.poll() is None or (self.run_dir / "metrics.json").exists():
            return False
        with (self.logs / "serverapp.log").open("rb") as fh:
            fh.seek(self.submitted_at)
            said = fh.read().decode(errors="replace")
        return LOG["superlink_gone"] in said

    def restart_superlink(self) -> None:
        """Wait (up to engine.startup_timeout, with iiotfl gateway's backoff and TLS probe) until the
        SuperLink answers again: its restart policy, or its operator, brings it back."""
        eng = self.cfg["engine"]
        try:
            wait_for_superlink(str(eng["superlink"]), None if eng.get("insecure") else str(eng["ca"]),
                               float(eng["startup_timeout"]), say=lambda _: None)
        except GatewayError as err:
            raise LaunchError(f"the SuperLink went away mid-run and did not come back usable: {err}") from None
