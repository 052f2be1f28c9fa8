"""Fleet-wide normalisation of process records and the (x, y) the model sees.

A gateway contributes ``feature_sums`` — one row of (count, sums, sums of squares) of
its feature columns — to the fleet's statistics; the fleet adds them up (securely under
strategy=he) and every gateway z-scores with the fleet-wide mean and deviation
(:class:`Normaliser`), so no plant's own statistics are seen. Tabular rows need no time
windows: each process is one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iiotfl.tasks.moments import centre_of, moment_rows, pooled, variance
from iiotfl.tasks.quality_control.generator import ProcessRecords

# Nominal centre and spread of each feature (the AI4I operating point). Sums are taken of
# (x - centre) / spread, so they stay small (a plant of 10^5 processes sums squares of ~10^5,
# not of power in W: ~4·10^12, the limit of strategy=he's fixed-point secure sum) and the
# fleet-wide variance loses no precision. Results do not depend on these values.
REFERENCE = {
    "air_temperature_K": (300.0, 2.0),
    "process_temperature_K": (310.0, 1.5),
    "rotational_speed_rpm": (1500.0, 180.0),
    "torque_Nm": (40.0, 10.0),
    "tool_wear_min": (110.0, 64.0),
    "temperature_difference_K": (10.0, 1.0),
    "power_W": (6300.0, 1000.0),
    "strain_minNm": (4400.0, 3000.0),
}


def reference(names: tuple[str, ...] | list[str]) -> tuple[np.ndarray, np.ndarray]:
    centre = np.array([REFERENCE.get(n, (0.0, 1.0))[0] for n in names])
    spread = np.array([REFERENCE.get(n, (0.0, 1.0))[1] for n in names])
    return centre, spread


def feature_sums(data: ProcessRecords, centre: np.ndarray | None = None) -> np.ndarray:
    """(count, sum, M2) of every feature column, in reference units (:data:`REFERENCE`):
    shape (1, 1 + 2F) (:mod:`iiotfl.tasks.moments`)."""
    ref, spread = reference(data.feature_names)
    return moment_rows([(data.features - ref) / spread], centre)


@dataclass(frozen=True)
class Normaliser:
    """z-scoring of every feature with the fleet-wide mean and deviation."""

    mean: np.ndarray  # (F,), in the features' own units
    std: np.ndarray  # (F,)

    @classmethod
    def from_sums(cls, sums: np.ndarray, names: tuple[str, ...] | list[str]) -> "Normaliser":
        sums = np.atleast_2d(np.asarray(sums, dtype=np.float64))
        f = (sums.shape[1] - 1) // 2
        if f != len(names):
            raise ValueError(f"the fleet's statistics have {f} feature columns, this task uses {len(names)}; every "
                             "gateway must use the same task.features / task.derived_features")
        sums = pooled(sums)
        if sums[0, 0] <= 0:
            raise ValueError("normalisation statistics are empty: no gateway reported any data")
        mean, var = centre_of(sums)[0], variance(sums)[0]
        centre, spread = reference(names)
        std = np.sqrt(np.maximum(var, 0.0)) * spread
        std[std < 1e-6 * spread] = 1.0  # a constant column (e.g. a product type no plant makes)
        return cls(mean=centre + mean * spread, std=std)

    def apply(self, data: ProcessRecords) -> np.ndarray:
        if data.features.shape[1] != len(self.mean):
            raise ValueError(
                f"{data.source}: {data.features.shape[1]} feature columns but the fleet's statistics have "
                f"{len(self.mean)}; every gateway must use the same task.features / task.derived_features"
            )
        return ((data.features - self.mean) / self.std).astype(np.float32)


def make_samples(data: ProcessRecords, normaliser: Normaliser) -> tuple[np.ndarray, np.ndarray]:
    """Normalised features (n, F) float32 and the labels (n, 6) float32: machine failure, then
    TWF, HDF, PWF, OSF, RNF."""
    return normaliser.apply(data), data.labels.astype(np.float32)
