"""docs/plant-pilot.md's walk-through, run as written, then the same fleet through what a pilot meets.

The page's ``# file: NAME`` blocks are written to an empty directory and the bash lines of "Try it on
one machine" run there in order, as a pilot would type them (a line ending in ``&`` in the
background, then the test waits for the port it opens, as the pilot would wait for the prompt).
The fleet: a TLS SuperLink with node authentication, a simulated machine serving OPC UA, a Mosquitto
broker with a simulated press publishing, a CSV export; ``iiotfl gateway`` on OPC UA, a plain
``flower-supernode`` with ``iiotfl collect`` on MQTT, ``iiotfl gateway`` on the export. Then, on
the same fleet:

* a run of another task: every gateway's one-line mismatch, in ``iiotfl run``'s output and in the
  gateway's log;
* a run during which the broker and the MQTT gateway's collector are restarted: it completes, the
  collector reconnects by itself, and the store has every cycle of every unit it saw (nothing
  stored lost, nothing missed while it was away).
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from iiotfl.clients.processes import bin_env, spawn, stop_group
from iiotfl.clients.sources.store import read as read_store
from tests.brokers import have_mosquitto

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "plant-pilot.md"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500),
              pytest.mark.skipif(not have_mosquitto(), reason="Debian's mosquitto is not installed (make installs it)")]


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def page() -> tuple[dict[str, str], list[str]]:
    """The page's files (name -> content) and the walk-through's commands, in order."""
    text = PAGE.read_text()
    files = {}
    for _, body in _blocks(text):
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = rest
    walk = text.split("## Try it on one machine", 1)[1]
    commands = [line.strip() for lang, body in _blocks(walk) if lang == "bash" for line in body.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    return files, commands


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not _port_open(port):
        assert proc.poll() is None, f"{proc.args} ended: {log.read_text()[-2000:]}"
        assert time.time() < deadline, f"nothing listens on {port}: {log.read_text()[-2000:]}"
        time.sleep(0.3)


def _ports(line: str, cwd: Path) -> list[int]:
    ports = [int(p) for p in re.findall(r"(?:--port |--listen [\d.]+:)(\d+)", line)]
    conf = re.search(r"mosquitto -c (\S+)", line)
    if conf:
        ports += [int(p) for p in re.findall(r"^listener (\d+)", (cwd / conf[1]).read_text(), re.M)]
    return ports


def _cycles_contiguous(store: Path) -> tuple[int, list[str]]:
    """Records in the store, and the units whose stored cycles have a gap."""
    records = [r for _, _, r in read_store(store, "predictive_maintenance")]
    cycles: dict[str, set[int]] = {}
    for r in records:
        if "unit" in r and "cycle" in r:
            cycles.setdefault(r["unit"], set()).add(int(r["cycle"]))
    gaps = [u for u, c in cycles.items() if len(c) != max(c) - min(c) + 1]
    return len(records), gaps


def test_the_pilot_page_runs_as_written_and_its_fleet_survives_a_pilots_day(tmp_path, monkeypatch):
    files, commands = page()
    assert {"mosquitto.conf", "opcua.yaml", "mqtt.yaml", "export.yaml"} <= set(files)
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    env = {**bin_env(), "FLWR_HOME": str(tmp_path / "flwr"), "IIOTFL_PLANT_KEYS": str(tmp_path / "plant-keys"),
           "PWD": str(tmp_path)}
    background: dict[str, subprocess.Popen] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(n: int, line: str) -> subprocess.Popen:
        log = logs / f"{n:02d}-{line.split()[0]}-{line.split()[1] if len(line.split()) > 1 else ''}.log"
        proc = spawn(["bash", "-c", line], env, log=log, cwd=tmp_path)
        background[line] = proc
        for port in _ports(line, tmp_path):
            _wait_port(port, proc, log)
        return proc

    try:
        # -- the page, as written --------------------------------------------------------------------
        for n, line in enumerate(commands[:-1]):
            if line.endswith("&"):
                start(n, line[:-1].strip())
                time.sleep(1.0)
            else:
                done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=300)
                assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                if "--check" in line:  # the gateway says what it checked
                    assert "iiotfl gateway: data: maps every column task predictive_maintenance needs" in done.stderr
        run = commands[-1]
        assert run.startswith("iiotfl run ")
        done = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
        (run_dir,) = [p.parent for p in (tmp_path / "runs").glob("*/*/metrics.json")]
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert [r["aggregated"] for r in summary["rounds"][1:]] == [3, 3, 3]
        assert summary["evaluation"] == "gateways" and summary["gateway_evaluation"]["gateways"] == 3
        assert 0 < summary["final_metric"] < 200  # RMSE in cycles, on the gateways' own held-out units
        assert "final RMSE (lower is better): " in done.stdout and "on the gateways' own held-out data" in done.stdout
        report = (run_dir / "report.md").read_text()
        assert "- evaluation: the gateways' own held-out data (no server-side test set)" in report
        ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
        assert sum("final evaluation" in r["form"] for r in ledger) == 3  # what left each plant for it

        # -- a run of a task the gateways' data is not: one line, on both sides ---------------------------
        base = [t for t in shlex.split(run) if not t.startswith(("fleet.rounds=", "task.data.source="))]
        wrong = subprocess.run([*base, "fleet.rounds=1", "task=quality_control", "task.data.source=csv",
                                f"hydra.run.dir={tmp_path / 'wrong'}"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
        said = "offers task 'predictive_maintenance', the run's task is 'quality_control'; run task=predictive_"
        assert wrong.returncode != 0 and said in wrong.stdout + wrong.stderr
        assert said in "".join(p.read_text(errors="replace") for p in logs.iterdir() if "iiotfl-gateway" in p.name)

        # -- the broker and the MQTT gateway's collector restart mid-run --------------------------------------
        out = tmp_path / "restarts"
        job = subprocess.Popen([*base, "fleet.rounds=2", "task.data.source=csv", f"hydra.run.dir={out}"], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert job.poll() is None, job.stdout.read()[-3000:] if job.stdout else ""
            assert time.time() < deadline
            time.sleep(0.5)
        broker = next(line for line in background if line.startswith("mosquitto"))
        collector = next(line for line in background if line.startswith("iiotfl collect"))
        for line in (broker, collector):
            stop_group(background[line], grace=15)
        time.sleep(3.0)  # the press goes on publishing into nothing, then into the broker's queue
        start(90, broker)
        start(91, collector)
        out_text, _ = job.communicate(timeout=900)
        assert job.returncode == 0, out_text[-4000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["aggregated"] for r in rows[1:]] == [3, 3]
        status = json.loads((tmp_path / "mqtt-store.status.json").read_text())
        assert status["connected"] and status["malformed"] == {}
        stored, gaps = _cycles_contiguous(tmp_path / "mqtt-store.sqlite")
        assert stored > 500 and gaps == []
        examples = {r["round"]: {c["partition"]: c["num-examples"] for c in r["clients"]} for r in rows[1:]}
        assert examples[2][1] >= examples[1][1]  # gateway 1 trains on all it has stored, more as it arrives
    finally:
        for proc in reversed(list(background.values())):
            stop_group(proc, grace=15)
