"""How unlike the generated plants are: task.plants.label_skew, feature_skew and quantity_skew.

Each knob: the defaults give the data bit for bit as before the knobs existed (the benchmarks depend on
it), 0 makes the plants alike in that respect, a larger value spreads them further apart, it reaches the
generator from the config, and a bad value is refused with one line naming the key.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from iiotfl.configs import ConfigError, compose
from iiotfl.server.launch import validate
from iiotfl.tasks import get_task
from iiotfl.tasks import predictive_maintenance as pm_task
from iiotfl.tasks import quality_control as qc_task
from iiotfl.tasks.energy_anomaly.smart_meter import MIN_HISTORY_DAYS, generate_site, history_days
from iiotfl.tasks.heterogeneity import skewed_count, spread, tilt
from iiotfl.tasks.predictive_maintenance.generator import CONDITIONS, generate_plant, plant_profile
from iiotfl.tasks.quality_control.generator import AI4I, plant_operating_point
from iiotfl.tasks.quality_control.generator import generate_plant as qc_plant


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _task(*overrides: str):
    cfg = compose(list(overrides))
    return get_task(cfg["task"], int(cfg["seed"]))


def default_data_digests() -> dict[str, str]:
    """Digests of the data each task generates with its default config (three plants and the server's
    held-out data); a pure function of the generators and configs/task/*.yaml."""
    out = {}
    pm = _task("task=predictive_maintenance")
    parts = [pm.local_data(p) for p in range(3)] + [pm.server_test_data(4)]
    out["predictive_maintenance"] = _digest(*[a for d in parts for a in (d.unit, d.cycle, d.settings, d.sensors,
                                                                          d.rul)])
    qc = _task("task=quality_control")
    parts = [qc.local_data(p) for p in range(3)]
    test = qc.server_test_data(3)
    parts += [test, test.calibration]
    out["quality_control"] = _digest(*[a for d in parts for a in (d.features, d.labels, d.product_type, d.udi)])
    meter = _task("task=energy_anomaly", "task.data.source=smart_meter")
    parts = [meter.local_data(p) for p in range(3)]
    out["energy_anomaly.smart_meter"] = _digest(*[a for d in parts for a in (d.site, d.step, d.inputs, d.target,
                                                                               d.label, d.event, d.period)])
    return out


# The data of the defaults: default_data_digests() computed on main before task.plants' skews existed
# (commit 94d7507, numpy 2.4.6). The defaults must keep giving exactly these data.
DEFAULT_DIGESTS = {
    "predictive_maintenance": "87a9508f45085372",
    "quality_control": "e560f1c7a96ef047",
    "energy_anomaly.smart_meter": "823f400e321c6af4",
}


def test_the_defaults_give_the_data_as_before_bit_for_bit():
    assert default_data_digests() == DEFAULT_DIGESTS


# -- the helpers --------------------------------------------------------------------------------------------
def test_spread_tilt_and_count_keep_the_draw_at_1_and_the_centre_at_0():
    draw = 0.1 + 0.2  # not exactly representable: 1 must hand it back untouched
    assert spread(draw, 0.5, 1.0) is draw and spread(draw, 0.5, 0.0) == 0.5
    assert spread(200.0, 100.0, 2.0) == 300.0 and spread(200.0, 100.0, 2.0, log=True) == pytest.approx(400.0)
    assert spread(0.9, 0.5, 3.0, low=0.0, high=1.0) == 1.0
    shares = np.array([0.7, 0.2, 0.1])
    base = np.array([0.5, 0.3, 0.2])
    assert tilt(shares, base, 1.0) is shares and np.array_equal(tilt(shares, base, 0.0), base)
    sharper = tilt(shares, base, 2.0)
    assert sharper.sum() == pytest.approx(1.0) and sharper[0] > shares[0] and sharper[2] < shares[2]
    assert skewed_count(37, 20, 40, 1.0, floor=2) == 37 and skewed_count(37, 20, 40, 0.0, floor=2) == 30


def test_skewed_counts_keep_the_mean_and_spread_with_the_skew():
    draws = np.arange(4000, 8001, 10)
    cv = []
    for skew in (0.0, 0.5, 1.0, 2.0, 4.0):
        counts = np.array([skewed_count(int(d), 4000, 8000, skew, floor=10) for d in draws])
        assert counts.mean() == pytest.approx(6000, rel=0.01)
        assert counts.max() / counts.min() == pytest.approx(2.0**skew, rel=0.01)
        cv.append(counts.std() / counts.mean())
    assert cv[0] == 0.0 and all(a < b for a, b in zip(cv, cv[1:]))


# -- predictive maintenance -----------------------------------------------------------------------------
def _mean_life(data) -> float:
    """Mean run-to-failure length of a plant's units (cycles)."""
    return float(np.mean([data.cycle[data.unit == u].max() for u in np.unique(data.unit)]))


def _condition_shares(data) -> np.ndarray:
    cond = np.argmin(np.abs(data.settings[:, :1] - CONDITIONS[None, :, 0]), axis=1)
    return np.bincount(cond, minlength=len(CONDITIONS)) / len(cond)


def test_pm_each_knob_moves_only_its_own_characteristics():
    for plant in range(6):
        base = plant_profile(0, plant)
        label = plant_profile(0, plant, label_skew=0.0)
        feature = plant_profile(0, plant, feature_skew=0.0)
        quantity = plant_profile(0, plant, quantity_skew=0.0)
        assert (label.mean_life, label.wear_exponent, label.fan_share) == (
            plant_profile(0, 0, label_skew=0.0).mean_life, plant_profile(0, 0, label_skew=0.0).wear_exponent, 0.5)
        assert np.array_equal(label.regime, base.regime) and (label.n_units, label.noise_scale) == (
            base.n_units, base.noise_scale)
        assert np.allclose(feature.regime, 1 / 6) and feature.noise_scale == plant_profile(1, 9, feature_skew=0).noise_scale
        assert (feature.mean_life, feature.fan_share, feature.n_units) == (base.mean_life, base.fan_share, base.n_units)
        assert quantity.n_units == 30 and (quantity.mean_life, quantity.noise_scale) == (base.mean_life,
                                                                                          base.noise_scale)


def test_pm_label_skew_spreads_the_plants_machine_lives():
    cv = []
    for skew in (0.0, 1.0, 2.0):
        lives = [_mean_life(generate_plant(0, p, n_units=12, label_skew=skew)) for p in range(10)]
        cv.append(np.std(lives) / np.mean(lives))
    assert cv[0] < 0.06  # units' own scatter only (15 % / √12)
    assert cv[0] < cv[1] < cv[2], cv


def test_pm_feature_skew_spreads_the_plants_operating_regimes():
    spreads = []
    for skew in (0.0, 1.0, 2.0):
        shares = np.array([_condition_shares(generate_plant(0, p, n_units=8, feature_skew=skew)) for p in range(10)])
        if skew == 0.0:
            assert np.abs(shares - 1 / 6).max() < 0.05  # every plant flies the even mix, up to sampling
        spreads.append(shares.std(axis=0).mean())
    assert spreads[0] < spreads[1] < spreads[2], spreads


def test_pm_quantity_skew_makes_fleet_sizes_unequal():
    cv = []
    for skew in (0.0, 1.0, 3.0):
        units = np.array([plant_profile(0, p, quantity_skew=skew).n_units for p in range(60)])
        assert abs(units.mean() - 30) < 4  # the fleet's size stays about the same
        cv.append(units.std() / units.mean())
    assert cv[0] == 0.0 and cv[0] < cv[1] < cv[2], cv


def test_pm_knobs_reach_the_generator_from_the_config(monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return generate_plant(*args, **{**kw, "n_units": 2})

    monkeypatch.setattr(pm_task, "generate_plant", spy)
    task = _task("task.plants.label_skew=0.5", "task.plants.feature_skew=2", "task.plants.quantity_skew=0")
    task.local_data(0)
    task.server_test_data(2)
    assert calls[0]["label_skew"] == 0.5 and calls[0]["feature_skew"] == 2.0 and calls[0]["quantity_skew"] == 0.0
    assert all(c["label_skew"] == 0.5 and c["feature_skew"] == 2.0 for c in calls[1:]) and len(calls) == 3


# -- quality control ----------------------------------------------------------------------------------
def test_qc_skews_at_0_run_every_plant_at_the_base_point_and_1_changes_nothing():
    for plant in range(6):
        drawn = plant_operating_point(0, plant)
        alike = plant_operating_point(0, plant, label_skew=0.0, feature_skew=0.0)
        assert alike.mix == AI4I.mix and alike == AI4I
        assert plant_operating_point(0, plant, label_skew=1.0, feature_skew=1.0) == drawn
        assert plant_operating_point(0, plant, label_skew=0.0).air_mean == drawn.air_mean  # one knob, one aspect
        assert plant_operating_point(0, plant, feature_skew=0.0).mix == drawn.mix
        wide = plant_operating_point(0, plant, feature_skew=2.0)
        assert wide.air_mean - 300.0 == pytest.approx(2 * (drawn.air_mean - 300.0))


def test_qc_label_skew_spreads_the_plants_failure_modes():
    """The product mix sets the wear-related failure modes: all-L processes fail by overstrain 8 times as
    often as all-H ones (1.6 % against 0.2 %), tools wear out 2.3 times as often with H (0.78 % against 0.34 %)."""
    twf, osf = [], []
    for skew in (0.0, 1.0, 2.0):
        plants = [qc_plant(0, p, 10_000, label_skew=skew, feature_skew=0.0) for p in range(8)]
        if skew == 0.0:
            shares = np.array([np.bincount(d.product_type, minlength=3) / len(d) for d in plants])
            assert np.abs(shares - AI4I.mix).max() < 0.02  # the same mix everywhere, up to sampling
        twf.append(np.std([d.labels[:, 1].mean() for d in plants]))
        osf.append(np.std([d.labels[:, 4].mean() for d in plants]))
    assert twf[0] < twf[1] < twf[2] and osf[0] < osf[1] < osf[2], (twf, osf)
    assert osf[2] > 3 * osf[0]


def test_qc_feature_skew_spreads_the_plants_temperatures_and_torque():
    air, torque = [], []
    for skew in (0.0, 1.0, 2.0):
        plants = [qc_plant(0, p, 500, feature_skew=skew) for p in range(8)]
        air.append(np.std([d.features[:, 0].mean() for d in plants]))  # air temperature, K
        torque.append(np.std([d.features[:, 3].mean() for d in plants]))  # torque, Nm
    assert air[0] < 0.05 and torque[0] < 1.0  # the same set-points: sampling and rounding only
    assert air[0] < air[1] < air[2] and torque[0] < torque[1] < torque[2], (air, torque)


def test_qc_quantity_skew_makes_record_lengths_unequal():
    cv = []
    for skew in (0.0, 1.0, 3.0):
        rows = np.array([len(qc_plant(0, p, rows_min=40, rows_max=80, quantity_skew=skew)) for p in range(16)])
        cv.append(rows.std() / rows.mean())
    assert cv[0] == 0.0 and cv[0] < cv[1] < cv[2], cv


def test_qc_knobs_reach_the_generator_from_the_config(monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return qc_plant(*args[:2], 20, **{k: v for k, v in kw.items() if k not in ("rows_min", "rows_max")})

    monkeypatch.setattr(qc_task, "generate_plant", spy)
    task = _task("task=quality_control", "task.plants.label_skew=0", "task.plants.feature_skew=1.5",
                 "task.plants.quantity_skew=2")
    task.local_data(0)
    task.server_test_data(1)
    assert len(calls) == 3
    assert all(c["label_skew"] == 0.0 and c["feature_skew"] == 1.5 and c["quantity_skew"] == 2.0 for c in calls)


# -- energy anomaly (smart meters) ----------------------------------------------------------------------
def test_meter_feature_skew_spreads_the_sites_climates():
    spreads = []
    for skew in (0.0, 1.0, 2.0):
        temps = [generate_site(0, s, 28, 14, 0, feature_skew=skew).inputs[:, 0].mean() for s in range(8)]
        spreads.append(np.std(temps))
    assert spreads[0] < 1.5  # the same climate: each site's own weather only (six weeks of it)
    assert spreads[0] < spreads[1] < spreads[2], spreads


def test_meter_quantity_skew_shortens_some_histories_and_keeps_the_evaluation_period():
    assert all(history_days(0, s, 84, 0.0) == 84 for s in range(20))
    cv = []
    for skew in (0.5, 1.0, 3.0):
        days = np.array([history_days(0, s, 84, skew) for s in range(40)])
        assert days.min() >= MIN_HISTORY_DAYS and days.max() <= 84
        cv.append(days.std() / days.mean())
    assert cv[0] < cv[1] < cv[2], cv
    full = generate_site(0, 3, 28, 14, 1)
    short = generate_site(0, 3, 28, 14, 1, quantity_skew=2.0)
    kept = history_days(0, 3, 28, 2.0)
    assert kept < 28 and len(short.step) == 24 * (kept + 14) and short.step[0] == 24 * (28 - kept)
    test, test_short = full.period == 1, short.period == 1
    assert np.array_equal(full.inputs[test, 0], short.inputs[test_short, 0])  # the same weather
    assert np.array_equal(full.label[test], short.label[test_short]) and np.array_equal(full.event[test],
                                                                                        short.event[test_short])


def test_meter_knobs_reach_the_generator_from_the_config():
    task = _task("task=energy_anomaly", "task.data.source=smart_meter", "task.data.smart_meter.train_days=28",
                 "task.data.smart_meter.test_days=14", "task.plants.quantity_skew=2")
    kept = history_days(0, 3, 28, 2.0)
    assert len(task.local_data(3).step) == 24 * (kept + 14)


# -- bad values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.plants.label_skew=-1"], r"^config: task.plants.label_skew=-1 is invalid; it must be a number in \[0, 10\] .*e.g. task.plants.label_skew=1$"),
        (["task.plants.feature_skew=abc"], r"^config: task.plants.feature_skew='abc' is invalid; it must be a number"),
        (["task.plants.quantity_skew=nan"], r"^config: task.plants.quantity_skew=nan is invalid"),
        (["task.plants.quantity_skew=true"], r"^config: task.plants.quantity_skew=True is invalid"),
        (["task=quality_control", "task.plants.label_skew=11"], r"^config: task.plants.label_skew=11 is invalid"),
        (["task=quality_control", "task.plants.feature_skew=8"],
         r"^config: task.plants.torque_shift × task.plants.feature_skew = 4 × 8 is invalid; their product must be <= 30 \(lower task.plants.feature_skew to at most 7.5\)$"),
        (["task=energy_anomaly", "task.data.source=smart_meter", "task.plants.quantity_skew=-0.5"],
         r"^config: task.plants.quantity_skew=-0.5 is invalid"),
        (["task=energy_anomaly", "task.plants.feature_skew=2"],
         r"^config: task.data.source=scada cannot take task.plants.feature_skew=2 .*restore task.plants.feature_skew=1 task.plants.quantity_skew=0$"),
    ],
)
def test_bad_skews_are_refused_in_one_line_naming_the_key(overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", ["predictive_maintenance", "quality_control", "energy_anomaly"])
def test_every_task_documents_its_knobs_and_its_defaults_validate(task):
    cfg = compose([f"task={task}"] + (["task.data.source=smart_meter"] if task == "energy_anomaly" else []))
    validate(cfg)
    keys = set(cfg["task"]["plants"])
    knobs = {"label_skew", "feature_skew", "quantity_skew"}
    assert keys >= (knobs - {"label_skew"} if task == "energy_anomaly" else knobs)
