"""Privacy accounting, DP-SGD on a device, and refusal of bad privacy settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iiotfl.configs import ConfigError, compose
from iiotfl.privacy.accounting import (
    DeviceAccountant,
    accounting_check,
    check,
    merged,
    noise_for_target,
    recompute,
    steps_per_round,
)
from iiotfl.privacy.ledger import LATE, STATUS, Ledger, load, released_noise
from iiotfl.server.launch import validate
from iiotfl.strategies import wire


def test_device_epsilon_grows_with_rounds_and_matches_dp_accounting():
    q, steps = steps_per_round(2400, 64, 1)
    sigma = noise_for_target(3.0, 1e-5, q, 8 * steps)
    acc = DeviceAccountant(1e-5)
    eps = []
    for _ in range(8):
        acc.history.append((sigma, q, steps))
        eps.append(acc.epsilon())
        result = check(eps[-1], acc.history, 1e-5)
        assert result["ok"] and abs(result["rdp"] - eps[-1]) <= 0.02 * eps[-1]
        assert result["pld"] <= result["rdp"]  # PLD is the tighter analysis
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(3.0, rel=0.01)  # the target is spent over exactly the run


def test_check_fails_when_the_reported_epsilon_is_wrong():
    history = [(1.0, 0.02, 100)]
    right = recompute(history, 1e-5)["rdp"]
    assert check(right, history, 1e-5)["ok"]
    assert not check(right * 0.9, history, 1e-5)["ok"]


def test_history_summed_per_noise_and_rate_has_the_same_epsilon():
    rounds = [(1.1, 0.05, 20), (1.1, 0.05, 20), (0.9, 0.1, 10), (1.1, 0.05, 20)]
    assert merged(rounds) == [(1.1, 0.05, 60), (0.9, 0.1, 10)]
    per_round = recompute(rounds, 1e-5)
    assert recompute(merged(rounds), 1e-5)["rdp"] == pytest.approx(per_round["rdp"], rel=1e-9)
    assert DeviceAccountant(1e-5, rounds).epsilon() == pytest.approx(per_round["rdp"], rel=0.02)


def _dp_metrics(eps: float, steps: int, history: list[tuple[float, float, int]], rounds: int = 4) -> dict:
    """A gateway's dp-* reply metrics; its history padded to ``rounds`` entries as clients/app.py sends it."""
    padded = history + [(0.0, 0.0, 0)] * (rounds - len(history))
    return {wire.DP_SIGMA: 1.1, wire.DP_CLIP: 1.0, wire.DP_Q: 0.05, wire.DP_STEPS: steps, wire.DP_EPSILON: eps,
            wire.DP_DELTA: 1e-5, wire.DP_BUDGET_LEFT: 9.0, wire.DP_HISTORY_SIGMA: [h[0] for h in padded],
            wire.DP_HISTORY_Q: [h[1] for h in padded], wire.DP_HISTORY_STEPS: [h[2] for h in padded]}


def test_ledger_records_what_left_each_device_whatever_became_of_its_reply(tmp_path):
    cfg = compose(["privacy=sample"])
    ledger = Ledger(tmp_path / "ledger.jsonl", cfg)
    eps = recompute([(1.1, 0.05, 40)], 1e-5)["rdp"]
    gateways = [{"partition": 0, "status": "aggregated", "bytes_up": 100, "metrics": _dp_metrics(eps, 20, [(1.1, 0.05, 40)])},
                {"partition": 1, "status": "extra", "bytes_up": 90, "metrics": _dp_metrics(eps, 20, [(1.1, 0.05, 40)])},
                {"partition": 2, "status": "late"},
                {"partition": 3, "status": "budget-spent", "bytes_up": 0,
                 "metrics": {**_dp_metrics(eps, 0, [(1.1, 0.05, 40)]), wire.DP_STOPPED: 1}}]
    ledger.record({"round": 2, "gateways": gateways}, None, None)
    rows = {r["gateway"]: r for r in load(ledger.path)}
    assert [rows[g]["status"] for g in range(4)] == ["sent", STATUS["extra"], LATE, "budget-spent"]
    assert [rows[g]["bytes_sent"] for g in range(4)] == [100, 90, None, 0]
    assert [rows[g]["steps"] for g in range(4)] == [20, 20, None, 0]
    assert rows[1]["form"] == rows[0]["form"] != "nothing" and rows[2]["form"] == "unknown"
    assert rows[1]["dp_history"] == [[1.1, 0.05, 40]] and rows[2]["dp_history"] is None  # padding dropped
    result = accounting_check(cfg, load(ledger.path), [])
    assert [c["ok"] for c in result["checks"]] == [True, True, True]  # the late gateway reported nothing yet


def test_an_epsilon_without_the_history_behind_it_fails_the_check(tmp_path):
    cfg = compose(["privacy=sample"])
    ledger = Ledger(tmp_path / "ledger.jsonl", cfg)
    metrics = {k: v for k, v in _dp_metrics(1.5, 20, [(1.1, 0.05, 20)]).items() if "history" not in k}
    ledger.record({"round": 1, "gateways": [{"partition": 0, "status": "aggregated", "metrics": metrics}]}, None, None)
    (result,) = accounting_check(cfg, load(ledger.path), [])["checks"]
    assert not result["ok"] and result["mismatched_rounds"] == [1] and result["rdp"] == 0.0


