"""A plant pilot's path, end to end: a TLS SuperLink with node authentication, real gateways
started with ``iiotfl gateway`` on their own CSV export directories, and the job submitted
with ``iiotfl run engine=remote`` (what docker-compose.yml's ``server`` service runs).

* a gateway whose key was never registered stops with the register command;
* a file added to a gateway's directory after round 1 is trained on in round 2;
* the SuperLink killed after round 1 and started again on its state database: the gateways
  reconnect and the job resumes from round 1's checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from iiotfl.clients.processes import BIN
from iiotfl.security import certs
from iiotfl.server.launch import free_port, wait_port
from iiotfl.tasks.predictive_maintenance.generator import generate_plant
from iiotfl.tasks.predictive_maintenance.loader import save_csv
from tests.conftest import IIOTFL

pytestmark = pytest.mark.slow
SETTINGS = "[altitude,mach,tra]"


def _export(plant, directory, name):
    directory.mkdir(parents=True, exist_ok=True)
    save_csv(plant, directory / name)


def test_pilot_gateways_join_a_remote_tls_superlink_and_read_their_growing_exports(tmp_path):
    d = tmp_path / "certs"
    assert subprocess.run([str(IIOTFL), "certs", str(d), "--gateways", "3"], capture_output=True).returncode == 0
    # not activated, as CI runs it: the SuperLink must still find flower-superexec
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    port = free_port()
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name, argv):
        with (logs / f"{name}.log").open("wb") as fh:
            procs.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        return procs[-1]

    try:
        sl = start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(d / "ca.crt"),
                                 "--ssl-certfile", str(d / "superlink.crt"), "--ssl-keyfile", str(d / "superlink.key"),
                                 "--enable-supernode-auth", "--database", str(tmp_path / "state.db"),
                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                 "--port", str(port)])
        wait_port(port, sl, 120, "flower-superlink", logs / "superlink.log")
        certs.register([certs.gateway_pub(d, i) for i in (0, 1)], f"127.0.0.1:{port}", d / "ca.crt", env=env)

        plants = {i: generate_plant(3, i, n_units=12) for i in (0, 1)}
        data = {i: tmp_path / f"plant-{i}" for i in (0, 1)}
        later, first = plants[0].split_units(0.5, 0)  # plant 0 exports half its units now, half later
        _export(first, data[0], "day-1.csv")
        _export(plants[1], data[1], "day-1.csv")

        gateways = {}
        for i in (0, 1, 2):
            argv = [str(IIOTFL), "gateway", "--superlink", f"127.0.0.1:{port}", "--ca", str(d / "ca.crt"),
                    "--key", str(certs.gateway_key(d, i)), "--partition-id", str(i), "--num-partitions", "2",
                    "--clientappio-port", str(free_port())]
            if i < 2:
                argv += ["--data", str(data[i])]
            gateways[i] = start(f"gateway-{i}", argv)
        # gateway 2's key was never registered: it stops, saying what to run
        assert gateways[2].wait(timeout=120) == 2
        text = (logs / "gateway-2.log").read_text()
        assert "error: the SuperLink refused this node key: it is not registered" in text
        assert "--register" in text

        run_dir = tmp_path / "run"
        job = subprocess.Popen(
            [str(IIOTFL), "run", "engine=remote", f"engine.superlink=127.0.0.1:{port}", f"engine.ca={d / 'ca.crt'}",
             "fleet.gateways=2", "fleet.rounds=2", "task.data.source=csv", f"task.data.csv.settings={SETTINGS}",
             f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 600
        while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.5)
        _export(later, data[0], "day-2.csv")  # the plant's next export lands after round 1
        # the SuperLink's machine goes down (its ServerApp with it) and comes back on its state
        # database: the gateways reconnect, `iiotfl run` resumes the job after round 1
        os.killpg(sl.pid, 9)
        sl.wait()
        sl = start("superlink-restarted", sl.args)
        wait_port(port, sl, 120, "flower-superlink", logs / "superlink-restarted.log")
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["aggregated"] for r in rows[1:]] == [2, 2]
        examples = {r["round"]: {c["partition"]: c["num-examples"] for c in r["clients"]} for r in rows[1:]}
        assert examples[2][0] > examples[1][0] and examples[2][1] == examples[1][1]
        launch = json.loads((run_dir / "launch.json").read_text())
        assert launch["status"] == "completed" and launch["transport"].startswith("TLS")
        assert [e["after_round"] for e in launch["resumed"]] == [1]
        assert "remote SuperLink" in (run_dir / "report.md").read_text()
    finally:
        for p in procs:  # a reaped process's pid may belong to someone else by now
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        _kill_all_mentioning(str(tmp_path))  # SuperNodes run in sessions of their own


def _kill_all_mentioning(text: str) -> None:
    """SIGKILL every process whose command line names ``text`` (this test's directory)."""
    from pathlib import Path

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), 9)
        except (OSError, ValueError):
            pass
