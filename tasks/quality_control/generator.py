"""Milling-process records with the failure rules of the AI4I 2020 data set.

Matzka, S. (2020) "Explainable Artificial Intelligence for Predictive Maintenance
Applications", 3rd Int. Conf. on Artificial Intelligence for Industries (AI4I), IEEE,
pp. 69-74; data set description: UCI Machine Learning Repository, "AI4I 2020 Predictive
Maintenance Dataset" (id 601). The published set is itself synthetic: 10,000 processes,
each with a product of quality variant L/M/H, five sensor readings and five failure modes.
This module regenerates records from the published rules, so any number of plants can
be drawn, each at its own operating point.

Per process (one row), at the default operating point (:data:`AI4I`):

* product type L / M / H, 50 / 30 / 20 % as the UCI text says (the published file holds
  6000 / 2997 / 1003 rows; at 60 / 30 / 10 the rules below give TWF 41, OSF 115 per 10,000,
  further from the published counts than the text's mix). Product ids are the variant
  letter and a serial, as in the file (e.g. M14860).
* air temperature [K]: a random walk normalised to σ 2 K around 300 K (here a slowly
  mean-reverting walk, correlation length ~1000 processes, so a plant's record stays
  stationary);
* process temperature [K]: air temperature + 10 K + a second walk normalised to σ 1 K
  (correlation length ~10 processes);
* torque [Nm]: N(40, 10), no negative values;
* rotational speed [rpm]: follows the constant-power curve of the spindle drive,
  ``n = min(n_ref · (τ_ref / τ)^α, 2886)`` plus N(0, σ) noise. The UCI text says "calculated
  from a power of 2860 W"; taken literally (n = 2860 W / τ) that gives 683 rpm at 40 Nm,
  while the published column has mean 1539 rpm, σ 179, min 1168, max 2886 and falls with
  torque. n_ref = 1503 rpm at τ_ref = 40 Nm, α = 0.36 and σ = 20 rpm are set so the column
  statistics and the power- and heat-failure counts match the file (mean 1530, σ 163);
* tool wear [min]: H / M / L processes add 5 / 3 / 2 min to the tool in use; a new tool
  reads 0.

Failure modes (fixed physics; only the operating point differs between plants):

* TWF, tool wear failure: each tool has a life drawn uniformly in 200-240 min; the
  process that reaches it either ends the tool by a failure (probability 0.34: ~46 TWF
  rows of ~135 tool ends, the published count; the UCI text says 51 failures of 120 tool
  ends) or the tool is replaced before the process (it then runs on a new tool, wear 0);
* HDF, heat dissipation: process − air temperature < 8.6 K and speed < 1380 rpm;
* PWF, power: τ · ω < 3500 W or > 9000 W (ω in rad/s);
* OSF, overstrain: tool wear × torque > 11,000 / 12,000 / 13,000 minNm for L / M / H;
* RNF, random: 0.1 % of processes, independent of everything (not predictable by
  construction; the published file has 19 such rows, the text says 5, the rule gives ~10).

Machine failure = any of the five. Published counts (of 10,000): machine failure 339,
TWF 46, HDF 115, PWF 95, OSF 98, RNF 19. This generator at :data:`AI4I` (mean ± sd of 20
draws of 10,000): machine failure 358 ± 16, TWF 46 ± 4, HDF 115 ± 9, PWF 97 ± 11,
OSF 110 ± 8, RNF 10 ± 4 (``tests/unit/test_quality_control.py`` checks the ranges). OSF is
what the stated rule gives for N(40, 10) torque and uniformly worn tools; the file's
machine-failure flag is also 0 on most of its RNF rows, here it is always 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np

from iiotfl.tasks.heterogeneity import skewed_count, tilt

TYPES = ("L", "M", "H")
MODES = ("TWF", "HDF", "PWF", "OSF", "RNF")
LABELS = ("machine_failure", *MODES)  # label columns, in this order
SENSORS = (
    "air_temperature_K",
    "process_temperature_K",
    "rotational_speed_rpm",
    "torque_Nm",
    "tool_wear_min",
)
DERIVED = ("temperature_difference_K", "power_W", "strain_minNm")  # computed from the sensors

# the published counts per 10,000 processes (the AI4I 2020 file)
PUBLISHED_COUNTS = {"machine_failure": 339, "TWF": 46, "HDF": 115, "PWF": 95, "OSF": 98, "RNF": 19}

# failure rules (Matzka 2020; UCI description)
WEAR_ADD = np.array([2.0, 3.0, 5.0])  # min per process, L / M / H
OSF_LIMIT = np.array([11_000.0, 12_000.0, 13_000.0])  # minNm, L / M / H
TOOL_LIFE = (200.0, 240.0)  # min
HDF_DT, HDF_SPEED = 8.6, 1380.0  # K, rpm
PWF_LOW, PWF_HIGH = 3500.0, 9000.0  # W
SPEED_MAX = 2886.0  # rpm, the drive's limit (the published maximum)
SPLITS = {"train": 0, "test": 1, "calibration": 2}
_PLANT_SALT = 0x51C  # plant operating points draw from their own stream
MIN_ROWS = 10  # the fewest processes a generated plant records (task.plants.quantity_skew)


@dataclass(frozen=True)
class OperatingPoint:
    """How one plant runs its machine. :data:`AI4I` is the published data set's."""

    mix: tuple[float, float, float] = (0.5, 0.3, 0.2)  # product share L / M / H
    air_mean: float = 300.0  # K (ambient)
    air_sd: float = 2.0
    air_corr: float = 1000.0  # correlation length of the air-temperature walk, processes
    dt_mean: float = 10.0  # K, process − air temperature (cooling set-point)
    dt_sd: float = 1.0
    dt_corr: float = 10.0
    torque_mean: float = 40.0  # Nm
    torque_sd: float = 10.0
    speed_ref: float = 1503.0  # rpm at torque_ref on the drive's curve
    torque_ref: float = 40.0
    speed_exp: float = 0.36  # α of n = n_ref (τ_ref / τ)^α
    speed_noise: float = 20.0  # rpm
    twf_fail: float = 0.34  # share of tool ends that are failures (else: replaced in time)
    rnf: float = 0.001  # random failure probability per process

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


