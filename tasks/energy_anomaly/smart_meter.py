"""Smart-meter / substation load generator: one site per gateway, any fleet size.

Hourly load of a site (kW), a pure function of ``(seed, site)``::

    load(t) = scale * profile(hour, weekday) * (1 + heat * HDD(T) + cool * CDD(T)) * exp(noise(t))

* ``profile``: a per-site mix (Dirichlet draw) of three archetypes — residential (morning
  and evening peaks, later mornings at weekends), commercial (weekday opening hours, low
  weekends) and industrial (two shifts on weekdays, a night and weekend base load) — with
  peak times shifted by up to ±1 h per site.
* temperature ``T`` (°C): the site's climate (5-15 °C mean), the season (the fleet's
  calendar start), a daily cycle and an AR(1) weather anomaly; it is measured at the site
  and is a model input. Heating below 15 °C (``HDD = max(0, 15 - T) / 10``) and cooling
  above 22 °C (``CDD``), with per-site sensitivities.
* ``scale``: log-uniform 2-500 kW (a house to a small substation); ``noise``: AR(1),
  3-7 % per site.

``task.plants.feature_skew`` scales how far these per-site draws lie from the fleet's centre
(0: every site alike but for its own weather and noise; 1: the ranges above), and
``task.plants.quantity_skew`` gives the sites training histories of unequal length
(:func:`history_days`; 0, the default: every site all ``train_days``).

Anomalies injected in the evaluation period (the last ``test_days``), ``events_per_kind``
of each kind per site: ``spike`` (load x 2-4 for 1-3 h), ``level_shift`` (load x 1.3-1.7
or / 1.3-1.7 for 12-48 h), ``stale`` (the meter repeats its last value for 6-24 h),
``drift`` (a linear ramp to ±30-50 % of the site's mean load over 2-4 days).

The gateway keeps its site's typical load and temperature per hour of the week (median
log load, mean temperature over its training period). Target: log load minus the typical
log load (the site's scale drops out, multiplicative faults become additive, residuals are
comparable across sites). Model inputs per hour: the temperature, the typical temperature
of that hour of the week, and sine/cosine of hour of day and day of week.
"""

from __future__ import annotations

import math

import numpy as np

from iiotfl.tasks.energy_anomaly.data import EnergySeries, kind_code
from iiotfl.tasks.energy_anomaly.faults import Event, inject, schedule
from iiotfl.tasks.heterogeneity import spread, tilt

KINDS = ("spike", "level_shift", "stale", "drift")
FEATURES = ("temp", "temp_typical", "hour_sin", "hour_cos", "dow_sin", "dow_cos")
MIN_HISTORY_DAYS = 7  # a site's typical week needs one


def _bump(h: np.ndarray, centre: float | np.ndarray, width: float) -> np.ndarray:
    d = (h - centre + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (d / width) ** 2)


def _profile(rng: np.random.Generator, hour: np.ndarray, weekend: np.ndarray, skew: float = 1.0) -> np.ndarray:
    mix = tilt(rng.dirichlet([0.6, 0.6, 0.6]), np.ones(3), skew)
    shift = spread(rng.uniform(-1.0, 1.0), 0.0, skew)
    h = hour + shift
    residential = 0.35 + 0.35 * _bump(h, np.where(weekend, 9.0, 7.5), 1.2) + 0.7 * _bump(h, 19.0, 2.0)
    open_hours = 1.0 / (1.0 + np.exp(-(h - 8.0) * 2.0)) / (1.0 + np.exp((h - 18.5) * 2.0))
    commercial = np.where(weekend, 0.35, 0.3 + 0.9 * open_hours)
    shifts = 1.0 / (1.0 + np.exp(-(h - 6.0) * 3.0)) / (1.0 + np.exp((h - 22.0) * 3.0))
    industrial = np.where(weekend, 0.5, 0.6 + 0.4 * shifts)
    return mix[0] * residential + mix[1] * commercial + mix[2] * industrial


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    e = rng.normal(0.0, sigma, n)
    out = np.empty(n)
    out[0] = e[0] / np.sqrt(1 - phi**2)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + e[i]
    return out


def _events(rng: np.random.Generator, lo: int, hi: int, per_kind: int, mean_load: float) -> list[Event]:
    lengths = {"spike": (1, 3), "level_shift": (12, 48), "stale": (6, 24), "drift": (48, 96)}
    wanted = [(k, int(rng.integers(lengths[k][0], lengths[k][1] + 1))) for k in KINDS for _ in range(per_kind)]
    placed = schedule(rng, lo, hi, wanted, gap=24)
    out = []
    for kind, start, length in placed:
        sign = rng.choice([-1.0, 1.0])
        if kind == "spike":
            ev = Event(kind, start, length, "scale", "load", rng.uniform(2.0, 4.0))
        elif kind == "level_shift":
            ev = Event(kind, start, length, "scale", "load", rng.uniform(1.3, 1.7) ** sign)
        elif kind == "stale":
            ev = Event(kind, start, length, "freeze", "load", 0.0)
        else:
            ev = Event(kind, start, length, "ramp", "load", sign * rng.uniform(0.3, 0.5) * mean_load)
        out.append(ev)
    return out


