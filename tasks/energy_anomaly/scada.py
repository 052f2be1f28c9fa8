"""Real SCADA of ENGIE's La Haute Borne wind farm (4 turbines, 10-minute data, 2014-2015).

Source: ENGIE, "La Haute Borne" open data (https://opendata-renewables.engie.com), as
shipped by NREL's OpenOA in ``examples/data/la_haute_borne.zip`` of the ``openoa`` wheel.
Licence: Etalab Open Licence 2.0 (Licence Ouverte 2.0); the data are ENGIE's. We read the
zip that ``pip install --no-deps openoa==3.2`` installs and never import openoa (its pins
of scikit-learn and pandas do not fit this project).

Files used: ``la-haute-borne-data-2014-2015.csv`` (per turbine and 10 minutes: pitch
``Ba_avg``, active power ``P_avg`` [kW], wind speed ``Ws_avg`` [m/s], outdoor temperature
``Ot_avg`` [°C], wind direction ``Wa_avg`` [deg], ...; local time with its UTC offset) and
``plant_data.csv`` (per 10 minutes, UTC: plant energy, ``availability_kwh`` and
``curtailment_kwh`` lost).

One turbine per gateway (partition 0..3). Model inputs per step: wind speed, outdoor
temperature (air density), sine and cosine of the wind direction (wakes of the other
turbines); target: active power per unit of rated power (2,050 kW, Senvion MM82).

The data set's own flags: a 10-minute interval with plant availability losses is labelled
``availability`` for the turbine(s) that were down in it (power <= 1 % of rated in wind
>= 4 m/s, or under half the median of the other turbines while they produce); one with
curtailment losses is labelled ``curtailment`` for every turbine. A turbine standing still
in wind outside any flag is left out of the scoring; missing rows are missing.
Training uses 2014 without flagged rows; 2015 is the evaluation period, with injected
faults (``tasks/energy_anomaly/__init__.py`` lists them).
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from iiotfl.tasks.energy_anomaly.data import IGNORED, EnergySeries, kind_code
from iiotfl.tasks.energy_anomaly.faults import Event, inject, schedule

OPENOA_VERSION = "3.2"
PIP_COMMAND = f"pip install --no-deps openoa=={OPENOA_VERSION}"
TURBINES = ("R80711", "R80721", "R80736", "R80790")
RATED_KW = 2050.0
STEP_MINUTES = 10
START = np.datetime64("2014-01-01T00:00")
STEPS = (np.datetime64("2016-01-01T00:00") - START).astype("timedelta64[m]").astype(int) // STEP_MINUTES
YEAR_2015 = (np.datetime64("2015-01-01T00:00") - START).astype("timedelta64[m]").astype(int) // STEP_MINUTES
SCADA_FILE = "la-haute-borne-data-2014-2015.csv"
PLANT_FILE = "plant_data.csv"
CHANNELS = ("ws", "p", "ot", "wa", "pitch")


class ScadaUnavailable(RuntimeError):
    """The La Haute Borne zip is not where it should be."""


def default_zip() -> Path | None:
    """``examples/data/la_haute_borne.zip`` of the installed openoa wheel (None: not installed)."""
    from importlib import metadata

    try:
        files = metadata.files("openoa") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "la_haute_borne.zip":
            return Path(str(f.locate()))
    return None


def zip_path(configured: str | None = None) -> Path:
    """The zip to read; raises ScadaUnavailable with the pip command when there is none."""
    path = Path(configured).expanduser() if configured else default_zip()
    if path is None or not path.is_file():
        where = str(path) if path is not None else "the openoa wheel is not installed"
        raise ScadaUnavailable(f"La Haute Borne SCADA zip not found ({where}); install it with `{PIP_COMMAND}` "
                               "or set task.data.scada.zip to la_haute_borne.zip")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("IIOTFL_CACHE") or Path.home() / ".cache" / "iiotfl")


def _parse(path: Path) -> dict[str, np.ndarray]:
    """Channels as (turbine, step) float32 arrays on the 10-minute UTC grid of 2014-2015, and the
    plant's availability / curtailment losses per step."""
    with zipfile.ZipFile(path) as zf:
        text = zf.read(SCADA_FILE).decode()
        plant = zf.read(PLANT_FILE).decode()
    text = re.sub(r",(?=,|\r?\n|$)", ",nan", text)  # missing values are empty fields
    dt = [("turbine", "U6"), ("time", "U25")] + [(c, "f8") for c in ("Ba", "P", "Ws", "Va", "Ot", "Ya", "Wa")]
    rows = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=dt)
    offset = np.where(np.char.endswith(rows["time"], "+02:00"), 120, 60)  # CET / CEST
    minutes = (rows["time"].astype("U19").astype("datetime64[m]") - START).astype(int) - offset
    step = minutes // STEP_MINUTES
    out = {c: np.full((len(TURBINES), STEPS), np.nan, dtype=np.float32) for c in CHANNELS}
    for i, name in enumerate(TURBINES):
        m = (rows["turbine"] == name) & (step >= 0) & (step < STEPS)
        s = step[m]
        out["ws"][i, s] = rows["Ws"][m]
        out["p"][i, s] = rows["P"][m] / RATED_KW
        out["ot"][i, s] = rows["Ot"][m]
        out["wa"][i, s] = rows["Wa"][m]
        out["pitch"][i, s] = rows["Ba"][m]
    pl = np.loadtxt(io.StringIO(plant), delimiter=",", skiprows=1,
                    dtype=[("time", "U25"), ("energy", "f8"), ("availability", "f8"), ("curtailment", "f8")])
    ps = (pl["time"].astype("U16").astype("datetime64[m]") - START).astype(int) // STEP_MINUTES
    keep = (ps >= 0) & (ps < STEPS)
    for key in ("availability", "curtailment"):
        arr = np.zeros(STEPS, dtype=np.float32)
        arr[ps[keep]] = pl[key][keep]
        out[key] = arr
    return out


