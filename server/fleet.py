"""Run the app on a real local Flower deployment, or on Flower's simulation engine.

``engine=fleet``: one ``flower-superlink`` and one ``flower-supernode`` per gateway
(each spawns the SuperExec and ClientApp/ServerApp processes flwr 1.42 uses), with TLS
and SuperNode authentication unless ``engine.insecure=true``: certificates and node keys
from ``engine.certs`` or fresh ones in ``<run>/certs`` (``server/certs.py``), the SuperLink
started with ``--ssl-*`` and ``--enable-supernode-auth``, every gateway's public key
registered through the Control API before its SuperNode starts with ``--root-certificates``
and ``--auth-supernode-private-key``, and the ``flwr`` connection verifying the CA.
``engine=sim``: one ``flower-superlink --simulation``; Flower runs the virtual
gateways on Ray.

Either way the run is submitted with ``flwr run`` and the composed config, progress is
read from the ``metrics.jsonl`` the ServerApp appends to, and everything is torn down
at the end, also on Ctrl-C, on SIGTERM, on failure and when the server side crashes.
Each run has its own FLWR_HOME and free ports inside the run directory; every process
started carries an ``IIOTFL_RUN`` tag in its environment, so teardown finds and ends
all of them, children included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import tomli_w

from iiotfl.links.profiles import gateway_profiles
from iiotfl.configs import to_run_config
from iiotfl.clients.gateway import supernode_failure
from iiotfl.security import certs
from iiotfl.links import shaping
from iiotfl.links.outages import Outages
from iiotfl.server.report import load_rounds, write_report

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower App: pyproject.toml + packages
BIN = Path(sys.executable).parent
CONNECTION = "iiotfl"


class LaunchError(RuntimeError):
    """The deployment could not be brought up or the run failed; one line says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs of live (not zombie) processes whose environment has ``key=value``."""
    needle = b"\0" + f"{key}={value}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in b"\0" + (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _start_ticks(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_id() -> str:
    """``pid:start-time`` of this process, so a later run can tell whether it still lives."""
    return f"{os.getpid()}:{_start_ticks(os.getpid())}"


def run_alive(tag_prefix: str) -> bool:
    """Whether the run whose tag starts with ``tag_prefix`` is still going.

    Its processes carry ``IIOTFL_RUN=<tag>`` and ``IIOTFL_LAUNCHER=<pid:start>``. A run
    whose launcher died (``kill -9``, a crash) leaves orphans: they are ended here and
    the run counts as gone, so its namespaces and cgroups can be removed.
    """
    needle = f"\0IIOTFL_RUN={tag_prefix}".encode()
    orphans, alive = [], False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle not in environ:
            continue
        m = re.search(rb"\0IIOTFL_LAUNCHER=(\d+):(\d+)", environ)
        if m and _start_ticks(int(m.group(1))) == m.group(2).decode():
            alive = True
        else:
            orphans.append(int(entry.name))
    if not alive:
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return alive


def cleanup() -> list[str]:
    """Remove what crashed or killed runs left: orphan processes, namespaces, links, cgroups."""
    if shaping.availability() is not None:
        return []
    return shaping.cleanup_stale(run_alive)


def wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            last = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:] if log.exists() else []
            said = f" (its last line: {last[0].strip()[:200]!r})" if last else ""
            raise LaunchError(f"{what} exited with code {proc.returncode} during start-up{said}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise LaunchError(f"{what} did not listen on port {port} within {timeout:.0f}s; see {log}")


class Deployment:
    """The processes of one run; use as a context manager so teardown always happens."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.home = run_dir / "flwr"
        self.logs = run_dir / "logs"
        self.tag = f"{uuid.uuid4().hex}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.links: shaping.LinkFleet | None = None
        self.gateway_links: list[shaping.GatewayLink] = []
        self.emulation = "loopback"  # what the links are, said in the report's first lines
        self.certs: Path | None = None  # the run's `iiotfl certs` directory; None: no TLS
        self.transport = ""  # TLS and node authentication or not, said in the report
        self.profiles: list[Any] | None = None
        self.submitted_at = 0  # offset in logs/serverapp.log where the latest submission's output starts
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "IIOTFL_RUN": self.tag,
            "IIOTFL_LAUNCHER": launcher_id(),
            "PYTHONUNBUFFERED": "1",
            # Ray (engine=sim) keeps its sockets here; short, because of the Unix socket path limit.
            "RAY_TMPDIR": f"/tmp/iiotfl-{self.tag[:12]}",
        }
        if cfg["engine"].get("ray_address"):  # ray.init() in Flower's simulation joins this cluster
            self.env["RAY_ADDRESS"] = str(cfg["engine"]["ray_address"])

    # -- processes ---------------------------------------------------------------
    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.run_dir, start_new_session=True,
        )
        log.close()
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
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = set(processes_with_env("IIOTFL_RUN", self.tag))
            pids.update(p.pid for p in self.procs.values() if p.poll() is None)
            for pid in pids:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.time() + grace
            while time.time() < deadline and processes_with_env("IIOTFL_RUN", self.tag):
                for p in self.procs.values():
                    p.poll()
                time.sleep(0.1)
            if not processes_with_env("IIOTFL_RUN", self.tag):
                break
        for p in self.procs.values():
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.env["RAY_TMPDIR"], ignore_errors=True)
        if self.links is not None:
            self.links.remove()

    # -- links ---------------------------------------------------------------------
    def setup_links(self) -> None:
        """Namespaces, shaping and cgroups per gateway (engine=fleet), or say why not."""
        profiles = gateway_profiles(self.cfg)
        record: dict[str, Any] = {"subnet": shaping.SUBNET, "gateways": [p.as_dict() for p in profiles]}
        wanted = any(p.link.shaped for p in profiles)
        why = shaping.availability() if wanted else "every gateway has link=none"
        if why is None:
            cleanup()
            self.links = shaping.LinkFleet(self.tag)
            self.gateway_links = self.links.create(profiles)
            lossy = [g.profile.index for g in self.gateway_links if not g.loss_emulated]
            self.emulation = (
                f"shaped: one network namespace per gateway on {shaping.SUBNET}; rate by tc tbf, "
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

    # -- bring-up ------------------------------------------------------------------
    def start(self) -> None:
        engine = self.cfg["engine"]
        timeout = float(engine["startup_timeout"])
        fleet = engine["name"] == "fleet"
        self.port = free_port()
        if fleet:
            self.setup_links()
            self.certs = None if engine.get("insecure") else self.provision_certs()
            self.transport = (
                f"TLS (CA {self.certs / certs.CA_CRT}) and SuperNode authentication (registered node keys)"
                if self.certs else "INSECURE: no TLS and no SuperNode authentication (engine.insecure=true)")
        else:
            self.transport = "no network: Flower's simulation engine runs the gateways inside the SuperLink"
            self.emulation = "simulated: link and device profiles give the simulated clock (sim_s)"
            profiles = gateway_profiles(self.cfg)
            (self.run_dir / "links.json").write_text(json.dumps(
                {"emulation": self.emulation, "gateways": [p.as_dict() for p in profiles]}, indent=2))
        sl = self.spawn("superlink", self.superlink_argv())
        wait_port(self.port, sl, timeout, "flower-superlink", self.logs / "superlink.log")
        if fleet:
            n = int(self.cfg["fleet"]["gateways"])
            if self.certs is not None:
                try:
                    certs.register([certs.gateway_pub(self.certs, i) for i in range(n)], f"127.0.0.1:{self.port}",
                                   self.certs / certs.CA_CRT, env=self.env, timeout=timeout)
                except certs.CertsError as err:
                    raise LaunchError(f"registering the gateways' node keys failed: {err}") from None
            if self.links is not None:
                self.links.start_relays(self.port)
            for i in range(n):
                superlink = f"127.0.0.1:{self.port}"
                if self.gateway_links:
                    superlink = f"{shaping.SERVER_ADDRESS}:{self.gateway_links[i].relay_port}"
                argv = self.gateway_argv(i, superlink)
                self.spawn(f"supernode-{i}", self.gateway_links[i].wrap(argv) if self.gateway_links else argv)
        self.write_connection()

    # -- TLS and node authentication (engine=fleet) ------------------------------------
    def provision_certs(self) -> Path:
        """``engine.certs``, checked, or a fresh CA, SuperLink certificate and node keys in
        ``<run>/certs``; the certificate must name every address the SuperNodes dial."""
        n = int(self.cfg["fleet"]["gateways"])
        dialled = ["127.0.0.1"] + ([shaping.SERVER_ADDRESS] if self.gateway_links else [])
        given = self.cfg["engine"].get("certs")
        where = Path(str(given)).expanduser().resolve() if given else self.run_dir / "certs"
        try:
            if not given:
                certs.create(where, sans=[shaping.SERVER_ADDRESS], gateways=n)
            certs.check_dir(where, n, dialled)
        except certs.CertsError as err:
            raise LaunchError(f"engine.certs: {err}" if given else str(err)) from None
        return where

    def superlink_argv(self) -> list[str]:
        argv = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.cfg["engine"]["name"] == "fleet":  # registered node keys and nodes survive a restart
            (self.run_dir / "state").mkdir(parents=True, exist_ok=True)
            argv += ["--database", str(self.run_dir / "state" / "superlink.db")]
        if self.certs is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.certs / certs.CA_CRT),
                     "--ssl-certfile", str(self.certs / certs.SERVER_CRT),
                     "--ssl-keyfile", str(self.certs / certs.SERVER_KEY), "--enable-supernode-auth"]
        if self.cfg["engine"]["name"] == "sim":
            argv.append("--simulation")
        return argv

    def gateway_argv(self, i: int, superlink: str) -> list[str]:
        """Gateway i as the fleet starts it: ``iiotfl gateway``, the compose gateways' entrypoint
        (clients/gateway.py), which checks its inputs and runs and restarts flower-supernode.
        Its link is already shaped by :class:`shaping.LinkFleet` with the same ``apply_link``."""
        n = int(self.cfg["fleet"]["gateways"])
        if self.profiles is None:
            self.profiles = gateway_profiles(self.cfg)
        crash = self.cfg["fleet"].get("crash") or {}
        argv = [str(BIN / "iiotfl"), "gateway", "--superlink", superlink, "--partition-id", str(i),
                "--num-partitions", str(n), "--clientappio-port", str(free_port()),
                "--node-config", f"torch-threads={self.profiles[i].device.torch_threads}"]
        if crash.get("round") and i in crash.get("gateways", []):
            argv += ["--node-config", f"crash-round={int(crash['round'])}"]
        poison = self.cfg["fleet"].get("poison") or {}
        if poison.get("kind", "none") != "none" and i in poison.get("gateways", []):
            argv += ["--node-config", f'poison="{poison["kind"]}" poison-factor={float(poison["factor"])}']
        if self.certs is None:
            return argv + ["--insecure"]
        return argv + ["--ca", str(self.certs / certs.CA_CRT), "--key", str(certs.gateway_key(self.certs, i))]

    def supernode_argv(self, i: int, superlink: str) -> list[str]:
        """The flower-supernode command gateway i's ``iiotfl gateway`` runs."""
        from iiotfl.clients import gateway

        return gateway.supernode_argv(gateway.parser().parse_args(self.gateway_argv(i, superlink)[2:]))

    def superlink_lost(self) -> bool:
        """Whether the SuperLink died under the run (its process ended)."""
        superlink = self.procs.get("superlink")
        return superlink is not None and superlink.poll() is not None

    def restart_superlink(self) -> None:
        """The SuperLink died: end the ServerApp side it ran (``flwr run``, flwr-serverapp and the
        SuperExec that started it; the gateways stay) and start it again on the same port and
        state database. Gateways reconnect by themselves (``iiotfl gateway`` retries)."""
        client = self.procs.get("serverapp")
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        for pid in self.run_processes(lambda a: b"flwr-serverapp" in a or (b"flower-superexec" in a and b"serverapp" in a)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sl = self.spawn("superlink", self.superlink_argv())
        wait_port(self.port, sl, float(self.cfg["engine"]["startup_timeout"]), "flower-superlink",
                  self.logs / "superlink.log")

    def write_connection(self) -> None:
        conn = certs.flwr_connection(f"127.0.0.1:{self.port}", self.certs / certs.CA_CRT if self.certs else None)
        engine = self.cfg["engine"]
        if engine["name"] == "sim":
            backend: dict[str, Any] = {"client-resources": {"num-cpus": int(engine["client_cpus"]), "num-gpus": 0.0}}
            if engine.get("num_cpus"):
                backend["init-args"] = {"num-cpus": int(engine["num_cpus"])}
            conn["options"] = {"num-supernodes": int(self.cfg["fleet"]["gateways"]), "backend": backend}
        config = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        (self.home / "config.toml").write_text(tomli_w.dumps(config))

    # -- the run -------------------------------------------------------------------
    def submit(self) -> subprocess.Popen:
        log = self.logs / "serverapp.log"
        self.submitted_at = log.stat().st_size if log.exists() else 0
        run_config = self.run_dir / "run_config.toml"
        run_config.write_text(tomli_w.dumps(to_run_config(self.cfg, self.run_dir)))
        return self.spawn(
            "serverapp", [str(BIN / "flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config), "--stream"]
        )

    def run_id(self) -> int | None:
        text = (self.logs / "serverapp.log").read_text(errors="replace")
        found = re.findall(r"Successfully started run (\d+)", text)  # the last: a reused run dir keeps old logs
        return int(found[-1]) if found else None

    def run_info(self, run_id: int) -> dict[str, Any]:
        out = subprocess.run(
            [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            capture_output=True, text=True, env=self.env, timeout=60,
        )
        try:
            return json.loads(out.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            return {}

    def run_processes(self, match: Callable[[bytes], bool]) -> list[int]:
        """PIDs of this run's processes whose command line ``match`` accepts."""
        pids = []
        for pid in processes_with_env("IIOTFL_RUN", self.tag):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if match(argv):
                pids.append(pid)
        return pids

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
            why = said[-1] if said else supernode_failure(text)  # iiotfl gateway's own verdict first
            if why:
                return f"{name.replace('supernode-', 'gateway ')}: {why}; see logs/{name}.log"
        return None



def last_checkpoint(run_dir: Path) -> int:
    """The last round whose global model was checkpointed (0: none)."""
    found = [int(m.group(1)) for f in (run_dir / "checkpoints").glob("round-*.ckpt")
             if (m := re.fullmatch(r"round-(\d+)\.ckpt", f.name))]
    return max(found, default=0)


def resume_refusal(cfg: dict[str, Any], resumed: int) -> str | None:
    """Why a run whose SuperLink died cannot go on from its last checkpoint (None: it can)."""
    if cfg["engine"]["name"] == "sim":
        return "engine=sim runs its virtual gateways inside the SuperLink; they died with it"
    if resumed >= int(cfg["fleet"].get("resume_attempts", 0) or 0):
        return f"fleet.resume_attempts={cfg['fleet'].get('resume_attempts', 0)} restarts already used"
    privacy = (cfg.get("privacy") or {}).get("name", "none")
    if privacy != "none":
        return (f"privacy={privacy} keeps its accountant in the run's state, which a new run would start "
                "from zero (under-counting epsilon); start the run again")
    if cfg["strategy"]["name"] == "secagg":
        return "strategy=secagg runs Flower's legacy workflow, which cannot start at a later round"
    return None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """A progress bar with the current metric on a terminal, one line per round otherwise."""

    def __init__(self, total: int, metric: str | None = None) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.total, self.metric = total, metric
        self.bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(
                TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metric]}"), TimeElapsedColumn(), console=self.console,
            )
            self.task = self.bar.add_task("rounds", total=total, metric="starting the fleet")
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        sv = row["server"]
        key = self.metric or next((k for k in sv if k != "num-examples"), None)
        metric = f"{key} {sv[key]:.3f}" if key in sv else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=row["round"], metric=metric)
        else:
            label = "initial model" if row["round"] == 0 else f"round {row['round']}/{self.total}"
            self.console.print(f"{label}: {metric} ({row['time']:.1f}s)", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def launch(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run one federated job in ``run_dir``; return what ``launch.json`` records."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet, engine = cfg["fleet"], cfg["engine"]
    info: dict[str, Any] = {"engine": engine["name"], "gateways": int(fleet["gateways"]), "status": "starting"}
    started = time.time()
    if cfg["strategy"]["name"] == "he" and not cfg["strategy"].get("keys"):
        # local fleet: a fresh key set per run (a real deployment provisions with `iiotfl keys`)
        from iiotfl.strategies.he import KeySet

        KeySet.generate().write(run_dir / "he-keys")
        cfg["strategy"]["keys"] = str(run_dir / "he-keys")
    from iiotfl.tasks import task_class

    progress = Progress(int(fleet["rounds"]), task_class(cfg["task"]["name"]).primary_metric)
    deadline = started + float(engine["startup_timeout"]) + float(fleet["round_timeout"]) * (int(fleet["rounds"]) + 1)
    try:
        if engine["name"] == "remote":  # an existing SuperLink with real gateways (server/remote.py)
            from iiotfl.server.remote import RemoteDeployment as kind
        else:
            kind = Deployment
        with _sigterm_as_interrupt(), kind(cfg, run_dir) as dep:
            info["logs"] = {"superlink": "logs/superlink.log", "serverapp": "logs/serverapp.log"}
            dep.start()
            info["links"] = dep.emulation
            info["transport"] = dep.transport
            if dep.certs is not None:
                info["certs"] = str(dep.certs)
            outages = Outages(cfg, dep.gateway_links, run_dir / "outages.jsonl")
            client = dep.submit()
            info["status"] = "running"
            seen, server_seen, server_gone = 0, False, 0.0
            while True:
                if dep.superlink_lost():
                    code = dep.procs["superlink"].returncode if "superlink" in dep.procs else None
                    why = f"flower-superlink exited with code {code}" if code is not None else "the SuperLink went away"
                    done = last_checkpoint(run_dir)
                    refusal = resume_refusal(cfg, len(info.get("resumed", [])))
                    if refusal:
                        raise LaunchError(f"{why}; not resumed: {refusal}; see logs/superlink.log")
                    # like a container restart policy: the SuperLink comes back on its state
                    # database, the gateways reconnect, the job goes on from the last checkpoint
                    dep.restart_superlink()
                    cfg["_resume_round"] = done
                    info.setdefault("resumed", []).append(
                        {"after_round": done, "superlink_exit": code, "at_s": round(time.time() - started, 1)})
                    deadline += float(engine["startup_timeout"]) + float(fleet["round_timeout"]) * 2
                    server_seen, server_gone = False, 0.0
                    client = dep.submit()
                    continue
                if client.poll() is not None:
                    time.sleep(1.0)  # `flwr run` also ends when the SuperLink dies: look once more
                    if not dep.superlink_lost():
                        break
                    continue
                if dep.serverapp_alive():
                    server_seen, server_gone = True, 0.0
                elif server_seen and not (run_dir / "metrics.json").exists():
                    server_gone = server_gone or time.time()
                    if time.time() - server_gone > 5.0:
                        raise LaunchError("the ServerApp process died before the run finished; see logs/serverapp.log")
                rows = load_rounds(run_dir)
                for row in rows[seen:]:
                    progress.update(row)
                seen = len(rows)
                outages.tick(rows)
                refused = dep.supernode_refused()
                if refused:
                    raise LaunchError(refused)
                if time.time() > deadline:
                    raise LaunchError("the run took longer than startup_timeout + (rounds + 1) x round_timeout")
                time.sleep(0.5)
            for row in load_rounds(run_dir)[seen:]:
                progress.update(row)
            outages.restore()
            run_id = dep.run_id()
            run = dep.run_info(run_id) if run_id is not None else {}
            info.update(run_id=run_id, flower_status=run.get("status"), traffic=run.get("network-traffic", {}))
            if run.get("status") == "finished:completed" and (run_dir / "metrics.json").exists():
                info["status"] = "completed"
            else:
                dead = dep.dead_supernodes()
                info["status"] = "failed"
                info["error"] = (
                    f"Flower run ended with status {run.get('status', 'unknown')}"
                    + (f"; SuperNodes that died: {dead}" if dead else "")
                    + "; see logs/serverapp.log"
                )
    except KeyboardInterrupt:
        info.update(status="interrupted", error="stopped by the user (Ctrl-C / SIGTERM); processes torn down")
    except LaunchError as err:
        info.update(status="failed", error=str(err))
    finally:
        progress.close()
        info["wall_s"] = time.time() - started
        (run_dir / "launch.json").write_text(json.dumps(info, indent=2))
        write_report(run_dir)
    return info
