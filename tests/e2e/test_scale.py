"""Scale-out: the same config on an existing Ray cluster (engine.ray_address).

The cluster here is a one-machine Ray head on loopback started with ``ray start``; a
multi-machine cluster differs only in where its workers live (README, "Scale-out").
The 1000-gateway figures are measured in bench/scale.py, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from iiotfl.clients.processes import BIN, processes_with_env
from iiotfl.server.launch import free_port
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_sim_runs_its_virtual_gateways_on_an_existing_ray_cluster(tmp_path):
    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="iiotfl-ray-"))  # short: Ray's Unix socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"]
    started = subprocess.run(head, capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        run_dir = tmp_path / "run"
        proc = run_cli("run", "engine=sim", f"engine.ray_address=127.0.0.1:{port}", "fleet.gateways=3",
                       "fleet.rounds=1", "task.data.units_min=4", "task.data.units_max=6",
                       f"hydra.run.dir={run_dir}", timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert json.loads((run_dir / "launch.json").read_text())["status"] == "completed"
        # Flower's simulation driver joined this cluster (a driver log in the head's session) and
        # the ClientApps ran in the cluster's workers
        session = next(ray_tmp.glob("ray/session_2*"))
        assert list(session.glob("logs/python-core-driver-*.log")), "the run did not join the existing cluster"
        assert list(session.glob("logs/python-core-worker-*.log"))
    finally:
        # `ray stop` would end every Ray instance of this machine: end only this head's processes
        for _ in range(50):
            pids = processes_with_env("RAY_TMPDIR", str(ray_tmp))
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_address_is_checked():
    proc = run_cli("run", "engine=sim", "engine.ray_address=not an address", "fleet.rounds=1", timeout=120)
    assert proc.returncode == 2 and "engine.ray_address='not an address' is not host:port" in proc.stderr
    proc = run_cli("run", "engine=sim", "engine.ray_address=10.77.0.9:6379", "engine.num_cpus=2", timeout=120)
    assert proc.returncode == 2 and "engine.num_cpus cannot be set with engine.ray_address" in proc.stderr
