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
from datetime import datetime, timezone
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


def _seconds(value: Any, where: str) -> float:
    """A timestamp as epoch seconds: a number, or an ISO 8601 time (UTC when it names no zone)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        try:
            stamp = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"{where}: {value!r} is neither epoch seconds nor an ISO 8601 time; fix the "
                             "timestamp signal") from None
        out = (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
    if not np.isfinite(out):
        raise ValueError(f"{where}: timestamp {value!r} is not finite")
    return out


TIME_FEATURES = {"hour_sin": (86400.0, np.sin), "hour_cos": (86400.0, np.cos),
                 "dow_sin": (7 * 86400.0, np.sin), "dow_cos": (7 * 86400.0, np.cos)}


def from_table(table: dict[str, list], features: list[str], step_s: float, val_fraction: float, *,
               site: int = 0, source: str = "") -> EnergySeries:
    """A gateway's own series from columns: ``timestamp``, ``target`` (the monitored quantity), each of
    ``features`` and optionally ``label`` (0 normal, k > 0 the fault kind KINDS[k-1] a plant's log
    names). Readings are averaged per step of ``step_s`` seconds; the last ``val_fraction`` of the
    time span is the evaluation period. Time-of-day and day-of-week features (``hour_sin``, ...) are
    computed from the timestamp when the table has none."""
    needed = ["timestamp", "target", *[f for f in features if f not in TIME_FEATURES]]
    missing = [c for c in needed if c not in table]
    if missing:
        raise ValueError(f"{source}: no signal for {missing} (energy anomaly needs timestamp, target and the "
                         f"run's features {features}); map them in the gateway's data description")
    n = len(table["timestamp"])
    ts = np.array([_seconds(v, f"{source}: record {i + 1}, signal 'timestamp'") for i, v in
                   enumerate(table["timestamp"])])

    def column(name: str) -> np.ndarray:
        try:
            return np.array([float(v) for v in table[name]], dtype=np.float64)
        except (TypeError, ValueError):
            bad = next(v for v in table[name] if not _is_number(v))
            raise ValueError(f"{source}: signal {name!r} has value {bad!r}, not a number; fix the mapping or the "
                             "source") from None

    step_all = np.floor(ts / step_s).astype(np.int64)
    steps, inverse = np.unique(step_all, return_inverse=True)
    if len(steps) < 2:
        raise ValueError(f"{source}: {n} record(s) in {len(steps)} step(s) of {step_s:g} s; a gateway needs at "
                         "least two steps of history")

    def per_step(values: np.ndarray) -> np.ndarray:
        ok = np.isfinite(values)
        total = np.bincount(inverse, np.where(ok, values, 0.0), len(steps))
        count = np.bincount(inverse, ok.astype(float), len(steps))
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def feature(name: str) -> np.ndarray:
        if name not in table and name in TIME_FEATURES:  # of the step's start, UTC
            period, fn = TIME_FEATURES[name]
            return fn(2 * np.pi * (steps * step_s % period) / period)
        return per_step(column(name))

    inputs = np.column_stack([feature(f) for f in features]) if features else np.zeros((len(steps), 0))
    label = np.zeros(len(steps), dtype=np.int8)
    if "label" in table:
        raw = np.nan_to_num(column("label"))
        bad = raw[(raw != np.round(raw)) | (raw < 0) | (raw > len(KINDS))]
        if len(bad):
            raise ValueError(f"{source}: label {bad[0]:g} is not 0 (normal) or a fault kind 1..{len(KINDS)} "
                             f"({', '.join(KINDS)}); fix the label signal")
        label = np.maximum.reduceat(raw[np.argsort(inverse, kind="stable")].astype(np.int8),
                                    np.r_[0, np.cumsum(np.bincount(inverse))[:-1]])
    starts = np.flatnonzero((label > 0) & (np.r_[0, label[:-1]] != label))
    event = np.full(len(steps), -1, dtype=np.int32)
    for k, s in enumerate(starts):
        e = s
        while e < len(label) and label[e] == label[s]:
            e += 1
        event[s:e] = k
    split = steps[0] + (steps[-1] - steps[0]) * (1.0 - float(val_fraction))
    return EnergySeries(site=np.full(len(steps), site, dtype=np.int32), step=steps, inputs=inputs,
                        target=per_step(column("target")), label=label, event=event,
                        period=(steps > split).astype(np.int8) if val_fraction > 0 else np.zeros(len(steps), np.int8),
                        feature_names=tuple(features), target_name="target", source=source)


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
