"""How unlike the generated plants are: one scalar per kind of skew, shared by the task generators.

Every generator draws each plant's characteristics from ``(seed, plant)`` alone. The keys of
``task.plants`` scale how far those draws spread between plants, one scalar per kind of skew:

* ``label_skew`` — how differently the plants' labels are distributed (failure modes, lives,
  failure rates);
* ``feature_skew`` — how far the plants' operating points and sensor distributions are apart;
* ``quantity_skew`` — how unequal the plants' amounts of data are.

0 makes the plants alike in that respect (IID), 1 is the generator's own spread, larger values
push the plants further apart. A knob moves each plant's drawn value away from (or towards) the
fleet's centre; every random number is still drawn, in the same order, whatever the knobs. So
the defaults give the data bit for bit as before, changing one knob changes that aspect of the
plants and nothing else, and a plant moves smoothly as a knob grows (a sweep compares the same
plants at different distances).

The helpers here are the three ways a drawn value is scaled: :func:`spread` (a number, on a
linear or a log scale), :func:`tilt` (a share vector: product mix, operating regime) and
:func:`skewed_count` (a record size); :func:`check_skews` checks the config keys.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import numpy as np

from iiotfl.configs import ConfigError, require

SKEWS = ("label_skew", "feature_skew", "quantity_skew")
SKEW_MAX = 10.0


def spread(draw: float, centre: float, skew: float, *, log: bool = False,
           low: float | None = None, high: float | None = None) -> float:
    """``draw`` with its distance from ``centre`` multiplied by ``skew`` (on a log scale with ``log``:
    ``centre · (draw / centre)^skew``), then kept within [``low``, ``high``].

    ``skew`` 1 returns ``draw`` itself, unclipped (the generator's own value, bit for bit); 0 returns
    ``centre`` (every plant alike)."""
    if skew == 1.0:
        return draw
    value = centre * (draw / centre) ** skew if log else centre + skew * (draw - centre)
    if low is not None:
        value = max(low, value)
    if high is not None:
        value = min(high, value)
    return float(value)


def tilt(shares: np.ndarray, base: np.ndarray, skew: float) -> np.ndarray:
    """A plant's share vector (product mix, operating regime) with its log-ratio to the fleet's ``base``
    shares multiplied by ``skew``, renormalised: ``∝ base · (shares / base)^skew``.

    ``skew`` 1 returns ``shares`` itself; 0 returns ``base`` (normalised): every plant the same mix;
    larger values sharpen each plant's own preferences (a plant that runs mostly one condition runs it
    even more)."""
    if skew == 1.0:
        return shares
    base = np.asarray(base, dtype=float) / float(np.sum(base))
    if skew == 0.0:
        return base
    weights = base * (np.asarray(shares, dtype=float) / base) ** skew
    return weights / weights.sum()


def skewed_count(draw: int, low: int, high: int, skew: float, floor: int) -> int:
    """A plant's record size ``draw`` (drawn uniformly in [``low``, ``high``]) with the differences
    between plants scaled by ``skew``: the size becomes ``∝ draw^skew``, normalised so that the fleet's
    mean stays (``low`` + ``high``) / 2, and at least ``floor``.

    ``skew`` 1 returns ``draw`` itself; 0 gives every plant (``low`` + ``high``) / 2 (rounded); the ratio
    of the largest to the smallest plant is (``high`` / ``low``)^``skew``. With ``low`` = ``high`` there is
    no spread to scale and ``draw`` is returned."""
    if skew == 1.0 or low >= high:
        return draw
    ratio = low / high
    # E[(u / high)^skew] for u uniform in [low, high]: the normalisation that keeps the mean
    expected = (1.0 - ratio ** (skew + 1.0)) / ((skew + 1.0) * (1.0 - ratio))
    value = 0.5 * (low + high) * (draw / high) ** skew / expected
    return max(int(floor), int(round(value)))


def skews(plants: Mapping[str, Any] | None, **defaults: float) -> dict[str, float]:
    """The knobs of a task's ``plants`` section as floats (``defaults`` for keys it lacks)."""
    plants = plants or {}
    return {key: float(plants.get(key, value)) for key, value in defaults.items()}


def check_skews(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """Check ``task.plants.<key>`` for each of ``keys``: a finite number in [0, SKEW_MAX]; raise
    ConfigError naming the key and the fix. Returns the values."""
    out = {}
    for key in keys:
        path = f"task.plants.{key}"
        value = require(cfg, path)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:
            ok = math.isfinite(value) and 0.0 <= value <= SKEW_MAX
        if not ok:
            raise ConfigError(f"config: {path}={value!r} is invalid; it must be a number in [0, {SKEW_MAX:g}] "
                              f"(0: plants alike, 1: the generator's default spread, more: more unlike), "
                              f"e.g. {path}=1")
        out[key] = float(value)
    return out
