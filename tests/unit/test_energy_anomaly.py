"""Energy anomaly detection (tasks/energy_anomaly): data, fault labels, metrics, federated training.

The federated checks run FedAvg in-process (clients.training.train_local on every gateway,
weights averaged by example count) on the task's own data: the La Haute Borne SCADA (real,
from the openoa wheel) and the smart-meter generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iiotfl.clients.training import train_local
from iiotfl.configs import ConfigError, compose
from iiotfl.server.launch import validate
from iiotfl.tasks import get_task
from iiotfl.tasks.energy_anomaly import EnergyAnomaly, persistence_scores
from iiotfl.tasks.energy_anomaly.data import KINDS, EnergySeries, Normaliser, feature_sums, kind_code, window_ends
from iiotfl.tasks.energy_anomaly.faults import Event, apply
from iiotfl.tasks.energy_anomaly.metrics import detection_delay, f1_at, pr_auc
from iiotfl.tasks.energy_anomaly.scada import PIP_COMMAND, ScadaUnavailable, zip_path
from iiotfl.tasks.energy_anomaly.smart_meter import generate_site
from iiotfl.tasks.moments import combine

SCADA_KINDS = ("underperformance", "stuck", "drift", "derating")
METER_KINDS = ("spike", "level_shift", "stale", "drift")


def _has_scada() -> bool:
    try:
        zip_path()
    except ScadaUnavailable:
        return False
    return True


needs_scada = pytest.mark.skipif(not _has_scada(), reason=f"La Haute Borne zip not installed: {PIP_COMMAND}")


def _task(source: str, *overrides: str) -> EnergyAnomaly:
    cfg = compose(["task=energy_anomaly", f"task.data.source={source}", *overrides])
    return get_task(cfg["task"], cfg["seed"])


def _fedavg(task: EnergyAnomaly, gateways: int, rounds: int, stride: int = 1, lr: float = 0.001):
    """FedAvg in-process: fleet normalisation from summed feature_sums, local training, weighted mean."""
    torch.set_num_threads(1)
    train = [task.gateway_data(i)[0] for i in range(gateways)]
    norm = task.normaliser(combine([task.feature_sums(d) for d in train]))
    windows = [task.windows(d, norm) for d in train]
    windows = [(x[::stride], y[::stride]) for x, y in windows]
    model = task.build_model()
    for r in range(rounds):
        states, counts = [], []
        for i, (x, y) in enumerate(windows):
            local = task.build_model()
            local.load_state_dict(model.state_dict())
            train_local(local, x, task.target(y), epochs=1, batch_size=64, lr=lr, seed=100 * r + i,
                        loss_fn=task.loss())
            states.append(local.state_dict())
            counts.append(len(y))
        total = sum(counts)
        model.load_state_dict({k: sum(s[k] * (n / total) for s, n in zip(states, counts)) for k in states[0]})
    return model, norm


# -- data ---------------------------------------------------------------------------
def test_smart_meter_generator_is_deterministic_per_seed_and_site():
    a, b = generate_site(3, 7, 28, 28, 1), generate_site(3, 7, 28, 28, 1)
    for field in ("inputs", "target", "label", "event", "period", "step"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other = generate_site(3, 8, 28, 28, 1)
    assert not np.allclose(a.target, other.target)
    assert not np.allclose(a.target, generate_site(4, 7, 28, 28, 1).target)
    # training period fault-free, every kind injected and labelled in the evaluation period
    assert (a.label[a.period == 0] == 0).all() and (a.event[a.period == 0] == -1).all()
    assert {KINDS[c - 1] for c in np.unique(a.label[a.label > 0])} == set(METER_KINDS)
    assert np.isfinite(a.inputs).all() and np.isfinite(a.target).all()
    # any fleet size: a site of a 1000-gateway fleet, and the server's held-out sites spread over it
    far = generate_site(3, 999, 84, 28, 1)
    assert len(far) == 24 * 112
    task = _task("smart_meter")
    test = task.server_test_data(1000)
    assert test.n_sites == 16 and test.site.max() == 999


@needs_scada
def test_scada_loads_la_haute_borne_deterministically():
    from iiotfl.tasks.energy_anomaly.scada import STEPS, TURBINES, YEAR_2015, turbine_series

    a, b = turbine_series(0, 2, 4), turbine_series(0, 2, 4)
    for field in ("inputs", "target", "label", "event", "period"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert len(a) == STEPS == 105120 and (a.period == (np.arange(STEPS) >= YEAR_2015)).all()
    assert a.source == f"la_haute_borne:{TURBINES[2]}"
    # real data: power per unit of rated within [-0.02, 1.01], wind speed within [0, 30] m/s
    p, ws = a.target[a.period == 0], a.inputs[a.period == 0, 0]
    p, ws = p[np.isfinite(p)], ws[np.isfinite(ws)]
    assert -0.02 < p.min() and p.max() < 1.01 and 0 <= ws.min() and ws.max() < 30 and len(p) > 50_000
    # the data set's own availability flags, and every injected kind, in 2015 only
    assert (a.label == kind_code("availability")).sum() > 100
    injected = {KINDS[c - 1] for c in np.unique(a.label[a.event >= 0]) if c > 0}
    assert injected == set(SCADA_KINDS) and (a.event[a.period == 0] == -1).all()
    assert not np.array_equal(a.label, turbine_series(1, 2, 4).label)  # another seed, other faults
    train, val = EnergyAnomaly.gateway_data(_task("scada"), 2)
    assert (train.period == 0).all() and (train.label == 0).all() and len(val) == STEPS


def test_windows_never_span_gaps_or_sites():
    n = 10
    series = EnergySeries(
        site=np.array([0] * 6 + [1] * 4), step=np.array([0, 1, 2, 4, 5, 6, 0, 1, 2, 3]),
        inputs=np.arange(n, dtype=float)[:, None], target=np.arange(n, dtype=float),
        label=np.zeros(n, np.int8), event=np.full(n, -1, np.int32), period=np.zeros(n, np.int8),
        feature_names=("a",), target_name="y",
    )
    series.inputs[8, 0] = np.nan
    assert window_ends(series, 2).tolist() == [1, 2, 4, 5, 7]
    assert window_ends(series, 3).tolist() == [2, 5]


def test_fleet_normaliser_equals_the_pooled_statistics():
    parts = [generate_site(0, i, 14, 14, 0) for i in range(3)]
    norm = Normaliser.from_sums(combine([feature_sums(p) for p in parts]))
    pooled = np.column_stack([np.concatenate([p.inputs for p in parts]), np.concatenate([p.target for p in parts])])
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(norm.std[norm.std != 1.0], pooled.std(axis=0)[norm.std != 1.0], rtol=1e-6)
    assert feature_sums(parts[0]).shape == (1, 1 + 2 * (len(parts[0].feature_names) + 1))


def test_fault_operations():
    x = np.arange(10, dtype=float)
    for op, amount, want in [("scale", 0.5, [0, 1, 1.0, 1.5, 4]), ("cap", 2.5, [0, 1, 2, 2.5, 4]),
                             ("freeze", 0.0, [0, 1, 1, 1, 4]), ("ramp", 2.0, [0, 1, 2, 5, 4])]:
        y = x.copy()
        apply(y, Event("k", 2, 2, op, "c", amount))
        assert y[:5].tolist() == want, op


# -- metrics ------------------------------------------------------------------------
def test_pr_auc_f1_and_delay():
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.1])
    assert pr_auc(labels, scores) == pytest.approx((1.0 + 2 / 3) / 2)  # scikit-learn's average precision
    assert pr_auc(labels, np.ones(5)) == pytest.approx(0.4)  # a constant score: the prevalence
    f = f1_at(labels, scores, 0.75)
    assert f["precision"] == 0.5 and f["recall"] == 0.5 and f["f1"] == 0.5
    step = np.arange(8)
    label = np.array([0, 0, -1, 3, 3, 3, 0, 0])  # event 0 starts changing at step 3
    event = np.array([-1, -1, 0, 0, 0, 0, -1, -1])
    d = detection_delay(step, label, event, np.array([9, 0, 0, 0, 0, 5, 0, 0.0]), 1.0)
    assert d == {"detection_delay": 2.0, "events": 1.0, "events_detected": 1.0}
    missed = detection_delay(step, label, event, np.zeros(8), 1.0)
    assert missed["detection_delay"] == 3.0 and missed["events_detected"] == 0.0


# -- federated model against the trivial baselines ------------------------------------
@pytest.fixture(scope="module")
def meter_run():
    task = _task("smart_meter")
    model, norm = _fedavg(task, gateways=4, rounds=4)
    return task, model, norm, task.evaluate(model, task.server_test_data(4), norm)


@pytest.fixture(scope="module")
def scada_run():
    task = _task("scada")
    model, norm = _fedavg(task, gateways=4, rounds=2, stride=4, lr=0.003)
    return task, model, norm, task.evaluate(model, task.server_test_data(4), norm)


def _check_scores(metrics: dict, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        assert metrics[f"score_{kind}"] > 1.5 * metrics["score_normal"], (kind, metrics)


def test_every_meter_anomaly_kind_scores_above_normal(meter_run):
    _check_scores(meter_run[3], METER_KINDS)


def test_federated_meter_model_beats_persistence_and_constant(meter_run):
    m = meter_run[3]
    assert m["pr_auc"] > 0.7 and m["pr_auc"] > 2 * m["persistence_pr_auc"] and m["pr_auc"] > 3 * m["prevalence"], m
    assert m["f1"] > 0.6 and m["events_detected"] >= 0.9 and m["detection_delay"] < 12, m
    assert m["num-examples"] > 0 and set(m) >= {"pr_auc", "f1", "detection_delay", "num-examples"}


@needs_scada
def test_every_scada_fault_kind_scores_above_normal(scada_run):
    _check_scores(scada_run[3], SCADA_KINDS + ("availability",))


@needs_scada
def test_federated_scada_model_beats_persistence_and_constant(scada_run):
    task, model, norm, m = scada_run
    assert m["pr_auc"] > 0.5 and m["pr_auc"] > 4 * m["persistence_pr_auc"] and m["pr_auc"] > 4 * m["prevalence"], m
    assert m["f1"] > 0.45 and m["events_detected"] > 0.75, m
    # the persistence score itself: |P_t - P_{t-1}|, zero across gaps
    test = task.server_test_data(1)
    ends = window_ends(test, task.window)
    base = persistence_scores(test, ends)
    assert base.shape == ends.shape and (base >= 0).all()
    # ClientApp-side evaluation of one turbine works on its own validation split
    local = task.evaluate(model, task.gateway_data(0)[1], norm)
    assert 0 < local["pr_auc"] <= 1 and local["num-examples"] > 40_000


# -- config -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.window=0"], r"^config: task.window=0 is invalid; it must be an integer between 1 and 144"),
        (["task.data.source=tape"], r"^config: task.data.source='tape' is unknown; set task.data.source to one of"),
        (["task.threshold_quantile=1.5"], r"^config: task.threshold_quantile=1.5 is invalid"),
        (["task.data.source=smart_meter", "task.data.smart_meter.events_per_kind=3"],
         r"^config: task.data.smart_meter.test_days=28 is invalid; it must be an integer >= 42"),
        (["fleet.gateways=6"], r"^config: fleet.gateways=6 but task.data.source=scada has 4 turbines"),
        (["task.data.scada.zip=/nonexistent/la_haute_borne.zip"],
         r"^config: task.data.source=scada: La Haute Borne SCADA zip not found \(/nonexistent/la_haute_borne.zip\); "
         r"install it with `pip install --no-deps openoa==3.2`"),
    ],
)
def test_bad_values_are_one_line_config_errors(overrides, message):
    cfg = compose(["task=energy_anomaly", *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_smart_meter_config_is_valid_for_a_large_fleet():
    validate(compose(["task=energy_anomaly", "task.data.source=smart_meter", "fleet.gateways=1000", "engine=sim"]))


# End to end: the task=energy_anomaly points of tests/e2e/test_sweeps_e2e.py::test_real_2x2_sweep_records_refused_points_and_reports
# are this use case's real `iiotfl run engine=sim` runs, with its metric checks.
