"""Run-to-failure generator in the style of NASA's C-MAPSS turbofan data.

Physical model (Saxena et al., "Damage propagation modeling for aircraft engine
run-to-failure simulation", PHM08):

* Each machine unit has a health index that decays exponentially with use::

      h(t) = 1 - d0 - (exp(a * t**b) - 1)

  ``d0`` is the unit's initial wear (manufacturing variation), ``(a, b)`` its wear
  rate and wear exponent. The ``- 1`` makes ``h(0) = 1 - d0`` as the paper intends;
  the unit fails at the first cycle where ``h`` would reach 0.
* Fourteen informative sensors (the 14 that carry degradation signal in C-MAPSS:
  T24, T30, T50, P30, Nf, Nc, Ps30, phi, NRf, NRc, BPR, htBleed, W31, W32). Each is::

      sensor_i = baseline_i(operating condition) + k_i(fault mode) * (1 - h) + noise

  The baseline depends on the cycle's operating condition (altitude, Mach number,
  throttle resolver angle), one of the six C-MAPSS flight conditions; the
  sensitivity vector ``k`` depends on the unit's fault mode (HPC or fan
  degradation); the noise level is the sensor's C-MAPSS scatter times the plant's
  instrumentation quality.
* Labels are piecewise-linear remaining useful life, capped at ``rul_cap`` cycles.

How plants differ (non-IID by construction, each drawn from the plant seed):

* **wear**: mean life (160-320 cycles) and wear exponent b (1.2-1.8) of the plant's
  machines; units scatter around them (log-normal life, small jitter in b);
* **operating regime**: a Dirichlet draw over the six conditions; some plants run
  almost always in one condition, others in all six;
* **fault modes**: the share of fan versus HPC degradation;
* **fleet size**: number of units between ``units_min`` and ``units_max``;
* **instrumentation**: noise multiplier 0.8-1.3.

``task.plants.label_skew`` (wear and fault modes), ``feature_skew`` (regime and
instrumentation) and ``quantity_skew`` (fleet size) scale these spreads: 0 = every plant
alike, 1 = the ranges above (:func:`plant_profile`, :mod:`iiotfl.tasks.heterogeneity`).

Everything is a pure function of ``(seed, plant)``: the same arguments always give
bit-identical data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iiotfl.tasks.heterogeneity import skewed_count, spread, tilt
from iiotfl.tasks.predictive_maintenance.data import RunToFailure

SENSORS: tuple[str, ...] = (
    "T24", "T30", "T50", "P30", "Nf", "Nc", "Ps30",
    "phi", "NRf", "NRc", "BPR", "htBleed", "W31", "W32",
)
SETTINGS: tuple[str, ...] = ("altitude", "mach", "tra")

# The six C-MAPSS flight conditions: altitude [kft], Mach number, throttle angle.
CONDITIONS = np.array(
    [
        [0.0, 0.00, 100.0],
        [10.0, 0.25, 100.0],
        [20.0, 0.70, 100.0],
        [25.0, 0.62, 60.0],
        [35.0, 0.84, 100.0],
        [42.0, 0.84, 100.0],
    ]
)
# Sea-level baseline of each sensor (C-MAPSS FD001 means) ...
_NOMINAL = np.array(
    [642.7, 1590.5, 1408.9, 553.4, 2388.1, 9065.0, 47.5,
     521.4, 2388.1, 8143.8, 8.44, 393.0, 38.8, 23.3]
)
# ... how strongly it follows the operating condition ...
_COND_EXPONENT = np.array(
    [0.6, 0.8, 0.9, 1.2, 0.3, 0.4, 1.2, 1.1, 0.3, 0.4, 0.5, 0.8, 1.0, 1.0]
)
# ... its measurement scatter ...
_NOISE = np.array(
    [0.5, 6.0, 9.0, 0.9, 0.07, 22.0, 0.27, 0.74, 0.07, 19.0, 0.04, 1.5, 0.18, 0.11]
)
# ... and its drift from new to failed, for each fault mode (HPC, fan).
_SENSITIVITY = np.array(
    [
        [1.2, 12.0, 28.0, -3.5, 0.20, 20.0, 1.1, -3.0, 0.20, 15.0, 0.10, 4.5, -1.1, -0.65],
        [2.0, 8.0, 18.0, -2.0, 0.35, 12.0, 0.7, -1.8, 0.35, 9.0, 0.22, 3.0, -0.7, -0.40],
    ]
)
FAULT_MODES: tuple[str, ...] = ("hpc", "fan")
# Ranges the plants' characteristics are drawn from (at the default skews, 1).
LIFE = (160.0, 320.0)  # mean life of a plant's units, cycles
WEAR_EXPONENT = (1.2, 1.8)  # b of h(t)
NOISE_SCALE = (0.8, 1.3)  # instrumentation: multiplier of the sensors' scatter


@dataclass(frozen=True)
class PlantProfile:
    """What makes one plant's machines differ from another plant's."""

    plant: int
    mean_life: float
    wear_exponent: float
    regime: np.ndarray  # probabilities over CONDITIONS
    fan_share: float
    n_units: int
    noise_scale: float


def condition_baseline(conditions: np.ndarray) -> np.ndarray:
    """Sensor baselines (n, 14) for rows of (altitude, mach, tra)."""
    alt, mach, tra = conditions[:, 0], conditions[:, 1], conditions[:, 2]
    load = (tra / 100.0) * (1.0 - 0.012 * alt) * (1.0 + 0.1 * mach)
    return _NOMINAL[None, :] * load[:, None] ** _COND_EXPONENT[None, :]


def plant_profile(
    seed: int,
    plant: int,
    units_min: int = 20,
    units_max: int = 40,
    *,
    label_skew: float = 1.0,
    feature_skew: float = 1.0,
    quantity_skew: float = 1.0,
) -> PlantProfile:
    """Draw the characteristics of plant ``plant`` for a fleet built from ``seed``.

    The skews (``task.plants``; 0 = every plant alike, 1 = the spreads above, bit for bit) scale how
    far each plant's draw lies from the fleet's centre (:mod:`iiotfl.tasks.heterogeneity`):

    * ``label_skew``: mean life and wear exponent (log scale, about their geometric centres
      226 cycles and 1.47) and the fan share (about 0.5, kept in [0, 1]) — how the plants'
      machines wear out and fail, i.e. their RUL labels and fault modes;
    * ``feature_skew``: the operating regime (each plant's log-share of a condition relative to
      the even mix) and the instrumentation noise (log scale about 1.02) — the sensor readings;
    * ``quantity_skew``: the number of units (:func:`~iiotfl.tasks.heterogeneity.skewed_count`:
      size ∝ draw^skew, fleet mean kept at (units_min + units_max) / 2, at least 2).
    """
    rng = np.random.default_rng([seed, plant, 0])
    concentration = rng.choice([0.3, 1.0, 5.0])
    mean_life = float(rng.uniform(*LIFE))
    wear_exponent = float(rng.uniform(*WEAR_EXPONENT))
    regime = rng.dirichlet(np.full(len(CONDITIONS), concentration))
    fan_share = float(rng.uniform(0.0, 1.0))
    n_units = int(rng.integers(units_min, units_max + 1))
    noise_scale = float(rng.uniform(*NOISE_SCALE))
    return PlantProfile(
        plant=plant,
        mean_life=spread(mean_life, _geometric(LIFE), label_skew, log=True),
        wear_exponent=spread(wear_exponent, _geometric(WEAR_EXPONENT), label_skew, log=True),
        regime=tilt(regime, np.ones(len(CONDITIONS)), feature_skew),
        fan_share=spread(fan_share, 0.5, label_skew, low=0.0, high=1.0),
        n_units=skewed_count(n_units, units_min, units_max, quantity_skew, floor=2),
        noise_scale=spread(noise_scale, _geometric(NOISE_SCALE), feature_skew, log=True),
    )


def _geometric(bounds: tuple[float, float]) -> float:
    return float(np.sqrt(bounds[0] * bounds[1]))


def health_index(t: np.ndarray, d0: float, a: float, b: float) -> np.ndarray:
    """h(t) = 1 - d0 - (exp(a t^b) - 1)."""
    return 1.0 - d0 - np.expm1(a * np.power(t, b))


def generate_plant(
    seed: int,
    plant: int,
    *,
    units_min: int = 20,
    units_max: int = 40,
    n_units: int | None = None,
    split: str = "train",
    rul_cap: int = 125,
    label_skew: float = 1.0,
    feature_skew: float = 1.0,
    quantity_skew: float = 1.0,
) -> RunToFailure:
    """Run-to-failure trajectories of one plant's machine units.

    ``split`` selects an independent stream of units from the same plant
    distribution ("train", "test", ...), so held-out units are fresh draws.
    The skews scale how unlike the plants are (:func:`plant_profile`).
    """
    profile = plant_profile(seed, plant, units_min, units_max, label_skew=label_skew,
                            feature_skew=feature_skew, quantity_skew=quantity_skew)
    count = profile.n_units if n_units is None else n_units
    rng = np.random.default_rng([seed, plant, 1 + sum(map(ord, split))])
    rows_unit, rows_cycle, rows_set, rows_sensor, rows_rul, rows_wear = [], [], [], [], [], []
    for u in range(count):
        d0 = rng.uniform(0.0, 0.05)
        b = profile.wear_exponent * (1.0 + rng.normal(0.0, 0.03))
        life = profile.mean_life * rng.lognormal(0.0, 0.15)
        a = np.log(2.0 - d0) / life**b  # h(life) = 0
        n_cycles = max(int(np.floor(life)), 2)
        t = np.arange(1, n_cycles + 1, dtype=float)
        wear = 1.0 - health_index(t, d0, a, b)  # 1 - h, grows from ~d0 to ~1
        cond_idx = rng.choice(len(CONDITIONS), size=n_cycles, p=profile.regime)
        settings = CONDITIONS[cond_idx] + rng.normal(0.0, [0.003, 0.0003, 0.0], size=(n_cycles, 3))
        mode = int(rng.random() < profile.fan_share)
        sensors = (
            condition_baseline(CONDITIONS[cond_idx])
            + wear[:, None] * _SENSITIVITY[mode][None, :]
            + rng.normal(0.0, 1.0, size=(n_cycles, len(SENSORS))) * _NOISE * profile.noise_scale
        )
        rows_unit.append(np.full(n_cycles, u + 1))
        rows_cycle.append(t.astype(int))
        rows_set.append(settings)
        rows_sensor.append(sensors)
        rows_rul.append(np.minimum(n_cycles - t, rul_cap))
        rows_wear.append(wear)
    return RunToFailure(
        unit=np.concatenate(rows_unit),
        cycle=np.concatenate(rows_cycle),
        settings=np.concatenate(rows_set),
        sensors=np.concatenate(rows_sensor),
        rul=np.concatenate(rows_rul),
        sensor_names=SENSORS,
        setting_names=SETTINGS,
        source=f"generator(seed={seed}, plant={plant}, split={split})",
        extra={"wear": np.concatenate(rows_wear)},  # true 1 - h(t), for checks only
    )


def truncate_units(data: RunToFailure, seed: int, low: float = 0.3, high: float = 0.95) -> RunToFailure:
    """Cut each unit's trajectory at a random point, as in C-MAPSS test files.

    RUL labels keep their run-to-failure values, so the last row of each unit is the
    true RUL at the moment the record stops.
    """
    rng = np.random.default_rng([seed, 99])
    keep = np.zeros(len(data.unit), dtype=bool)
    for u in np.unique(data.unit):
        idx = np.flatnonzero(data.unit == u)
        n = max(int(len(idx) * rng.uniform(low, high)), 1)
        keep[idx[:n]] = True
    return data.subset(keep)