def history_days(seed: int, site: int, train_days: int, skew: float) -> int:
    """Days of its training period a site has recorded (``task.plants.quantity_skew``): ``train_days``
    × u^skew with u ~ U(0, 1) per site (own stream), rounded, at least :data:`MIN_HISTORY_DAYS`.
    0: every site ``train_days``; the sites' mean share is 1 / (1 + skew), its spread grows with skew."""
    if skew == 0.0:
        return train_days
    u = float(np.random.default_rng([seed, site, 0xE4E7, 1]).random())
    return min(train_days, max(MIN_HISTORY_DAYS, int(round(train_days * u**skew))))


def generate_site(seed: int, site: int, train_days: int, test_days: int, events_per_kind: int, *,
                  feature_skew: float = 1.0, quantity_skew: float = 0.0) -> EnergySeries:
    """Hourly series of one site: ``train_days`` (period 0, fault-free) then ``test_days``
    (period 1, with injected anomalies).

    ``feature_skew`` scales how far the site's climate, profile mix and peak shift, heating and
    cooling sensitivities, scale and noise level lie from the fleet's centre (0: every site alike,
    the weather and the noise its own; 1: the ranges above, bit for bit). ``quantity_skew`` > 0
    drops the start of some sites' training period (:func:`history_days`: meters installed at
    different times); the evaluation period stays as it is."""
    fleet = np.random.default_rng([seed, 0xE4E7])
    rng = np.random.default_rng([seed, site, 0xE4E7])
    n = 24 * (train_days + test_days)
    t = np.arange(n)
    start_day = int(fleet.integers(0, 365))  # the fleet's calendar: day of year and weekday of hour 0
    start_dow = int(fleet.integers(0, 7))
    hour = (t % 24).astype(float)
    dow = (start_dow + t // 24) % 7
    weekend = dow >= 5
    doy = (start_day + t / 24.0) % 365.0

    skew = feature_skew
    climate = spread(rng.uniform(5.0, 15.0), 10.0, skew)
    temp = (climate - 8.0 * np.cos(2 * np.pi * (doy - 15.0) / 365.0) + 4.0 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)
            + _ar1(rng, n, 0.97, 0.6))
    heat = spread(rng.uniform(0.0, 0.4), 0.2, skew, low=0.0)
    cool = spread(rng.uniform(0.0, 0.5), 0.25, skew, low=0.0)
    weather = 1.0 + heat * np.maximum(0.0, 15.0 - temp) / 10.0 + cool * np.maximum(0.0, temp - 22.0) / 10.0
    scale = spread(float(np.exp(rng.uniform(np.log(2.0), np.log(500.0)))), math.sqrt(2.0 * 500.0), skew, log=True)
    level = spread(rng.uniform(0.03, 0.07), math.sqrt(0.03 * 0.07), skew, log=True)
    noise = _ar1(rng, n, 0.7, level * np.sqrt(1 - 0.7**2))
    load = scale * _profile(rng, hour, weekend, skew) * weather * np.exp(noise)

    label = np.zeros(n, dtype=np.int8)
    event = np.full(n, -1, dtype=np.int32)
    test_start = 24 * train_days
    if events_per_kind > 0 and test_days > 0:
        events = _events(rng, test_start, n, events_per_kind, float(load.mean()))
        channels = {"load": load}
        inject(channels, events, label, event, {"load": 0.03 * float(load.mean())},
               {k: kind_code(k) for k in KINDS})
        load = np.maximum(channels["load"], 0.01 * scale)

    log_load = np.log(load)
    # the rows the site has recorded: its meter may have been installed during the training period
    first = 24 * (train_days - history_days(seed, site, train_days, quantity_skew))
    # the site's typical load and temperature per hour of the week, from its own training period
    slot = (hour.astype(int) * 7 + dow).astype(int)
    train = (t >= first) & (t < test_start)
    typical = np.array([np.median(log_load[train & (slot == k)]) for k in range(168)])[slot]
    typical_temp = np.array([np.mean(temp[train & (slot == k)]) for k in range(168)])[slot]
    inputs = np.column_stack([
        temp, typical_temp,
        np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
        np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7),
    ])
    kept = slice(first, n)
    return EnergySeries(
        site=np.full(n - first, site, dtype=np.int32), step=t[kept].astype(np.int64), inputs=inputs[kept],
        target=(log_load - typical)[kept], label=label[kept], event=event[kept],
        period=(t >= test_start).astype(np.int8)[kept], feature_names=FEATURES,
        target_name="log_load_vs_typical", source=f"smart_meter(seed={seed}, site={site})",
    )
