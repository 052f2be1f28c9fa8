"""``engine=remote``: run the job on an existing SuperLink with real gateways.

The SuperLink (``docker-compose.yml``'s ``superlink`` service, or one a plant pilot's
server runs) already has its gateways (``iiotfl gateway``). :class:`RemoteDeployment`
starts nothing of Flower's: it writes the ``flwr`` connection (address, and the CA
certificate unless ``engine.insecure``), submits the app with ``flwr run``, and the
launcher follows the run as for the local fleet. The ServerApp runs beside the SuperLink
and writes the run directory there, so run this on the SuperLink's machine, or share the
run directory (compose: the ``results`` volume).
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from server import certs
from server.fleet import CONNECTION, Deployment, LaunchError


class RemoteDeployment(Deployment):
    """A Deployment whose SuperLink and SuperNodes run elsewhere."""

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
        conn = certs.flwr_connection(str(eng["superlink"]), ca)
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))

    def serverapp_alive(self) -> bool:
        return True  # it runs on the SuperLink's machine; `flwr run --stream` ends with it

    def dead_supernodes(self) -> list[str]:
        return []
