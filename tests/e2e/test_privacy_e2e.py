"""Differential privacy end to end on Flower's simulation engine: budgets, ledger, accounting check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.e2e.test_e2e import rounds_of

pytestmark = pytest.mark.slow


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]


def test_sample_level_dp_budget_stops_one_plant_and_the_run_goes_on(tmp_path):
    run_dir = tmp_path / "sample"
    proc = run_cli("run", "engine=sim", "fleet.gateways=3", "fleet.rounds=3", "privacy=sample",
                   "privacy.epsilon=null", "privacy.noise_multiplier=0.8", "privacy.budget=50",
                   "+privacy.device_budgets.2=2.6", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, ledger = rounds_of(run_dir), _ledger(run_dir)
    stats = [r for r in ledger if r["round"] == 0 and not r["form"].startswith("final evaluation")]
    assert len(stats) == 3 and all(r["form"].startswith("feature statistics") for r in stats)
    # each plant's evaluation of the final model (gateway 2's budget is spent, it still scores the model)
    assert sorted(r["gateway"] for r in ledger if r["form"].startswith("final evaluation")) == [0, 1, 2]
    ledger = [r for r in ledger if r["round"] > 0]
    assert len(ledger) == 3 * 3  # one row per device per round
    mine = [r for r in ledger if r["gateway"] == 2]
    assert [r["status"] for r in mine] == ["sent", "budget-spent", "budget-spent"]
    assert all(r["epsilon"] <= 2.6 and r["bytes_sent"] == 0 and r["form"] == "nothing" for r in mine[1:])
    others = [r for r in ledger if r["gateway"] != 2]
    assert all(r["status"] == "sent" for r in others)
    for g in (0, 1):  # epsilon grows round by round on the devices that keep training
        eps = [r["epsilon"] for r in others if r["gateway"] == g]
        assert eps == sorted(eps) and eps[0] < eps[-1]
    assert all(r["aggregated"] == 2 for r in rows[2:])
    checks = json.loads((run_dir / "metrics.json").read_text())["privacy"]["checks"]
    assert len(checks) == 3 and all(c["ok"] for c in checks)
    report = (run_dir / "report.md").read_text()
    assert "round 2: budget spent" in report and "DP-SGD noised on the device" in report


def test_client_level_dp_ends_cleanly_at_its_budget(tmp_path):
    run_dir = tmp_path / "client"
    proc = run_cli("run", "engine=sim", "fleet.gateways=3", "fleet.rounds=6", "privacy=client",
                   "privacy.noise_multiplier=2.0", "privacy.budget=2.0", "privacy.clipping_norm=2.0",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rounds_of(run_dir)
    done = len(rows) - 1
    assert done == 3  # epsilon after 3 rounds 1.83, after 4 it would be 2.24
    eps = [r["privacy"]["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[-1] <= 2.0
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["privacy"]["checks"][0]["ok"] and f"allows {done} of 6 rounds" in summary["notes"][0]
    assert json.loads((run_dir / "launch.json").read_text())["status"] == "completed"
