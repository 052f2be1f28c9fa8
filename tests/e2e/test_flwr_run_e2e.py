"""Plain ``flwr run .`` of the Flower App against a local SuperLink, as any Flower user would run it:
the installed ``iiotfl`` package serves the FAB's components (``iiotfl.server.app:app`` and
``iiotfl.clients.app:app``), the apps compose the configs' defaults and apply the flat run-config keys."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import tomli_w

from iiotfl.clients.processes import BIN, bin_env, spawn, stop_group
from iiotfl.server.launch.superlink import APP_DIR, CONNECTION, free_port, superlink_argv, wait_port, write_connection

pytestmark = pytest.mark.slow


def test_flwr_run_dot_trains_with_the_defaults(tmp_path):
    home, out = tmp_path / "flwr", tmp_path / "out"
    home.mkdir()
    env = {**bin_env(), "FLWR_HOME": str(home)}
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn(superlink_argv(port, certs_dir=None), env, log=tmp_path / "superlink.log"))
        wait_port(port, procs[0], 60, "flower-superlink", tmp_path / "superlink.log")
        for i in range(4):  # the default fleet: fleet.gateways=4, all connected before round 1
            procs.append(spawn([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                "--host", "127.0.0.1", "--port", str(free_port()),
                                "--node-config", f"partition-id={i} num-partitions=4"],
                               env, log=tmp_path / f"supernode-{i}.log"))
        write_connection(home, {"address": f"127.0.0.1:{port}", "insecure": True})
        run_config = tmp_path / "run_config.toml"
        run_config.write_text(tomli_w.dumps({"num-server-rounds": 1, "output-dir": str(out)}))
        done = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config),
                               "--stream"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        deadline = time.time() + 60
        while not (out / "metrics.json").exists() and time.time() < deadline:
            time.sleep(1)
        assert (out / "metrics.json").exists(), "the run wrote no metrics.json; flwr run said:\n" + done.stdout[-3000:]
        summary = json.loads((out / "metrics.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [0, 1]  # num-server-rounds=1 reached fleet.rounds
        assert summary["rounds"][1]["aggregated"] == 4
        assert summary["task"] == "predictive_maintenance" and summary["gateways_connected"] == 4
    finally:
        for proc in reversed(procs):
            stop_group(proc, grace=15)
