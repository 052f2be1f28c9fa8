"""Membership-inference audit: it finds an overfit model's members; a DP model stays within its bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iiotfl.privacy.audit import attack_figures
from tests.conftest import run_cli

OVERFIT = ["engine=sim", "fleet.gateways=2", "fleet.rounds=3", "task.data.units_min=2", "task.data.units_max=3",
           "train.local_epochs=60", "train.lr=0.003"]


def test_attack_figures_on_known_scores():
    rng = np.random.default_rng(0)
    same = attack_figures(rng.normal(size=5000), rng.normal(size=5000), 1.0, 1e-5)
    apart = attack_figures(rng.normal(2.0, 1, 5000), rng.normal(size=5000), 1.0, 1e-5)
    assert abs(same["auc"] - 0.5) < 0.03 and same["at_fpr_1%"]["within_bound"]
    assert apart["auc"] > 0.9 and not apart["at_fpr_1%"]["within_bound"]  # separable beats what eps=1 allows


@pytest.mark.slow
def test_audit_finds_members_of_an_overfit_model_and_respects_dp(tmp_path):
    plain, private = tmp_path / "plain", tmp_path / "dp"
    for run_dir, extra in ((plain, []), (private, ["privacy=sample", "privacy.epsilon=1"])):
        proc = run_cli("run", *OVERFIT, *extra, f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = run_cli("audit", str(run_dir), "--refs", "2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a = json.loads((plain / "audit.json").read_text())
    b = json.loads((private / "audit.json").read_text())
    assert a["loss_threshold"]["auc"] > 0.6 and a["lira"]["auc"] > 0.6   # the attacks work
    assert b["epsilon"] == pytest.approx(1.0, rel=0.02)
    for attack in ("loss_threshold", "lira"):
        for fpr in ("at_fpr_1%", "at_fpr_0.1%"):
            assert b[attack][fpr]["within_bound"], (attack, fpr, b[attack][fpr])
    assert b["loss_threshold"]["auc"] < a["loss_threshold"]["auc"]
    assert "Membership-inference audit" in (private / "report.md").read_text()
