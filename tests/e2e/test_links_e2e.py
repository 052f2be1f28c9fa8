"""End to end on shaped links: codecs on a mixed cellular fleet, outages, cleanup after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from iiotfl.clients.processes import processes_with_env
from iiotfl.links import namespaces, shaping
from tests.conftest import IIOTFL, ROOT, run_cli
from tests.e2e.test_e2e import assert_nothing_left, mentioning, rounds_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shaping.availability() is not None, reason=f"no netns/tc here: {shaping.availability()}"),
]


def test_mixed_cellular_fleet_with_int8_matches_float32(fleet_run, tmp_path):
    reference, proc = fleet_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "int8"
    proc = run_cli("run", "fleet.gateways=3", "fleet.rounds=3", "codec=int8", "link=lte_m",
                   "+fleet.link_overrides.2=nb_iot", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, ref = rounds_of(run_dir), rounds_of(reference)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["aggregated"] == 3 for r in rows[1:])
    f32, int8 = ref[-1]["server"]["rmse"], rows[-1]["server"]["rmse"]
    assert abs(int8 - f32) <= 0.02 * f32, (int8, f32)
    # the update really was int8 on the wire, and it crossed the shaped links
    up = [g["bytes_up"] for r in rows[1:] for g in r["gateways"]]
    up_f32 = [g["bytes_up"] for r in ref[1:] for g in r["gateways"]]
    assert max(up) <= 0.27 * min(up_f32)
    classes = {g["partition"]: g["class"] for g in rows[1]["gateways"]}
    assert classes == {0: "lte_m/gateway", 1: "lte_m/gateway", 2: "nb_iot/gateway"}
    nb = [g for r in rows[1:] for g in r["gateways"] if g["partition"] == 2]
    assert all(g["wire_up"] >= g["bytes_up"] and g["wire_down"] >= g["bytes_down"] for g in nb)
    # NB-IoT at 80 kbit/s up cannot move its update faster than the rate allows
    assert all(g["round_s"] >= g["bytes_up"] * 8 / 80_000 for g in nb)
    report = (run_dir / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Links: shaped") and "nb_iot/gateway" in report
    assert_nothing_left(run_dir)


def test_gateway_down_for_a_round_is_excluded_then_rejoins(tmp_path):
    run_dir = tmp_path / "outage"
    deadline = 25
    proc = run_cli("run", "fleet.gateways=3", "fleet.rounds=4", f"fleet.round_timeout={deadline}",
                   "fleet.outage.mode=rounds", "fleet.outage.rounds=[2]", "fleet.outage.gateways=[1]",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rounds_of(run_dir)
    aggregated = {r["round"]: {g["partition"] for g in r["gateways"] if g["status"] == "aggregated"} for r in rows[1:]}
    assert aggregated[1] == {0, 1, 2}
    assert aggregated[2] == {0, 2} and rows[2]["late"] == [1]
    assert rows[2]["train_s"] < deadline + 2                  # the round did not hang on the missing gateway
    assert 1 in aggregated[3] | aggregated[4]                  # back after the outage
    events = [json.loads(x) for x in (run_dir / "outages.jsonl").read_text().splitlines()]
    assert [(e["gateway"], e["state"], e["round"]) for e in events] == [(1, "down", 2), (1, "up", 3)]
    assert "Late (excluded) gateways: round 2: [1]" in (run_dir / "report.md").read_text()
    assert_nothing_left(run_dir)


def test_run_killed_mid_round_is_cleaned_up(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(IIOTFL), "run", "fleet.gateways=2", "fleet.rounds=6", "link=lte_m", "device=sensor",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 240
    while not rounds_of(run_dir):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the run did not start in time"
        time.sleep(0.5)
    time.sleep(2)  # mid-round
    os.kill(proc.pid, signal.SIGKILL)  # no chance to tear anything down
    proc.wait(30)
    left = namespaces.project_objects()
    assert left["netns"] and left["cgroups"], "a killed run leaves its namespaces and cgroups"
    assert processes_with_env("FLWR_HOME", str(run_dir / "flwr")), "... and its processes"
    if (run_dir / "front" / "front.json").exists():
        assert mentioning(run_dir), "... and its front (nginx), whose title hides its environment"
    out = run_cli("cleanup")
    assert out.returncode == 0 and "removed" in out.stdout
    time.sleep(1)
    assert_nothing_left(run_dir)
