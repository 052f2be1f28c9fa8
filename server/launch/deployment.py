"""``engine=fleet``: the run on a real local Flower deployment, and its teardown.

One ``flower-superlink`` and one ``iiotfl gateway`` (which runs ``flower-supernode``) per
gateway; each SuperNode spawns the SuperExec and ClientApp processes flwr 1.42 uses, and the
SuperLink the ServerApp's. TLS and SuperNode authentication unless ``engine.insecure=true``:
certificates and node keys from ``engine.certs`` or fresh ones in ``<run>/certs``
(``security/certs.py``), the SuperLink started with ``--ssl-*`` and ``--enable-supernode-auth``,
every gateway's public key registered through the Control API before its SuperNode starts with
``--root-certificates`` and ``--auth-supernode-private-key``, and the ``flwr`` connection
verifying the CA. With root and ``ip netns``, each gateway runs in its own network namespace
with its link and device profile applied (``links/namespaces.py``); otherwise on loopback,
unshaped, and ``links.json`` says why.

:class:`Deployment` is the base of the other engines (``sim.py``, ``remote.py``): it owns the
run's environment and processes. Each run has its own FLWR_HOME and free ports inside the run
directory; every process started carries the run's tag in its environment
(``clients/processes.py``), so :meth:`Deployment.teardown` finds and ends all of them, children
included, also on Ctrl-C, on SIGTERM, on failure and when the server side crashes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import tomli_w

from iiotfl.clients import gateway, processes
from iiotfl.configs import ConfigError, choice, flag, require, to_run_config
from iiotfl.links import namespaces, shaping
from iiotfl.links.profiles import GatewayProfile, gateway_profiles
from iiotfl.security import certs
from iiotfl.server.launch import front
from iiotfl.server.launch.superlink import (
    LaunchError,
    free_port,
    run_id,
    run_info,
    submit_argv,
    superlink_argv,
    wait_port,
    write_connection,
)

BIN = processes.BIN


def cleanup() -> list[str]:
    """Remove what crashed or killed runs left: orphan processes, namespaces, links, cgroups."""
    if shaping.availability() is not None:
        return []
    return namespaces.cleanup_stale(processes.run_alive)


class Deployment:
    """The processes of one run; use as a context manager so teardown always happens."""

    name: ClassVar[str] = "fleet"
    resume_refusal: ClassVar[str | None] = None  # why this engine's runs cannot resume after a SuperLink restart
    local_gateways: ClassVar[bool] = True  # the gateways read their data files on this machine

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        """TLS and node authentication unless engine.insecure; a given certs directory must hold what the
        fleet reads (the SuperLink certificate's addresses are checked at start, once links are known)."""
        insecure, given = flag(cfg, "engine.insecure"), require(cfg, "engine.certs")
        wanted = choice(cfg, "engine.front", front.FRONTS) if "front" in cfg["engine"] else "none"
        if "clientapp_runtime" in cfg["engine"]:
            choice(cfg, "engine.clientapp_runtime", ("warm", "cold"))
        if wanted == "nginx" and insecure:
            raise ConfigError("config: engine.front=nginx needs TLS (its mutual TLS uses the run's certificates); "
                              "drop engine.insecure=true or set engine.front=none")
        if wanted == "nginx" and front.nginx() is None:
            raise ConfigError(f"config: engine.front=nginx but nginx is not installed; {front.NGINX_HINT}")
        if given is None:
            return
        if insecure:
            raise ConfigError("config: engine.certs is set but engine.insecure=true runs without TLS; drop one of them")
        try:
            certs.check_dir(Path(str(given)).expanduser(), int(cfg["fleet"]["gateways"]))
        except certs.CertsError as err:
            raise ConfigError(f"config: engine.certs: {err}") from None

    def __init__(self, cfg: dict[str, Any], run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.home = run_dir / "flwr"
        self.logs = run_dir / "logs"
        self.tag = f"{uuid.uuid4().hex}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.front_port = 0  # the gateway-facing front (0: none; the gateways dial the SuperLink's port)
        self.links: namespaces.LinkFleet | None = None
        self.gateway_links: list[namespaces.GatewayLink] = []
        self.emulation = "loopback"  # what the links are, said in the report's first lines
        self.certs: Path | None = None  # the run's `iiotfl certs` directory; None: no TLS
        self.transport = ""  # TLS and node authentication or not, said in the report
        self.profiles: list[GatewayProfile] | None = None
        self.submitted_at = 0  # offset in logs/serverapp.log where the latest submission's output starts
        self.env = {**processes.bin_env(), "FLWR_HOME": str(self.home), **processes.tag_env(self.tag),
                    "PYTHONUNBUFFERED": "1"}

    # -- processes ---------------------------------------------------------------
    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = processes.spawn(argv, self.env, log=self.logs / f"{name}.log", cwd=self.run_dir)
        self.procs[name] = proc
        return proc

    def __enter__(self) -> "Deployment":
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def teardown(self, grace: float = 5.0) -> None:
        """End every process of this run: the ones started here and all they started."""
        processes.stop_run(self.tag, self.procs.values(), grace)
        if self.links is not None:
            self.links.remove()

    def run_processes(self, match: Callable[[bytes], bool]) -> list[int]:
        """PIDs of this run's processes whose command line ``match`` accepts."""
        return processes.run_processes(self.tag, match)

    # -- links ---------------------------------------------------------------------
    def setup_links(self) -> None:
        """Namespaces, shaping and cgroups per gateway (engine=fleet), or say why not."""
        profiles = gateway_profiles(self.cfg)
        record: dict[str, Any] = {"subnet": namespaces.SUBNET, "gateways": [p.as_dict() for p in profiles]}
        wanted = any(p.link.shaped for p in profiles)
        why = shaping.availability() if wanted else "every gateway has link=none"
        if why is None:
            cleanup()
            self.links = namespaces.LinkFleet(self.tag)
            self.gateway_links = self.links.create(profiles)
            lossy = [g.profile.index for g in self.gateway_links if not g.loss_emulated]
            self.emulation = (
                f"shaped: one network namespace per gateway on {namespaces.SUBNET}; rate by tc tbf, "
                "loss by nftables, delay and jitter by a relay per gateway (the kernel has no netem); "
                "CPU and memory by cgroups"
                + (f"; loss NOT emulated for gateways {lossy} (install nftables)" if lossy else "")
            )
            for g, gw in zip(record["gateways"], self.gateway_links):
                g.update(netns=gw.netns, host_dev=gw.host_dev, address=gw.address, loss_emulated=gw.loss_emulated)
        else:
            self.emulation = f"loopback, UNSHAPED: {why}; link and device profiles are not applied"
        record["emulation"] = self.emulation
        (self.run_dir / "links.json").write_text(json.dumps(record, indent=2))

    def wire_counters(self) -> dict[int, dict[str, int]] | None:
        """Wire bytes so far per gateway when the links are shaped (None: they are not)."""
        return self.links.counters() if self.links is not None else None

    # -- bring-up ------------------------------------------------------------------
    def start(self) -> None:
        self.port = free_port()
        self.setup_links()
        self.certs = None if self.cfg["engine"].get("insecure") else self.provision_certs()
        self.transport = (
            f"TLS (CA {self.certs / certs.CA_CRT}) and SuperNode authentication (registered node keys)"
            if self.certs else "INSECURE: no TLS and no SuperNode authentication (engine.insecure=true)")
        self.start_superlink()
        self.register_gateways()
        self.start_front()
        if self.links is not None:
            self.links.start_relays(self.front_port or self.port)
        self.start_gateways()
        self.write_connection()

    def start_front(self) -> None:
        """The gateway-facing front (nginx, Fleet API only, mutual TLS) when engine.front asks for one."""
        wanted = self.cfg["engine"].get("front", "none")
        if self.certs is None or wanted == "none" or (wanted == "auto" and front.nginx() is None):
            why = ("engine.front=none" if wanted == "none" else "no TLS" if self.certs is None
                   else "nginx is not installed")
            self.transport += f"; no front ({why}): the gateways reach the SuperLink's whole port"
            return
        self.front_port = free_port()
        try:
            tags = {key: self.env[key] for key in (processes.RUN_VAR, processes.LAUNCHER_VAR)}
            argv = front.prepare(self.run_dir / front.FRONT_DIR, f"127.0.0.1:{self.front_port}",
                                 f"127.0.0.1:{self.port}", self.certs, tags)
        except FileNotFoundError as err:
            raise LaunchError(f"engine.front=nginx: {err}") from None
        proc = self.spawn("front", argv)
        wait_port(self.front_port, proc, float(self.cfg["engine"]["startup_timeout"]), "the front (nginx)",
                  self.logs / "front.log")
        self.transport += ("; the gateways reach only the Fleet API, through a front (nginx) that asks each for "
                           "its client certificate (mutual TLS)")

    def start_superlink(self) -> None:
        """``flower-superlink`` on this run's port, started and listening (LaunchError if not)."""
        sl = self.spawn("superlink", self.superlink_argv())
        wait_port(self.port, sl, float(self.cfg["engine"]["startup_timeout"]), "flower-superlink",
                  self.logs / "superlink.log")

    def register_gateways(self) -> None:
        """Every gateway's public node key, registered with the SuperLink (with TLS only)."""
        if self.certs is None:
            return
        n, timeout = int(self.cfg["fleet"]["gateways"]), float(self.cfg["engine"]["startup_timeout"])
        try:
            certs.register([certs.gateway_pub(self.certs, i) for i in range(n)], f"127.0.0.1:{self.port}",
                           self.certs / certs.CA_CRT, env=self.env, timeout=timeout)
        except certs.CertsError as err:
            raise LaunchError(f"registering the gateways' node keys failed: {err}") from None

    def start_gateways(self) -> None:
        """One ``iiotfl gateway`` per gateway: in its namespace through its relay, or on loopback."""
        for i in range(int(self.cfg["fleet"]["gateways"])):
            superlink = f"127.0.0.1:{self.front_port or self.port}"
            if self.gateway_links:
                superlink = f"{namespaces.SERVER_ADDRESS}:{self.gateway_links[i].relay_port}"
            argv = self.gateway_argv(i, superlink)
            self.spawn(f"supernode-{i}", self.gateway_links[i].wrap(argv) if self.gateway_links else argv)

    # -- TLS and node authentication ---------------------------------------------------
    def provision_certs(self) -> Path:
        """``engine.certs``, checked, or a fresh CA, SuperLink certificate and node keys in
        ``<run>/certs``; the certificate must name every address the SuperNodes dial."""
        n = int(self.cfg["fleet"]["gateways"])
        dialled = ["127.0.0.1"] + ([namespaces.SERVER_ADDRESS] if self.gateway_links else [])
        given = self.cfg["engine"].get("certs")
        where = Path(str(given)).expanduser().resolve() if given else self.run_dir / "certs"
        try:
            if not given:
                certs.create(where, sans=[namespaces.SERVER_ADDRESS], gateways=n)
            certs.check_dir(where, n, dialled)
        except certs.CertsError as err:
            raise LaunchError(f"engine.certs: {err}" if given else str(err)) from None
        return where

    def superlink_argv(self) -> list[str]:
        """The fleet's SuperLink: on ``<run>/state/superlink.db`` (registered node keys and nodes survive
        a restart), with TLS and node authentication unless insecure."""
        (self.run_dir / "state").mkdir(parents=True, exist_ok=True)
        return superlink_argv(self.port, certs_dir=self.certs, database=self.run_dir / "state" / "superlink.db")

    def gateway_argv(self, i: int, superlink: str) -> list[str]:
        """Gateway i as the fleet starts it: ``iiotfl gateway``, the compose gateways' entrypoint
        (clients/gateway.py), which checks its inputs and runs and restarts flower-supernode.
        Its link is already shaped by :class:`namespaces.LinkFleet` with the same ``apply_link``."""
        n = int(self.cfg["fleet"]["gateways"])
        if self.profiles is None:
            self.profiles = gateway_profiles(self.cfg)
        argv = [str(BIN / "iiotfl"), "gateway", "--superlink", superlink, "--partition-id", str(i),
                "--num-partitions", str(n), "--clientappio-port", str(free_port()),
                "--node-config", f"torch-threads={self.profiles[i].device.torch_threads}",
                "--clientapp-runtime", self.cfg["engine"].get("clientapp_runtime", "warm"),
                "--idle-poll", str(self.profiles[i].link.idle_poll_s), *self._scenario(i)]
        if self.certs is None:
            return argv + ["--insecure"]
        argv += ["--ca", str(self.certs / certs.CA_CRT), "--key", str(certs.gateway_key(self.certs, i))]
        # its client certificate: mutual TLS at the front, and (without a front too) the identity
        # that vouches for its run keys under strategy=mask
        return argv + ["--client-cert", str(certs.gateway_crt(self.certs, i)),
                       "--client-key", str(certs.gateway_tls_key(self.certs, i))]

    def _scenario(self, i: int) -> list[str]:
        """Gateway i's part in a crash (fleet.crash) or poisoning (fleet.poison) scenario, as node config."""
        argv = []
        crash = self.cfg["fleet"].get("crash") or {}
        if crash.get("round") and i in crash.get("gateways", []):
            kind = str(crash.get("kind") or "raise")
            if kind not in ("raise", "kill"):
                raise LaunchError(f"config: fleet.crash.kind={kind!r}; use raise or kill")
            argv += ["--node-config", f'crash-round={int(crash["round"])} crash-kind="{kind}"']
        poison = self.cfg["fleet"].get("poison") or {}
        if poison.get("kind", "none") != "none" and i in poison.get("gateways", []):
            argv += ["--node-config", f'poison="{poison["kind"]}" poison-factor={float(poison["factor"])}']
        return argv

    def write_connection(self) -> None:
        write_connection(self.home, certs.flwr_connection(f"127.0.0.1:{self.port}",
                                                          self.certs / certs.CA_CRT if self.certs else None))

    # -- the run -------------------------------------------------------------------
    def submit(self, *, resume_round: int = 0, he_keys: Path | None = None, run_uid: str = "") -> subprocess.Popen:
        """``flwr run`` of the app with the composed config (and the launcher's resume round, HE keys, run id)."""
        log = self.logs / "serverapp.log"
        self.submitted_at = log.stat().st_size if log.exists() else 0
        run_config = self.run_dir / "run_config.toml"
        run_config.write_text(tomli_w.dumps(to_run_config(self.cfg, self.run_dir, resume_round=resume_round,
                                                          he_keys=he_keys, run_uid=run_uid)))
        return self.spawn("serverapp", submit_argv(run_config))

    def run_id(self) -> int | None:
        return run_id(self.logs / "serverapp.log")

    def run_info(self, run_id: int) -> dict[str, Any]:
        return run_info(run_id, self.env)

    def serverapp_alive(self) -> bool:
        """Whether a ServerApp process of this run (flwr-serverapp / flwr-simulation) is running."""
        return bool(self.run_processes(lambda a: b"flwr-serverapp" in a or b"flwr-simulation" in a))

    def dead_supernodes(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("supernode") and p.poll() is not None]

    def supernode_refused(self) -> str | None:
        """One line for the first SuperNode that ended on a TLS or node-key failure (no retry fixes those)."""
        for name in self.dead_supernodes():
            log = self.logs / f"{name}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            said = [x[len("error: "):] for x in text.splitlines() if x.startswith("error: ")]
            why = said[-1] if said else gateway.supernode_failure(text)  # iiotfl gateway's own verdict first
            if why:
                return f"{name.replace('supernode-', 'gateway ')}: {why}; see logs/{name}.log"
        return None

    # -- SuperLink restarts ----------------------------------------------------------
    def superlink_lost(self) -> bool:
        """Whether the SuperLink died under the run (its process ended)."""
        superlink = self.procs.get("superlink")
        return superlink is not None and superlink.poll() is not None

    def superlink_exit(self) -> int | None:
        """The dead SuperLink's exit code (None: not known, e.g. a remote one)."""
        return self.procs["superlink"].returncode if "superlink" in self.procs else None

    def restart_superlink(self) -> None:
        """The SuperLink died: end the ServerApp side it ran (``flwr run``, flwr-serverapp and the
        SuperExec that started it; the gateways stay) and start it again on the same port and
        state database. Gateways reconnect by themselves (``iiotfl gateway`` retries)."""
        client = self.procs.get("serverapp")
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server_side = self.run_processes(
            lambda a: b"flwr-serverapp" in a or (b"flower-superexec" in a and b"serverapp" in a))
        for pid in server_side:
            processes.kill(pid, signal.SIGKILL)
        self.start_superlink()
