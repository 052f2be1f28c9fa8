"""Unlike plants end to end (engine=sim, quality control with strongly skewed plants: label and feature skew 3):
server momentum beats FedAvg on the same data, and each plant's fine-tuned model, which stays on its gateway,
scores its plant better than the global one. One FedAvg run (with personalisation) is shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

SKEWED = ["engine=sim", "task=quality_control", "fleet.rounds=5", "task.plants.label_skew=3",
          "task.plants.feature_skew=3"]


def _run(run_dir: Path, *overrides: str) -> dict:
    proc = run_cli("run", *SKEWED, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("unlike") / "fedavg"
    return run_dir, _run(run_dir, "strategy=fedavg", "fleet.personalise_epochs=2")


def test_server_momentum_beats_fedavg_on_strongly_skewed_plants(fedavg, tmp_path):
    _, base = fedavg
    momentum = _run(tmp_path / "fedavgm", "strategy=fedavgm", "strategy.server_lr=2", "strategy.server_momentum=0.3")
    assert momentum["evaluation"] == base["evaluation"] == "server"
    assert momentum["final_metric"] > base["final_metric"] + 0.02  # PR-AUC, same data, same rounds
    worst = momentum["gateway_evaluation"]["spread"]["worst"]["value"]
    assert worst > base["gateway_evaluation"]["spread"]["worst"]["value"]  # the worst plant gains too


def test_each_plants_fine_tuned_model_beats_the_global_one_on_its_data_and_stays_on_the_gateway(fedavg):
    run_dir, base = fedavg
    per = base["gateway_evaluation"]["per_gateway"]
    assert len(per) == 4
    key = "personal-" + base["primary_metric"]
    better = [g for g in per if g[key] > g[base["primary_metric"]]]
    assert len(better) >= 3, per
    personal = base["gateway_evaluation"]["spread_personal"]
    assert personal["worst"]["value"] > base["gateway_evaluation"]["spread"]["worst"]["value"]
    # nothing of the personalised model left the plants: the ledger's final-evaluation rows carry metrics only
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    final = [r for r in ledger if str(r.get("form", "")).startswith("final evaluation")]
    assert len(final) == 4 and all("stays on the gateway" in r["form"] and r["bytes_sent"] < 2000 for r in final)
    report = (run_dir / "report.md").read_text().split("## Per plant")[1]
    assert "PR-AUC machine, fine-tuned" in report and "Each plant's model fine-tuned on its own data" in report
