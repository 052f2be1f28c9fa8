"""SuperLink restarts: the SuperLink dies mid-run (kill -9), the launcher starts it again on
its state database, the gateways reconnect by themselves and the job goes on from the
last checkpoint without losing completed rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from iiotfl.clients.processes import processes_with_env
from iiotfl.configs import compose
from iiotfl.server.launch import resume_refusal
from tests.conftest import IIOTFL, ROOT

SMALL = ["task.data.units_min=6", "task.data.units_max=8"]


def _superlink(run_dir: Path) -> int:
    for pid in processes_with_env("FLWR_HOME", str(run_dir / "flwr")):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"flower-superlink" in argv and str(run_dir / "state").encode() in argv:
            return pid
    raise AssertionError("no SuperLink with a state database in the run")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [
    ("fleet.gateways=2",),
    # masked aggregation: the resumed run sets up fresh run keys; a cohort of 3 of the 4 is enough
    ("strategy=mask", "fleet.gateways=4", "strategy.min_cohort=3"),
], ids=["fedavg", "mask"])
def test_superlink_killed_mid_run_is_restarted_and_the_run_resumes(tmp_path, scenario):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(IIOTFL), "run", *scenario, "fleet.rounds=3", *SMALL,
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 400
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:  # rounds 0, 1 done
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "round 1 did not finish in time"
        time.sleep(0.3)
    before = metrics.read_text().splitlines()
    os.kill(_superlink(run_dir), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["status"] == "completed"
    [event] = launch["resumed"]
    done = event["after_round"]
    assert done >= 1 and event["superlink_exit"] == -9
    rows = metrics.read_text().splitlines()
    assert rows[: done + 1] == before[: done + 1]  # completed rounds kept as they were
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2, 3]
    # the gateways came back over TLS with the keys registered in the state database; one whose
    # SuperNode lost its session rejoins only when the SuperLink expires it (~1 min), so the
    # resumed rounds go on with those connected
    assert all(json.loads(r)["aggregated"] >= 1 for r in rows[done + 1:])
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert any("resumed after round" in n for n in summary["notes"])
    if "strategy=mask" in scenario:  # keys set up in the first run and again in the resumed one
        log = (run_dir / "logs" / "serverapp.log").read_text()
        assert log.count("mask key set-up:") >= 2 and "unmasked the sum of" in log


def test_runs_that_cannot_resume_say_why():
    cfg = compose(["fleet.resume_attempts=1"])
    assert resume_refusal(cfg, 0) is None
    assert "restarts already used" in resume_refusal(cfg, 1)
    assert "under-counting epsilon" in resume_refusal(compose(["privacy=sample"]), 0)
    assert "died with it" in resume_refusal(compose(["engine=sim"]), 0)
    assert resume_refusal(compose(["engine=remote"]), 0) is None
    assert "legacy workflow" in resume_refusal(compose(["strategy=secagg"]), 0)
