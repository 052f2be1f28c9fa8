"""Robust aggregation end to end: a real engine=sim run with one poisoned gateway."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.unit.test_robust import POISON, SCENARIO


def _final_rmse(tmp_path, name: str, *overrides: str) -> tuple[float, dict]:
    run_dir = tmp_path / name
    proc = run_cli("run", *SCENARIO, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["server"]["rmse"], rows[-1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_median_recovers_what_one_poisoned_gateway_costs_fedavg(tmp_path):
    clean, _ = _final_rmse(tmp_path, "clean")
    poisoned, last = _final_rmse(tmp_path, "poisoned", *POISON)
    robust, _ = _final_rmse(tmp_path, "median", "strategy=median", *POISON)
    print(f"final RMSE: clean FedAvg {clean:.2f}, poisoned FedAvg {poisoned:.2f}, poisoned median {robust:.2f}")
    poisoned_partitions = {c["partition"] for c in last["clients"] if c.get("poisoned")}
    assert poisoned_partitions == {2}  # the reply metrics name the poisoned gateway
    assert poisoned > 1.5 * clean
    assert abs(robust - clean) < abs(poisoned - robust)  # closer to the clean run than to poisoned FedAvg
    assert robust < 1.3 * clean  # and it recovers most of what the poisoned gateway cost
