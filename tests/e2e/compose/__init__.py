"""Driving docker-compose.yml under a real Docker engine, for the compose tests and bench/compose.py.

:func:`engine` finds the engine (``docker/engine start`` where none answers; CI starts one in
``.ci/run``), :func:`build_images` runs ``docker/build-images`` (cached by content), and
:class:`ComposeFleet` is one compose project as an operator runs it: provision certificates with
the ``certs`` service, ``up``, watch ``metrics.jsonl`` in the ``results`` volume, copy the run
directory out, ``down -v``. Every project has its own name and certificate directory, so tests
never touch an operator's ``./certs`` or volumes, and :meth:`ComposeFleet.leftovers` lists what
of the project is still there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = ROOT / "docker-compose.yml"
FAST_LINKS = Path(__file__).with_name("fast-links.yml")  # every gateway on lte_m
LABEL = "com.docker.compose.project"


class EngineMissing(RuntimeError):
    """No Docker engine or docker-compose here."""


def engine() -> tuple[dict[str, str], bool]:
    """The environment that reaches a running engine (DOCKER_HOST), and whether it was started here
    (``docker/engine start``, where none answered): then :func:`stop_engine` stops it."""
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        raise EngineMissing("docker and docker-compose are not installed (docker/engine install)")
    env = dict(os.environ)
    if subprocess.run(["docker", "info"], env=env, capture_output=True).returncode == 0:
        return env, False
    proc = subprocess.run([str(ROOT / "docker" / "engine"), "start"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise EngineMissing(proc.stderr.strip() or "docker/engine start failed")
    for line in proc.stdout.splitlines():
        if line.startswith("export DOCKER_HOST="):
            env["DOCKER_HOST"] = line.split("=", 1)[1]
    return env, True


def stop_engine() -> None:
    """Stop the engine :func:`engine` started (docker/engine stops only one it started)."""
    subprocess.run([str(ROOT / "docker" / "engine"), "stop"], capture_output=True, timeout=120)


def build_images(env: dict[str, str]) -> float:
    """docker/build-images (wheelhouse, local base image, server and gateway images); its wall time."""
    started = time.perf_counter()
    proc = subprocess.run([str(ROOT / "docker" / "build-images")], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"docker/build-images failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - started


def docker(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class ComposeFleet:
    """One compose project of docker-compose.yml (plus ``extra`` override files)."""

    def __init__(self, env: dict[str, str], workdir: Path, overrides: str = "", extra: tuple[Path, ...] = ()):
        self.name = f"iiotfl-t{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.env = {**env, "IIOTFL_CERTS": str(workdir / "certs"), "IIOTFL_RESULTS": str(workdir / "results"),
                    "IIOTFL_OVERRIDES": overrides}
        self.files = [COMPOSE_FILE, *extra]

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["docker-compose", "-p", self.name]
        for f in self.files:
            argv += ["-f", str(f)]
        proc = subprocess.run([*argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)}: {proc.stderr[-2000:]}")
        return proc

    # -- the operator's steps -----------------------------------------------------------------
    def provision(self) -> None:
        self.compose("--profile", "setup", "run", "--rm", "certs")

    def up(self) -> float:
        """``up -d``; the time it took to return."""
        started = time.perf_counter()
        self.compose("up", "-d", "--no-build")
        return time.perf_counter() - started

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        if not cid:
            raise RuntimeError(f"no container for service {service}")
        return cid

    def wait_server(self, timeout: float) -> int:
        """Wait for the ``server`` service (the submitted job) to end; its exit code."""
        out = docker(self.env, "wait", self.container("server"), timeout=timeout)
        return int(out.strip())

    def rows(self) -> list[dict]:
        """The rows of metrics.jsonl in the results volume so far (one run per project)."""
        proc = subprocess.run(["docker", "exec", self.container("server"), "sh", "-c",
                               "cat /results/runs/*/*/metrics.jsonl 2>/dev/null"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        rows = []
        for line in proc.stdout.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
        return rows

    def wait_rows(self, done, timeout: float, poll: float = 1.0) -> list[dict]:
        """Poll metrics.jsonl until ``done(rows)``; fails with the server's log on timeout or exit."""
        deadline = time.time() + timeout
        while True:
            rows = self.rows() if self.running("server") else []
            if rows and done(rows):
                return rows
            if not self.running("server"):
                raise AssertionError(f"the server ended early:\n{self.logs('server')[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"timed out; rows so far {[r['round'] for r in rows]}:\n"
                                     f"{self.logs('server')[-3000:]}")
            time.sleep(poll)

    def running(self, service: str) -> bool:
        out = docker(self.env, "inspect", "-f", "{{.State.Running}}", self.container(service))
        return out.strip() == "true"

    def logs(self, service: str, since: str | None = None) -> str:
        args = ["logs", *(["--since", since] if since else []), self.container(service)]
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def results(self) -> Path:
        """The operator's copy of the results volume (the ``results`` service); the one run directory."""
        self.compose("--profile", "tools", "run", "--rm", "results")
        (run,) = sorted(p for p in (self.workdir / "results").glob("*/*") if p.is_dir())
        return run

    def down(self) -> None:
        self.compose("--profile", "setup", "down", "-v", "--remove-orphans", "-t", "5", check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project still there."""
        found = {}
        for kind, cmd in (("containers", ["ps", "-aq"]), ("networks", ["network", "ls", "-q"]),
                          ("volumes", ["volume", "ls", "-q"])):
            found[kind] = docker(self.env, *cmd, "--filter", f"label={LABEL}={self.name}").split()
        return found


# Run inside a gateway's container: what a rogue gateway (its own certificates, root, NET_ADMIN) can reach.
PROBE = r"""
import json, socket, ssl, http.client
seen = {}
try:
    socket.getaddrinfo("superlink", 9093)
    seen["superlink_name"] = "resolves"
except OSError as err:
    seen["superlink_name"] = f"unresolved: {err}"
try:
    socket.create_connection((SUPERLINK_IP, 9093), 3).close()
    seen["superlink_port"] = "connected"
except OSError as err:
    seen["superlink_port"] = f"refused: {err}"
def post(path, cert):
    ctx = ssl.create_default_context(cafile="/certs/ca.crt")
    if cert:
        ctx.load_cert_chain("/certs/gateway.crt", "/certs/gateway.tls.key")
    conn = http.client.HTTPSConnection("front", 9443, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=b"\0", headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    except (OSError, ssl.SSLError) as err:
        return f"refused: {err}"
    finally:
        conn.close()
for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/pull-messages",
             "/v1/fleet/../control/start-run"):
    seen[path] = post(path, cert=True)
seen["no client certificate"] = post("/v1/fleet/ping", cert=False)
print(json.dumps(seen))
"""


def probe_from_gateway(fleet: "ComposeFleet", service: str = "gateway-0") -> dict:
    """What a gateway's container reaches of the SuperLink: directly (name, fixed address) and through the
    front (Control and Runtime paths with its own client certificate; any path without one)."""
    script = PROBE.replace("SUPERLINK_IP", repr(SUPERLINK_IP))
    out = docker(fleet.env, "exec", fleet.container(service), "python", "-c", script, timeout=60)
    return json.loads(out.strip().splitlines()[-1])


SUPERLINK_IP = "10.77.241.10"  # docker-compose.yml: the SuperLink's fixed address on the operator network


def aggregated(row: dict) -> list[int]:
    """The partitions whose updates a metrics.jsonl row aggregated."""
    return sorted(g["partition"] for g in row["gateways"] if g["status"] == "aggregated")


def restart_scenario(env: dict[str, str], workdir: Path) -> dict:
    """One compose run, all gateways on LTE-M, 6 rounds: after round 1 gateway-2's container is killed
    (SIGKILL: the plant's box loses power) and, once a round completed without it, started again; once
    it is back in a round, the SuperLink's process is killed (a crash: the restart policy applies).
    Returns what happened; ``down -v`` runs whatever happens, and ``leftovers`` says what it left."""
    fleet = ComposeFleet(env, workdir, overrides="fleet.rounds=6 fleet.round_timeout=240", extra=(FAST_LINKS,))
    seen: dict = {}
    try:
        fleet.provision()
        fleet.up()
        rows = fleet.wait_rows(lambda rows: rows[-1]["round"] >= 1, timeout=600)
        gateway = fleet.container("gateway-2")
        docker(fleet.env, "kill", gateway)
        killed, seen["killed_after"] = time.time(), rows[-1]["round"]
        seen["without"] = fleet.wait_rows(
            lambda rows: any(r["round"] > seen["killed_after"] and 2 not in aggregated(r) for r in rows), timeout=400)
        seen["round_without_s"] = time.time() - killed
        docker(fleet.env, "start", gateway)
        started = time.time()
        seen["back"] = fleet.wait_rows(
            lambda rows: rows[-1]["round"] > seen["killed_after"] + 1 and 2 in aggregated(rows[-1]), timeout=400)
        seen["rejoin_s"] = time.time() - started
        seen["gateway_log"] = fleet.logs("gateway-2")
        if seen["back"][-1]["round"] >= 6:
            raise AssertionError("the run ended before the SuperLink could be crashed; raise fleet.rounds")
        seen["before_crash"] = fleet.rows()
        superlink = fleet.container("superlink")
        os.kill(int(docker(fleet.env, "inspect", "-f", "{{.State.Pid}}", superlink)), signal.SIGKILL)
        crashed = time.time()
        seen["exit"] = fleet.wait_server(timeout=900)
        seen["crash_to_end_s"] = time.time() - crashed
        seen["server_log"] = fleet.logs("server")
        seen["superlink_restarts"] = int(docker(fleet.env, "inspect", "-f", "{{.RestartCount}}", superlink))
        seen["run"] = fleet.results()
    finally:
        fleet.down()
        seen["leftovers"] = fleet.leftovers()
    return seen
