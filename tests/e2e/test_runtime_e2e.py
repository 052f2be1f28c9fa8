"""The warm ClientApp runtime on the real fleet (TLS, node keys, the front, shaped ethernet): a task
killed mid-training (SIGKILL of its process, ``fleet.crash.kind=kill``) fails only that gateway's
reply; its SuperNode lives on and trains again the next round."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_a_task_killed_mid_training_fails_only_its_reply_and_the_gateway_trains_next_round(tmp_path):
    run_dir = tmp_path / "killed"
    proc = run_cli("run", "fleet.gateways=2", "fleet.rounds=3", "fleet.crash.round=2", "fleet.crash.gateways=[1]",
                   "fleet.crash.kind=kill", "fleet.round_timeout=150", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    status = {r["round"]: {g["partition"]: g["status"] for g in r["gateways"]} for r in rounds[1:]}
    assert status[1] == {0: "aggregated", 1: "aggregated"}
    assert status[2][0] == "aggregated" and status[2][1] in ("error", "late"), status[2]
    assert status[3] == {0: "aggregated", 1: "aggregated"}, "the gateway whose task was killed must train again"
    log = (run_dir / "logs" / "supernode-1.log").read_text()
    assert "iiotfl warm runtime: ready" in log  # the tasks ran as forks of the warm runtime ...
    assert log.count("SuperNode ID:") == 1  # ... and the SuperNode itself was never restarted
    links = json.loads((run_dir / "links.json").read_text())
    assert links["emulation"].startswith("shaped")
    report = (run_dir / "report.md").read_text()
    assert "TLS" in report and "front" in report
