"""``engine=sim``: one ``flower-superlink --simulation``; Flower runs the virtual gateways on Ray.

No network and no gateway processes: Flower's simulation engine runs the ClientApps inside the
SuperLink's process tree, ``engine.client_cpus`` CPUs each, on this machine (``engine.num_cpus``
caps Ray) or on a Ray cluster (``engine.ray_address``). The link and device profiles give the
simulated clock (``sim_s``, ``links/profiles.py``) instead of being applied. The virtual
gateways die with the SuperLink, so a run cannot resume after a SuperLink restart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar, Mapping

from iiotfl.configs import ConfigError, integer, require
from iiotfl.links.profiles import gateway_profiles
from iiotfl.security import certs
from iiotfl.server.launch.deployment import Deployment
from iiotfl.server.launch.superlink import free_port, superlink_argv, write_connection


class SimDeployment(Deployment):
    """A Deployment whose gateways are virtual: Flower's simulation engine inside the SuperLink."""

    name: ClassVar[str] = "sim"
    resume_refusal: ClassVar[str | None] = (
        "engine=sim runs its virtual gateways inside the SuperLink; they died with it")

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        """Ray's resources: CPUs per virtual gateway, and this machine's CPUs or a Ray cluster's address."""
        integer(cfg, "engine.client_cpus", 1)
        if require(cfg, "engine.num_cpus") is not None:
            integer(cfg, "engine.num_cpus", 1)
        ray = cfg["engine"].get("ray_address")
        if ray is None:
            return
        if not re.fullmatch(r"(auto|[\w.-]+:\d{1,5})", str(ray)):
            raise ConfigError(f"config: engine.ray_address={ray!r} is not host:port; give the Ray head's address "
                              "as `ray start --head` printed it, e.g. engine.ray_address=10.0.0.5:6379")
        if require(cfg, "engine.num_cpus") is not None:
            raise ConfigError("config: engine.num_cpus cannot be set with engine.ray_address; the Ray cluster "
                              "brings its own CPUs (set engine.num_cpus=null)")

    def __init__(self, cfg: dict[str, Any], run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        # Ray keeps its sockets here; short, because of the Unix socket path limit.
        self.env["RAY_TMPDIR"] = f"/tmp/iiotfl-{self.tag[:12]}"
        if cfg["engine"].get("ray_address"):  # ray.init() in Flower's simulation joins this cluster
            self.env["RAY_ADDRESS"] = str(cfg["engine"]["ray_address"])

    def teardown(self, grace: float = 5.0) -> None:
        super().teardown(grace)
        shutil.rmtree(self.env["RAY_TMPDIR"], ignore_errors=True)

    def start(self) -> None:
        self.port = free_port()
        self.transport = "no network: Flower's simulation engine runs the gateways inside the SuperLink"
        self.emulation = "simulated: link and device profiles give the simulated clock (sim_s)"
        profiles = gateway_profiles(self.cfg)
        (self.run_dir / "links.json").write_text(json.dumps(
            {"emulation": self.emulation, "gateways": [p.as_dict() for p in profiles]}, indent=2))
        self.start_superlink()
        self.write_connection()

    def superlink_argv(self) -> list[str]:
        return superlink_argv(self.port, certs_dir=None, simulation=True)

    def write_connection(self) -> None:
        engine = self.cfg["engine"]
        conn = certs.flwr_connection(f"127.0.0.1:{self.port}", None)
        backend: dict[str, Any] = {"client-resources": {"num-cpus": int(engine["client_cpus"]), "num-gpus": 0.0}}
        if engine.get("num_cpus"):
            backend["init-args"] = {"num-cpus": int(engine["num_cpus"])}
        conn["options"] = {"num-supernodes": int(self.cfg["fleet"]["gateways"]), "backend": backend}
        write_connection(self.home, conn)
