import numpy as np

from iiotfl.tasks.predictive_maintenance.generator import (
    _SENSITIVITY,
    SENSORS,
    generate_plant,
    health_index,
    plant_profile,
)


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate_plant(3, 1), generate_plant(3, 1)
    assert np.array_equal(a.sensors, b.sensors) and np.array_equal(a.rul, b.rul)
    c = generate_plant(4, 1)
    assert a.sensors.shape != c.sensors.shape or not np.allclose(a.sensors, c.sensors)


def test_rul_counts_down_by_one_per_cycle_and_is_capped():
    data = generate_plant(0, 0, rul_cap=125)
    for u in np.unique(data.unit):
        rul = data.rul[data.unit == u]
        cycles = data.cycle[data.unit == u]
        assert np.array_equal(cycles, np.arange(1, len(cycles) + 1))
        assert rul[-1] == 0
        assert rul.max() <= 125
        below = rul < 125
        assert np.all(np.diff(rul[below]) == -1), "RUL must drop by exactly one cycle per cycle"
        if len(rul) > 126:
            assert rul[0] == 125


def test_health_index_reaches_zero_at_failure():
    d0, b, life = 0.02, 1.5, 200.0
    a = np.log(2.0 - d0) / life**b
    h = health_index(np.array([0.0, life]), d0, a, b)
    assert abs(h[0] - (1 - d0)) < 1e-12 and abs(h[1]) < 1e-9


def test_sensors_track_wear():
    """Within one operating condition, degradation-sensitive sensors follow the true wear 1 - h."""
    data = generate_plant(0, 2, n_units=30)
    wear = data.extra["wear"]
    cond = np.round(data.settings[:, 0]).astype(int)
    values, counts = np.unique(cond, return_counts=True)
    mask = cond == values[counts.argmax()]
    x, w = data.sensors[mask], wear[mask]
    sign = np.sign(_SENSITIVITY[0])
    for i, name in enumerate(SENSORS):
        r = np.corrcoef(w, x[:, i])[0, 1]
        assert np.sign(r) == sign[i] and abs(r) > 0.1, f"{name} must drift with wear (r={r:.2f})"
    # all sensors together: a health indicator that tracks wear closely
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    assert np.corrcoef(w, (z * sign).sum(axis=1))[0, 1] > 0.8


def test_plants_differ():
    p0, p1 = plant_profile(0, 0), plant_profile(0, 1)
    assert p0 != p1
    a, b = generate_plant(0, 0), generate_plant(0, 1)
    life_a = np.bincount(a.unit)[1:].mean()
    life_b = np.bincount(b.unit)[1:].mean()
    assert abs(life_a - life_b) > 5 or not np.allclose(p0.regime, p1.regime, atol=0.05)
    # operating regimes differ: the share of rows in each condition
    share = lambda d: np.histogram(d.settings[:, 0], bins=[-1, 5, 15, 22, 30, 38, 45])[0] / len(d)  # noqa: E731
    assert np.abs(share(a) - share(b)).sum() > 0.1
