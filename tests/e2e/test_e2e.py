"""End to end: real flower-superlink / flower-supernode processes, and Flower's simulation engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from iiotfl.clients.processes import processes_with_env
from iiotfl.links import namespaces
from iiotfl.links.profiles import link_profile
from iiotfl.security.artefacts import load_model_state
from iiotfl.tasks.predictive_maintenance.model import RulCNN
from tests.conftest import IIOTFL, ROOT, run_cli

pytestmark = pytest.mark.slow


def rounds_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def mentioning(run_dir: Path) -> list[int]:
    """Live processes whose command line names the run directory (the front's nginx, whose title hides its
    environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run_dir).encode() in (entry / "cmdline").read_bytes() \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_nothing_left(run_dir: Path) -> None:
    assert processes_with_env("FLWR_HOME", str(run_dir / "flwr")) == [], "processes of the run are still alive"
    assert mentioning(run_dir) == [], "processes naming the run directory (the front) are still alive"
    left = namespaces.project_objects()
    assert not any(left.values()), f"namespaces, links or cgroups left behind: {left}"


def test_fleet_run_completes_and_learns(fleet_run):
    run_dir, proc = fleet_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rounds_of(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    initial, final = rows[0]["server"]["rmse"], rows[-1]["server"]["rmse"]
    assert final < 0.4 * initial and final < 25.0, (initial, final)
    assert all(len(r["clients"]) == 3 for r in rows[1:])
    assert {c["partition"] for c in rows[1]["clients"]} == {0, 1, 2}


def test_fleet_run_used_real_processes(fleet_run):
    run_dir, _ = fleet_run
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["engine"] == "fleet" and launch["flower_status"] == "finished:completed"
    for i in range(3):
        assert "Starting Flower SuperNode" in (run_dir / "logs" / f"supernode-{i}.log").read_text()
    model_bytes = json.loads((run_dir / "metrics.json").read_text())["model_bytes"]
    # every round moves the model to and from three gateways through the SuperLink
    assert launch["traffic"]["total-bytes"] > 2 * 3 * 3 * model_bytes


def test_fleet_run_directory_has_all_artefacts(fleet_run):
    run_dir, _ = fleet_run
    for name in ("config.yaml", "metrics.json", "metrics.jsonl", "model.ckpt", "report.md", "metrics.png", "launch.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = RulCNN()
    model.load_state_dict(load_model_state(run_dir))
    assert (run_dir / "model.ckpt").read_bytes()[:6] == b"IIOTFL"  # encrypted and signed, not a plain torch file
    assert (run_dir / "checkpoints" / "round-3.ckpt").is_file()
    report = (run_dir / "report.md").read_text()
    assert "status: **completed**" in report and "| 3 |" in report


def test_fleet_run_leaves_no_process(fleet_run):
    run_dir, _ = fleet_run
    assert_nothing_left(run_dir)


def test_sim_engine_with_more_virtual_gateways(tmp_path):
    run_dir = tmp_path / "sim"
    ray_dirs = set(Path("/tmp").glob("iiotfl-*"))
    proc = run_cli("run", "engine=sim", "fleet.gateways=8", "fleet.rounds=2", "fleet.link_mix={lte_m:0.5,nb_iot:0.5}",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rounds_of(run_dir)
    assert len(rows) == 3 and all(len(r["clients"]) == 8 for r in rows[1:])
    assert rows[-1]["server"]["rmse"] < 0.4 * rows[0]["server"]["rmse"]
    assert json.loads((run_dir / "launch.json").read_text())["engine"] == "sim"
    # the estimated energy per class (tests/unit/test_energy.py): in metrics.json and in the report
    energy = json.loads((run_dir / "metrics.json").read_text())["energy_per_class"]
    assert set(energy) == {"lte_m/gateway", "nb_iot/gateway"} and energy["nb_iot/gateway"]["updates"] == 8
    nb, link = [g for r in rows[1:] for g in r["gateways"] if g["class"] == "nb_iot/gateway"], link_profile("nb_iot")
    assert energy["nb_iot/gateway"]["radio_j"] == pytest.approx(sum(
        (g["bytes_up"] * link.tx_uj_per_byte + g["bytes_down"] * link.rx_uj_per_byte) / 1e6 + link.connect_mj / 1e3
        for g in nb))
    full = (run_dir / "report.md").read_text()
    report = full.split("### Energy per round, estimated")[1]
    assert "| nb_iot/gateway | 4 | 8 | application |" in report and "| lte_m/gateway | 4 | 8 |" in report
    # each plant scored the final model on its own held-out data; the run's metric stays the server's
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["evaluation"] == "server" and summary["final_metric"] == rows[-1]["server"]["rmse"]
    plants = summary["gateway_evaluation"]
    assert [g["partition"] for g in plants["per_gateway"]] == list(range(8)) and plants["failed"] == []
    assert all(g["rmse"] > 0 and g["num-examples"] > 0 for g in plants["per_gateway"])
    spread = plants["spread"]
    assert spread["gateways"] == 8 and spread["worst"]["value"] == max(g["rmse"] for g in plants["per_gateway"])
    assert spread["best"]["value"] <= spread["median"]["value"] <= spread["worst"]["value"]
    assert "## Per plant" in full and "| nb_iot/gateway |" in full.split("## Per plant")[1].split("## Rounds")[0]
    assert_nothing_left(run_dir)
    assert set(Path("/tmp").glob("iiotfl-*")) == ray_dirs, "Ray's temporary directory was left behind"


def _start_and_wait_for_round(run_dir: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(IIOTFL), "run", "fleet.gateways=2", "fleet.rounds=6", f"hydra.run.dir={run_dir}", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 240
    while not any(r["round"] >= 1 for r in rounds_of(run_dir)):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no round finished in time"
        time.sleep(0.5)
    return proc


def test_ctrl_c_tears_the_fleet_down(tmp_path):
    run_dir = tmp_path / "interrupted"
    proc = _start_and_wait_for_round(run_dir)
    assert processes_with_env("FLWR_HOME", str(run_dir / "flwr")), "the fleet should be running"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert json.loads((run_dir / "launch.json").read_text())["status"] == "interrupted"
    assert "interrupted" in (run_dir / "report.md").read_text()
    assert_nothing_left(run_dir)


def test_server_side_crash_ends_the_run_cleanly(tmp_path):
    run_dir = tmp_path / "crashed"
    proc = _start_and_wait_for_round(run_dir)
    server = [
        pid for pid in processes_with_env("FLWR_HOME", str(run_dir / "flwr"))
        if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(server) == 1
    os.kill(server[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, out
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["status"] == "failed" and "ServerApp" in launch["error"]
    assert len(rounds_of(run_dir)) >= 2  # what was done before the crash is kept
    assert_nothing_left(run_dir)
