"""Run-to-failure records, per-condition normalisation and sliding windows.

A gateway holds a :class:`RunToFailure` (from the generator or from its own files),
contributes per-condition feature sums to the fleet's normalisation statistics
(:func:`condition_sums`), and trains on sliding windows of normalised sensors
(:func:`make_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from iiotfl.tasks.moments import centre_of, moment_rows, pooled, variance


@dataclass
class RunToFailure:
    """Rows of (unit, cycle, settings, sensors[, rul]) sorted by unit then cycle."""

    unit: np.ndarray
    cycle: np.ndarray
    settings: np.ndarray  # (n, n_settings); n_settings may be 0
    sensors: np.ndarray  # (n, n_sensors)
    rul: np.ndarray | None
    sensor_names: tuple[str, ...]
    setting_names: tuple[str, ...] = ()
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.unit)

    @property
    def n_units(self) -> int:
        return len(np.unique(self.unit))

    def subset(self, mask: np.ndarray) -> "RunToFailure":
        return RunToFailure(
            unit=self.unit[mask],
            cycle=self.cycle[mask],
            settings=self.settings[mask],
            sensors=self.sensors[mask],
            rul=None if self.rul is None else self.rul[mask],
            sensor_names=self.sensor_names,
            setting_names=self.setting_names,
            source=self.source,
        )

    def split_units(self, fraction: float, seed: int) -> tuple["RunToFailure", "RunToFailure"]:
        """Split by whole units: (first part, last ``fraction`` of units)."""
        units = np.unique(self.unit)
        rng = np.random.default_rng([seed, 7])
        held = set(rng.permutation(units)[: max(1, int(round(len(units) * fraction)))].tolist())
        if len(held) == len(units):
            held.pop()
        mask = np.isin(self.unit, list(held))
        return self.subset(~mask), self.subset(mask)

    def select_sensors(self, names: list[str] | tuple[str, ...]) -> "RunToFailure":
        missing = [n for n in names if n not in self.sensor_names]
        if missing:
            raise ValueError(
                f"{self.source}: sensor column(s) {missing} not present (have {list(self.sensor_names)}); "
                "fix task.features"
            )
        cols = [self.sensor_names.index(n) for n in names]
        out = self.subset(np.ones(len(self), dtype=bool))
        out.sensors = self.sensors[:, cols]
        out.sensor_names = tuple(names)
        return out


def assign_conditions(settings: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Index of the nearest operating condition for each row (0 where there are none).

    Distances are measured on settings scaled by each setting's range across the
    known conditions, so altitude in kft and Mach number weigh alike.
    """
    if settings.shape[1] == 0 or len(conditions) <= 1 or settings.shape[1] != conditions.shape[1]:
        return np.zeros(len(settings), dtype=int)
    span = np.ptp(conditions, axis=0)
    span[span == 0] = 1.0
    d = ((settings[:, None, :] - conditions[None, :, :]) / span) ** 2
    return d.sum(axis=2).argmin(axis=1)


def condition_sums(data: RunToFailure, conditions: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Per-condition (count, sum, M2) of each sensor: shape (C, 1 + 2S) (:mod:`iiotfl.tasks.moments`).

    These statistics are what a gateway contributes to the fleet's normalisation; the fleet
    merges them, so no gateway reveals its own mean (with HE: ``centre``, the second pass).
    """
    cond = assign_conditions(data.settings, conditions)
    n_cond = max(len(conditions), 1)
    return moment_rows([data.sensors[cond == c] for c in range(n_cond)], centre)


@dataclass(frozen=True)
class Normaliser:
    """Per-condition z-scoring of sensors, from fleet-wide sums."""

    mean: np.ndarray  # (C, S)
    std: np.ndarray  # (C, S)
    conditions: np.ndarray

    @classmethod
    def from_sums(cls, sums: np.ndarray, conditions: np.ndarray) -> "Normaliser":
        sums = np.atleast_2d(np.asarray(sums, dtype=np.float64))
        count = sums[:, :1]
        if count.sum() <= 0:
            raise ValueError("normalisation statistics are empty: no gateway reported any data")
        every = pooled(sums)  # a condition seen once or never takes the fleet's pooled statistics
        mean = np.where(count > 1, centre_of(sums), centre_of(every))
        var = np.where(count > 1, variance(sums), variance(every))
        std = np.sqrt(np.maximum(var, 1e-12))
        std[std < 1e-6] = 1.0
        return cls(mean=mean, std=std, conditions=conditions)

    def apply(self, data: RunToFailure) -> np.ndarray:
        cond = assign_conditions(data.settings, self.conditions)
        return ((data.sensors - self.mean[cond]) / self.std[cond]).astype(np.float32)


def make_windows(
    data: RunToFailure, normaliser: Normaliser, window: int, rul_cap: int, last_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows ``(n, window, sensors)`` and RUL targets ``(n,)`` in cycles.

    A unit shorter than ``window`` is padded at the front with its first row. With
    ``last_only`` only the window ending at each unit's last row is kept (the
    C-MAPSS test protocol).
    """
    if data.rul is None:
        raise ValueError(f"{data.source}: no RUL labels; load with derive_rul or provide a RUL column")
    x = normaliser.apply(data)
    xs, ys = [], []
    boundaries = np.flatnonzero(np.diff(data.unit)) + 1
    for idx in np.split(np.arange(len(data)), boundaries):
        seq, rul = x[idx], np.minimum(data.rul[idx], rul_cap)
        if len(seq) < window:
            seq = np.concatenate([np.repeat(seq[:1], window - len(seq), axis=0), seq])
            rul = np.concatenate([np.repeat(rul[:1], window - len(rul)), rul])
        ends = [len(seq)] if last_only else range(window, len(seq) + 1)
        for end in ends:
            xs.append(seq[end - window : end])
            ys.append(rul[end - 1])
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.float32)
