"""Time series of a gateway, fleet-wide normalisation and model windows.

A gateway holds an :class:`EnergySeries`: one row per time step (10 minutes for the wind
farm SCADA, one hour for smart meters) with the model's per-step input features, the
monitored quantity (the target the model predicts), and the evaluation labels. The
model sees a window of ``window`` steps of inputs and predicts the target at the
window's last step; the anomaly score is the (smoothed) absolute residual.

Labels (:data:`KINDS`): 0 normal, ``k > 0`` a fault kind (the data set's own flags or an
injected fault), -1 left out of the scoring (rows an injected fault did not change, rows
the flags do not explain). ``period`` is 0 for the training period (fault-free windows of
it calibrate the alarm threshold) and 1 for the evaluation period.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from iiotfl.tasks.moments import centre_of, moment_rows, pooled, variance

# Label codes: KINDS[k - 1] is the name of label k. The first two are the wind farm's own
# flags (plant_data.csv of La Haute Borne), the others injected faults.
KINDS = ("availability", "curtailment", "underperformance", "stuck", "drift", "derating",
         "spike", "level_shift", "stale")
FLAG_KINDS = ("availability", "curtailment")
IGNORED = -1


def kind_code(name: str) -> int:
    return KINDS.index(name) + 1


@dataclass
class EnergySeries:
    """Rows sorted by (site, step)."""

    site: np.ndarray     # (n,) int: gateway / turbine / meter the row belongs to
    step: np.ndarray     # (n,) int64: time index in steps; windows never span a gap
    inputs: np.ndarray   # (n, F) float64 per-step model inputs (NaN: missing)
    target: np.ndarray   # (n,) float64 the monitored quantity (NaN: missing)
    label: np.ndarray    # (n,) int8: 0 normal, k > 0 KINDS[k-1], -1 not scored
    event: np.ndarray    # (n,) int32: id of the fault event the row belongs to, -1 none
    period: np.ndarray   # (n,) int8: 0 training period, 1 evaluation period
    feature_names: tuple[str, ...]
    target_name: str
    source: str = ""

    def __len__(self) -> int:
        return len(self.step)

    def subset(self, mask: np.ndarray) -> "EnergySeries":
        arrays = {f.name: getattr(self, f.name)[mask] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays)

    @property
    def n_sites(self) -> int:
        return len(np.unique(self.site))


def concat(parts: list[EnergySeries]) -> EnergySeries:
    """One series of several sites; event ids are made unique across parts."""
    offset, events = 0, []
    for p in parts:
        events.append(np.where(p.event >= 0, p.event + offset, -1))
        offset += int(p.event.max(initial=-1)) + 1
    first = parts[0]
    arrays: dict[str, Any] = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(first)
              if isinstance(getattr(first, f.name), np.ndarray)}
    arrays["event"] = np.concatenate(events).astype(np.int32)
    return replace(first, **arrays, source="+".join(dict.fromkeys(p.source for p in parts)))


def feature_sums(data: EnergySeries, centre: np.ndarray | None = None) -> np.ndarray:
    """One group: (count, sums, M2) of every input feature and the target, over rows where all
    are present. Shape (1, 1 + 2 (F + 1)); merged over gateways (:mod:`iiotfl.tasks.moments`)."""
    cols = np.column_stack([data.inputs, data.target])
    return moment_rows([cols[np.isfinite(cols).all(axis=1)]], centre)


@dataclass(frozen=True)
class Normaliser:
    """Fleet-wide z-scoring of the inputs and the target."""

    mean: np.ndarray  # (F + 1,): inputs then target
    std: np.ndarray

    @classmethod
    def from_sums(cls, sums: np.ndarray) -> "Normaliser":
        sums = pooled(sums)
        if sums[0, 0] <= 0:
            raise ValueError("normalisation statistics are empty: no gateway reported any data")
        mean = centre_of(sums)[0]
        std = np.sqrt(variance(sums)[0])
        std[std < 1e-6] = 1.0
        return cls(mean=mean, std=std)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean[:-1]) / self.std[:-1]).astype(np.float32)

    def target(self, y: np.ndarray) -> np.ndarray:
        return ((y - self.mean[-1]) / self.std[-1]).astype(np.float32)


def window_ends(data: EnergySeries, window: int) -> np.ndarray:
    """Row indices where a window of ``window`` consecutive steps of one site ends, with every
    input of the window and the target of its last step present."""
    n = len(data)
    if n < window:
        return np.zeros(0, dtype=np.int64)
    ok_row = np.isfinite(data.inputs).all(axis=1)
    ends = np.arange(window - 1, n)
    start = ends - (window - 1)
    good = (data.site[start] == data.site[ends]) & (data.step[ends] - data.step[start] == window - 1)
    good &= np.isfinite(data.target[ends])
    # every row of the window has its inputs: a running count of bad rows
    bad = np.concatenate([[0], np.cumsum(~ok_row)])
    good &= (bad[ends + 1] - bad[start]) == 0
    return ends[good]


def make_windows(data: EnergySeries, normaliser: Normaliser, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs ``(n, window, F)`` float32, normalised targets ``(n,)`` and the rows they end at."""
    ends = window_ends(data, window)
    x = normaliser.inputs(data.inputs)
    idx = ends[:, None] + np.arange(-window + 1, 1)[None, :]
    return x[idx], normaliser.target(data.target[ends]), ends


def smooth(data: EnergySeries, ends: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Causal mean of ``values`` (one per window end) over the last ``k`` steps of the same
    site that have a value (a gap shortens the mean, never reaches across a site)."""
    if k <= 1 or len(ends) == 0:
        return values
    total, count = values.astype(float).copy(), np.ones(len(values))
    for j in range(1, k):
        prev = np.arange(len(ends)) - j
        ok = prev >= 0
        prev = np.where(ok, prev, 0)
        ok &= (data.site[ends[prev]] == data.site[ends]) & (data.step[ends] - data.step[ends[prev]] < k)
        total += np.where(ok, values[prev], 0.0)
        count += ok
    return total / count
