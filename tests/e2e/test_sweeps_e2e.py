"""A real multirun sweep: every point a real engine=sim run; refused points recorded, the summary written."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.unit.test_sweeps import assert_png, table


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_2x2_sweep_records_refused_points_and_reports(tmp_path):
    """task=energy_anomaly,quality_control x strategy=fedavg,krum on 3 gateways: Krum needs
    2f+3 = 5 updates a round, so both krum points are refused by the config checks; the fedavg
    points are the two use cases' end-to-end runs, each scored with its own metric."""
    sweep = tmp_path / "sweep"
    proc = run_cli("run", "-m", "engine=sim", "fleet.gateways=3", "fleet.rounds=3",
                   "task=energy_anomaly,quality_control", "strategy=fedavg,krum",
                   f"hydra.sweep.dir={sweep}", timeout=840)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # non-zero: some points failed
    assert f"sweep report: {sweep / 'summary.md'} (4 runs, 2 failed)" in out
    md = (sweep / "summary.md").read_text()
    head, *rows = table(md)
    assert len(rows) == 4
    col = {name: i for i, name in enumerate(head)}
    assert [(r[col["task"]], r[col["strategy"]]) for r in rows] == [
        ("energy_anomaly", "fedavg"), ("energy_anomaly", "krum"),
        ("quality_control", "fedavg"), ("quality_control", "krum")]
    for r in (rows[0], rows[2]):
        assert r[col["status"]] == "completed" and r[col["ε"]] == "∞ (no DP)"
        assert float(r[col["final"]].strip("*")) > float(r[col["initial"]])  # higher is better for both
        assert float(r[col["bytes up / gw / round"]].replace(",", "")) > 0
    assert rows[0][col["metric"]] == "PR-AUC ↑"
    for r in (rows[1], rows[3]):
        assert r[col["status"]] == "**failed**" and r[col["final"]] == "-"
        assert "strategy=krum" in r[col["error"]] and "needs >= 2f+3 = 5 updates" in r[col["error"]]
    assert json.loads((sweep / "1" / "launch.json").read_text())["status"] == "failed"
    for task in ("energy_anomaly", "quality_control"):
        assert_png(sweep / f"sweep-{task}.png")
    assert (sweep / "0" / "report.md").is_file() and (sweep / "1" / "report.md").is_file()

    # each use case learned on La Haute Borne's turbines / the AI4I plants, beyond trivial baselines
    energy = json.loads((sweep / "0" / "metrics.json").read_text())
    assert energy["primary_metric"] == "pr_auc" and energy["higher_is_better"] is True
    final = energy["rounds"][-1]["server"]
    assert final["pr_auc"] > 0.5 and final["pr_auc"] > 4 * final["persistence_pr_auc"]
    quality = json.loads((sweep / "2" / "metrics.json").read_text())
    assert quality["task"] == "quality_control" and quality["primary_metric"] == "pr_auc_machine"
    final = quality["rounds"][-1]["server"]
    assert final["pr_auc_machine"] > 2 * final["prevalence_machine"]
