"""Normalisation statistics: exact at large offsets, the same merged in plaintext or in two passes."""

from __future__ import annotations

import numpy as np

from iiotfl.configs import compose
from iiotfl.tasks import get_task
from iiotfl.tasks.moments import centre_of, combine, moment_rows, recentre, variance


def _plants(offset: float, rng) -> list[np.ndarray]:
    return [offset + rng.normal(i, 1.0 + i / 2, (200 + 50 * i, 3)) for i in range(3)]


def test_the_deviation_survives_an_offset_of_1e10():
    rng = np.random.default_rng(0)
    plants = _plants(1e10, rng)
    merged = combine([moment_rows([x]) for x in plants])
    pooled = np.concatenate(plants) - 1e10
    assert np.allclose(np.sqrt(variance(merged)[0]), pooled.std(axis=0), rtol=1e-6)
    # the old form (sum of squares) loses it entirely at this offset
    naive = np.concatenate(plants)
    naive_var = (naive**2).sum(axis=0) / len(naive) - (naive.sum(axis=0) / len(naive)) ** 2
    assert not np.allclose(np.sqrt(np.maximum(naive_var, 0)), pooled.std(axis=0), rtol=1e-2)


def test_two_passes_about_the_fleet_centre_add_up_to_the_merged_statistics():
    """What encrypted aggregation can do (sums only) gives what the plaintext merge gives."""
    rng = np.random.default_rng(1)
    plants = _plants(5e6, rng)
    first = sum(moment_rows([x]) for x in plants)           # counts and sums add up
    centre = centre_of(first)
    second = recentre(sum(moment_rows([x], centre) for x in plants), centre)
    assert np.allclose(second, combine([moment_rows([x]) for x in plants]), rtol=1e-9)


def test_every_task_normalises_to_zero_mean_unit_deviation_in_two_passes():
    for name in ("predictive_maintenance", "quality_control", "energy_anomaly"):
        cfg = compose([f"task={name}"])
        task = get_task(cfg["task"], cfg["seed"])
        trains = [task.gateway_data(p)[0] for p in range(3)]
        first = sum(task.feature_sums(t) for t in trains)
        centre = centre_of(first)
        two_pass = recentre(sum(task.feature_sums(t, centre) for t in trains), centre)
        merged = combine([task.feature_sums(t) for t in trains])
        assert np.allclose(two_pass, merged, rtol=1e-8, atol=1e-6), name