@lru_cache(maxsize=2)
def load_farm(configured: str | None = None) -> dict[str, np.ndarray]:
    """The whole farm, parsed once and kept as .npz in ``$IIOTFL_CACHE`` (``~/.cache/iiotfl``)."""
    path = zip_path(configured)
    st = path.stat()
    cache = _cache_dir() / f"la_haute_borne-{st.st_size}-{int(st.st_mtime)}.npz"
    try:
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        pass
    data = _parse(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **data)  # type: ignore[arg-type]  # numpy's stub: a ** key could be allow_pickle
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home: parse again next time
    return data


def flags(farm: dict[str, np.ndarray], turbine: int) -> np.ndarray:
    """Label codes from the data set's own flags for one turbine: 0, availability, curtailment, or
    -1 (stands still in wind, no flag; or a flagged interval of the training year not its own)."""

    p, ws = farm["p"], farm["ws"]
    others = np.delete(np.arange(len(TURBINES)), turbine)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN intervals
        med = np.nanmedian(p[others], axis=0)
        stopped = (p[turbine] <= 0.01) & (ws[turbine] >= 4.0)
        below = (med >= 0.05) & (p[turbine] < 0.5 * med)
    plant_avail = farm["availability"] > 0
    plant_curt = farm["curtailment"] > 0
    label = np.zeros(STEPS, dtype=np.int8)
    label[stopped] = IGNORED
    label[(plant_avail | plant_curt) & (np.arange(STEPS) < YEAR_2015)] = IGNORED  # never train on them
    label[plant_avail & (stopped | below)] = kind_code("availability")
    label[plant_curt] = kind_code("curtailment")
    return label


# -- one turbine's series with injected faults --------------------------------------
FAULT_LENGTHS = {  # rows (10-minute steps): min, max
    "underperformance": (144, 432),  # 1-3 days
    "stuck": (36, 144),              # 6-24 h
    "drift": (288, 720),             # 2-5 days
    "derating": (72, 288),           # 12-48 h
}
TOLERANCE = {"ws": 0.2, "p": 0.01}  # a row counts as changed by a fault beyond these (m/s, per unit)


def fault_events(seed: int, turbine: int, events_per_kind: int, usable: np.ndarray):
    """The faults injected into ``turbine``'s 2015 (pure function of seed and turbine)."""

    rng = np.random.default_rng([seed, turbine, 0x5CADA])
    wanted = [(k, int(rng.integers(lo, hi + 1))) for k, (lo, hi) in FAULT_LENGTHS.items()
              for _ in range(events_per_kind)]
    events, stuck = [], 0
    for kind, start, length in schedule(rng, YEAR_2015, STEPS, wanted, gap=144, allowed=usable):
        if kind == "underperformance":  # power scaled down: soiled / iced blades, a degraded component
            events.append(Event(kind, start, length, "scale", "p", rng.uniform(0.7, 0.85)))
        elif kind == "stuck":  # a frozen sensor: the anemometer, or the power transducer
            events.append(Event(kind, start, length, "freeze", ("ws", "p")[stuck % 2], 0.0))
            stuck += 1
        elif kind == "drift":  # anemometer calibration drift: a linear ramp to ±1.5-3 m/s
            events.append(Event(kind, start, length, "ramp", "ws", rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 3.0)))
        else:  # derating: power capped at 40-70 % of rated
            events.append(Event(kind, start, length, "cap", "p", rng.uniform(0.4, 0.7)))
    return events


def turbine_series(seed: int, turbine: int, events_per_kind: int, configured_zip: str | None = None):
    """One turbine: 2014 (period 0) and 2015 (period 1, with injected faults), labelled."""

    if not 0 <= turbine < len(TURBINES):
        raise ValueError(f"La Haute Borne has {len(TURBINES)} turbines; partition {turbine} has none "
                         f"(use at most {len(TURBINES)} gateways with task.data.source=scada)")
    farm = load_farm(str(configured_zip) if configured_zip else None)
    ch = {c: farm[c][turbine].astype(np.float64) for c in ("ws", "p", "ot", "wa")}
    label = flags(farm, turbine)
    event = np.full(STEPS, -1, dtype=np.int32)
    usable = np.isfinite(ch["ws"]) & np.isfinite(ch["p"])
    events = fault_events(seed, turbine, events_per_kind, usable) if events_per_kind > 0 else []
    inject(ch, events, label, event, TOLERANCE, {k: kind_code(k) for k in FAULT_LENGTHS})
    ch["ws"] = np.maximum(ch["ws"], 0.0)  # a drifting anemometer still reads >= 0 (NaN stays NaN)
    wa = np.radians(ch["wa"])
    steps = np.arange(STEPS, dtype=np.int64)
    return EnergySeries(
        site=np.full(STEPS, turbine, dtype=np.int32), step=steps,
        inputs=np.column_stack([ch["ws"], ch["ot"], np.sin(wa), np.cos(wa)]), target=ch["p"],
        label=label, event=event, period=(steps >= YEAR_2015).astype(np.int8),
        feature_names=("wind_speed", "outdoor_temp", "wind_dir_sin", "wind_dir_cos"), target_name="power_pu",
        source=f"la_haute_borne:{TURBINES[turbine]}",
    )