def test_a_round_released_an_aggregate_only_if_it_aggregated_and_accounted_noise():
    released = {"round": 3, "aggregated": 4, "skipped": False, "privacy": {"epsilon": 1.0, "noise_multiplier": 1.2}}
    assert released_noise(released) == 1.2
    assert released_noise({**released, "skipped": True}) is None
    assert released_noise({**released, "aggregated": 0}) is None
    assert released_noise({**released, "privacy": {"epsilon": 1.0}}) is None  # Flower composed nothing


def test_recompute_at_tiny_noise_stays_small_and_consistent():
    # the PLD grid spans ~1/(2 sigma^2); at a fixed step this needed >13 GB and killed the ServerApp
    import resource

    again = recompute([(0.002, 1.0, 1)] * 3, 0.03)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20  # KiB: well under 4 GiB
    assert 0 < again["pld"] <= again["rdp"] and again["pld"] > 0.8 * again["rdp"]


def test_budget_stops_before_it_is_exceeded():
    q, steps = steps_per_round(1000, 50, 1)
    acc = DeviceAccountant(1e-4)
    rounds = 0
    while not acc.would_exceed(2.0, 1.0, q, steps):
        acc.history.append((1.0, q, steps))
        rounds += 1
    assert 0 < rounds < 50 and acc.epsilon() <= 2.0 < acc.epsilon([(1.0, q, steps)])


def test_client_level_epsilon_from_flower_matches_dp_accounting():
    from iiotfl.strategies.client_dp import _epsilon, noise_multiplier, rounds_within_budget

    cfg = compose(["privacy=client", "privacy.epsilon=3", "fleet.rounds=6"])
    sigma = noise_multiplier(cfg)
    eps = [_epsilon(cfg, sigma, r) for r in range(1, 7)]
    assert all(b > a for a, b in zip(eps, eps[1:])) and eps[-1] == pytest.approx(3.0, rel=0.01)
    delta = 1 / (10 * 4)
    for r, e in enumerate(eps, 1):
        assert check(e, [(sigma, 1.0, r)], delta)["ok"]
    capped = compose(["privacy=client", "privacy.noise_multiplier=2.0", "privacy.budget=1.5", "fleet.rounds=10"])
    allowed = rounds_within_budget(capped)
    assert 0 < allowed < 10
    assert _epsilon(capped, 2.0, allowed) <= 1.5 < _epsilon(capped, 2.0, allowed + 1)


def test_dp_sgd_trains_and_reports_what_the_accountant_needs():
    from iiotfl.clients.training import train_local_dp
    from iiotfl.tasks.predictive_maintenance.model import RulCNN

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 30, 14)).astype(np.float32)
    y = rng.random(300).astype(np.float32)
    model = RulCNN()
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_local_dp(model, x, y, epochs=2, batch_size=32, lr=1e-3, seed=0, noise_multiplier=1.0,
                           max_grad_norm=1.0)
    assert (stats["sample_rate"], stats["steps"]) == steps_per_round(300, 32, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(model.state_dict()) == set(RulCNN().state_dict())  # no Opacus wrapper left in the keys


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy=sample", "privacy.epsilon=0"], r"privacy.epsilon=0 is invalid"),
        (["privacy=sample", "privacy.epsilon=-1"], r"privacy.epsilon=-1 is invalid"),
        (["privacy=sample", "privacy.delta=1.0"], r"privacy.delta=1.0 is invalid; it must be in \(0, 1\)"),
        (["privacy=sample", "privacy.max_grad_norm=0"], r"privacy.max_grad_norm=0 is invalid"),
        (["privacy=client", "privacy.clipping_norm=-2"], r"privacy.clipping_norm=-2 is invalid"),
        (["privacy=client", "codec=int8"], r"use codec=none with it"),
        (["privacy=sample", "privacy.epsilon=null", "privacy.noise_multiplier=null"], r"privacy needs privacy.epsilon"),
        (["privacy.name=laplace"], r"pick privacy=<one of"),
        # SecAgg+'s gateways train in Flower's workflow, without DP-SGD: refused, never claimed in the report
        (["strategy=secagg", "fleet.gateways=3", "privacy=sample"],
         r"privacy=sample with strategy=secagg is refused: .* runs no DP-SGD"),
    ],
)
def test_bad_privacy_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_batchnorm_model_is_refused_under_dp_sgd(monkeypatch):
    from torch import nn

    from iiotfl.tasks.predictive_maintenance import PredictiveMaintenance

    monkeypatch.setattr(PredictiveMaintenance, "build_model",
                        lambda self: nn.Sequential(nn.Conv1d(14, 8, 3), nn.BatchNorm1d(8)))
    with pytest.raises(ConfigError, match="BatchNorm"):
        validate(compose(["privacy=sample"]))
    validate(compose(["privacy=client"]))  # client-level DP does not touch per-sample gradients