AI4I = OperatingPoint()


@dataclass
class ProcessRecords:
    """Rows of one plant (or several), in process order.

    ``features`` are the model's inputs only; ``udi`` and ``product_id`` are identifiers
    kept for traceability and never become features. ``labels`` columns follow
    :data:`LABELS`. ``calibration`` (optional) holds other records of the same plants on
    which the decision thresholds for F1 are chosen (see ``tasks/quality_control/metrics.py``).
    """

    features: np.ndarray  # (n, F) float64
    labels: np.ndarray  # (n, 6) int8
    product_type: np.ndarray  # (n,) 0 / 1 / 2 = L / M / H
    udi: np.ndarray  # (n,) int64
    product_id: np.ndarray  # (n,) str
    feature_names: tuple[str, ...]
    plant: np.ndarray  # (n,) partition id of the row's plant (-1: unknown)
    source: str = ""
    calibration: "ProcessRecords | None" = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.udi)

    def subset(self, index: np.ndarray) -> "ProcessRecords":
        return replace(
            self,
            features=self.features[index],
            labels=self.labels[index],
            product_type=self.product_type[index],
            udi=self.udi[index],
            product_id=self.product_id[index],
            plant=self.plant[index],
            calibration=None,
            extra=dict(self.extra),
        )

    def split_recent(self, fraction: float) -> tuple["ProcessRecords", "ProcessRecords"]:
        """(older processes, the most recent ``fraction``) — a time-ordered hold-out."""
        n = len(self)
        held = min(n - 1, max(1, int(round(n * fraction))))
        idx = np.arange(n)
        return self.subset(idx[: n - held]), self.subset(idx[n - held :])

    def counts(self) -> dict[str, int]:
        return {name: int(self.labels[:, i].sum()) for i, name in enumerate(LABELS)}


def concat(parts: list[ProcessRecords]) -> ProcessRecords:
    first = parts[0]
    return ProcessRecords(
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        product_type=np.concatenate([p.product_type for p in parts]),
        udi=np.concatenate([p.udi for p in parts]),
        product_id=np.concatenate([p.product_id for p in parts]),
        feature_names=first.feature_names,
        plant=np.concatenate([p.plant for p in parts]),
        source="+".join(p.source for p in parts),
    )


def _walk(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """A mean-reverting random walk (AR(1), correlation length ``corr``) normalised to
    mean 0 and σ 1 over the record, as the AI4I walks are."""
    phi = float(np.exp(-1.0 / max(corr, 1e-9)))
    eps = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = eps[0]
    scale = np.sqrt(1.0 - phi**2)
    # AR(1) by a linear filter: x_t = phi x_{t-1} + sqrt(1-phi^2) eps_t
    for t in range(1, n):
        x[t] = phi * x[t - 1] + scale * eps[t]
    sd = x.std()
    return (x - x.mean()) / (sd if sd > 0 else 1.0)


def simulate(n: int, rng: np.random.Generator, op: OperatingPoint = AI4I) -> dict[str, np.ndarray]:
    """``n`` consecutive processes of one machine at operating point ``op``: sensors, product
    type and the five failure modes (plus machine failure) as arrays."""
    if n < 2:
        raise ValueError(f"need at least 2 processes, got {n}")
    mix = np.asarray(op.mix, dtype=float)
    ptype = rng.choice(3, size=n, p=mix / mix.sum())
    air = op.air_mean + op.air_sd * _walk(rng, n, op.air_corr)
    process = air + op.dt_mean + op.dt_sd * _walk(rng, n, op.dt_corr)
    torque = np.maximum(rng.normal(op.torque_mean, op.torque_sd, n), 0.0)
    curve = np.minimum(op.speed_ref * (op.torque_ref / np.maximum(torque, 1.0)) ** op.speed_exp, SPEED_MAX)
    speed = np.round(np.maximum(curve + rng.normal(0.0, op.speed_noise, n), 1.0))
    torque = np.round(torque, 1)
    air, process = np.round(air, 1), np.round(process, 1)

    # tool wear: a tool runs until its life (U(200, 240) min) is reached; the process that
    # reaches it ends the tool by a failure (TWF) or the tool is replaced just before it
    add = WEAR_ADD[ptype]
    life_draws = rng.uniform(*TOOL_LIFE, size=n + 1)
    fail_draws = rng.random(n + 1)
    wear = np.zeros(n)
    twf = np.zeros(n, dtype=bool)
    current, tool, life = 0.0, 0, life_draws[0]
    for i in range(n):
        if current >= life:
            if fail_draws[tool] < op.twf_fail:
                twf[i] = True
                wear[i] = current
                tool += 1
                current, life = 0.0, life_draws[tool]
                continue  # the failed tool is replaced after this process
            tool += 1  # replaced in time: this process runs on a new tool
            current, life = 0.0, life_draws[tool]
        wear[i] = current
        current += add[i]

    omega = speed * 2.0 * np.pi / 60.0
    power = torque * omega
    hdf = ((process - air) < HDF_DT) & (speed < HDF_SPEED)
    pwf = (power < PWF_LOW) | (power > PWF_HIGH)
    osf = wear * torque > OSF_LIMIT[ptype]
    rnf = rng.random(n) < op.rnf
    modes = np.stack([twf, hdf, pwf, osf, rnf], axis=1)
    return {
        "type": ptype,
        "air": air,
        "process": process,
        "speed": speed,
        "torque": torque,
        "wear": wear,
        "modes": modes,
        "machine_failure": modes.any(axis=1),  # type: ignore[dict-item]  # numpy's stub: any(axis=) may be a scalar
    }


def plant_operating_point(
    seed: int,
    partition: int,
    *,
    base: OperatingPoint = AI4I,
    mix_concentration: float | None = 5.0,
    ambient_shift: float = 3.0,
    cooling_shift: float = 0.3,
    torque_shift: float = 4.0,
    speed_shift: float = 0.04,
    label_skew: float = 1.0,
    feature_skew: float = 1.0,
) -> OperatingPoint:
    """Plant ``partition``'s operating point: a pure function of (seed, partition).

    * product mix ~ Dirichlet(``mix_concentration`` · base mix) (None: the base mix);
    * ambient (air) temperature: base + U(±``ambient_shift``) K;
    * cooling: process − air set-point base + N(0, ``cooling_shift``) K;
    * torque set-point: base + U(±``torque_shift``) Nm (speed follows the drive's curve);
    * speed set-point: base × (1 + U(±``speed_shift``)).
    All zero / None: every plant runs at ``base`` (IID plants).

    ``label_skew`` scales how far a plant's drawn mix lies from the base mix (its log-share of
    each product type against the base mix × ``label_skew``; 0: the base mix everywhere): the
    variant decides how fast tools wear and where overstrain begins, so the mix sets a plant's
    TWF / OSF (and machine-failure) rates. ``feature_skew`` multiplies the four shifts (0: every
    plant at ``base``'s temperatures, torque and speed). Both 1: the data as drawn above, bit for bit.
    """
    rng = np.random.default_rng([int(seed), _PLANT_SALT, int(partition)])
    draws = rng.random(4)
    normal = rng.standard_normal()
    if feature_skew != 1.0:
        ambient_shift, cooling_shift = ambient_shift * feature_skew, cooling_shift * feature_skew
        torque_shift, speed_shift = torque_shift * feature_skew, speed_shift * feature_skew
    if mix_concentration:
        drawn = rng.dirichlet(float(mix_concentration) * np.asarray(base.mix, dtype=float))
        drawn = np.maximum(drawn, 1e-3)
        drawn = tilt(drawn / drawn.sum(), np.asarray(base.mix, dtype=float), label_skew)
        mix = cast(tuple[float, float, float], tuple(float(v) for v in drawn))  # one per product type
    else:
        mix = base.mix
    return replace(
        base,
        mix=mix,
        air_mean=base.air_mean + ambient_shift * (2 * draws[0] - 1),
        dt_mean=base.dt_mean + cooling_shift * normal,
        torque_mean=base.torque_mean + torque_shift * (2 * draws[1] - 1),
        speed_ref=base.speed_ref * (1 + speed_shift * (2 * draws[2] - 1)),
    )


def records(
    sim: dict[str, np.ndarray],
    *,
    derived: bool = False,
    plant: int = -1,
    udi_start: int = 1,
    serial_start: int = 10_000,
    source: str = "",
) -> ProcessRecords:
    """Arrays of :func:`simulate` as :class:`ProcessRecords` (features: the five sensors,
    the product type one-hot, and with ``derived`` the temperature difference, power and
    strain the failure rules act on)."""
    n = len(sim["type"])
    onehot = np.eye(3)[sim["type"]]
    cols = [sim["air"], sim["process"], sim["speed"], sim["torque"], sim["wear"]]
    names = list(SENSORS)
    if derived:
        cols += [sim["process"] - sim["air"], sim["torque"] * sim["speed"] * 2 * np.pi / 60,
                 sim["wear"] * sim["torque"]]
        names += list(DERIVED)
    features = np.column_stack([*cols, onehot])
    names += [f"type_{t}" for t in TYPES]
    labels = np.column_stack([sim["machine_failure"], sim["modes"]]).astype(np.int8)
    # product ids: the variant letter and a running serial per variant (AI4I style, e.g. M14860)
    serial = np.zeros(n, dtype=np.int64)
    for t in range(3):
        idx = np.flatnonzero(sim["type"] == t)
        serial[idx] = serial_start + 10_000 * t + np.arange(len(idx))
    product_id = np.array([f"{TYPES[t]}{s}" for t, s in zip(sim["type"], serial)])
    return ProcessRecords(
        features=features.astype(np.float64),
        labels=labels,
        product_type=sim["type"].astype(np.int64),
        udi=np.arange(udi_start, udi_start + n, dtype=np.int64),
        product_id=product_id,
        feature_names=tuple(names),
        plant=np.full(n, plant, dtype=np.int64),
        source=source,
    )


def generate_plant(
    seed: int,
    partition: int,
    n_rows: int | None = None,
    *,
    rows_min: int = 4000,
    rows_max: int = 8000,
    split: str = "train",
    derived: bool = False,
    quantity_skew: float = 1.0,
    **plant_kw: Any,
) -> ProcessRecords:
    """Records of plant ``partition``: deterministic per (seed, partition, split).

    The plant's record length is drawn in [rows_min, rows_max] unless ``n_rows`` is given;
    ``quantity_skew`` scales how unequal the plants' lengths are
    (:func:`~iiotfl.tasks.heterogeneity.skewed_count`: length ∝ draw^quantity_skew, the fleet's
    mean kept at (rows_min + rows_max) / 2, at least 10; 1: the draw itself).
    ``split`` selects an independent stream of the same plant (train / test / calibration).
    """
    op = plant_operating_point(seed, partition, **plant_kw)
    rng = np.random.default_rng([int(seed), int(partition), SPLITS[split]])
    if n_rows is None:
        n_rows = int(np.random.default_rng([int(seed), _PLANT_SALT, int(partition), 1])
                     .integers(rows_min, rows_max + 1))
        n_rows = skewed_count(n_rows, rows_min, rows_max, quantity_skew, floor=MIN_ROWS)
    sim = simulate(int(n_rows), rng, op)
    out = records(
        sim,
        derived=derived,
        plant=partition,
        udi_start=1 + 1_000_000 * SPLITS[split],
        serial_start=10_000 + 100_000 * (partition % 9),
        source=f"generator:plant-{partition}:{split}",
    )
    out.extra["operating_point"] = op.as_dict()
    return out
