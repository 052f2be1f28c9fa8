"""Bring your own run-to-failure data: a documented CSV schema and NASA C-MAPSS text.

CSV schema (one row per unit and cycle, a header row first):

=============  =============================================================
column         meaning
=============  =============================================================
``unit``       machine identifier (number or serial string)
``cycle``      time index: cycle number, operating hours, or ISO timestamp
sensors        one numeric column per sensor (default: every other column)
settings       optional operating-setting columns (``settings=[...]``)
``rul``        optional remaining useful life label; derived when absent
=============  =============================================================

Column names and the separator are configurable (``task.data.csv`` in the config).
When RUL is absent the records are taken to be run-to-failure: the last row of a
unit is its failure, so ``RUL = rows after this one``.

C-MAPSS format: whitespace-separated, no header, 26 columns per row: unit, cycle,
three operating settings (altitude, Mach, throttle angle), 21 sensors ``s1``-``s21``.
Training files are run-to-failure; for a test file pass its ``RUL_FDxxx.txt`` so each
unit's labels count down to the given RUL at its last row.

Every problem raises :class:`DataFormatError` with one line naming the file, the
row and/or column, and the fix.
"""

from __future__ import annotations

import csv
import math
from datetime import datetime
from pathlib import Path

import numpy as np

from iiotfl.tasks.predictive_maintenance.data import RunToFailure

# C-MAPSS sensor numbers -> names (Saxena et al. 2008, Table 2).
CMAPSS_SENSORS: tuple[str, ...] = (
    "T2", "T24", "T30", "T50", "P2", "P15", "P30", "Nf", "Nc", "epr", "Ps30",
    "phi", "NRf", "NRc", "BPR", "farB", "htBleed", "Nf_dmd", "PCNfR_dmd", "W31", "W32",
)
CMAPSS_SETTINGS: tuple[str, ...] = ("altitude", "mach", "tra")


# No sensor, setting, time or label of a machine comes near this; a value beyond it is a broken export
# (1.8e308 passes float() and then overflows every plant's statistics to inf and NaN).
MAX_ABS = 1e12


class DataFormatError(ValueError):
    """A data file that cannot be used, with the place and the fix in one line."""


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{where}: value {text!r} is not a number; fix or remove that row") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{where}: value {text!r} is not finite; fix or remove that row")
    if abs(value) > MAX_ABS:
        raise DataFormatError(f"{where}: value {text!r} is out of range (|value| > {MAX_ABS:g}); fix or remove "
                              "that row")
    return value


def _time_value(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or abs(value) > MAX_ABS:
            raise DataFormatError(f"{where}: time value {text!r} is not a finite cycle number; fix that row")
        return value
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise DataFormatError(
            f"{where}: time value {text!r} is neither a number nor an ISO timestamp; fix that row"
        ) from None


def _assemble(
    path: Path,
    units: list[str],
    times: np.ndarray,
    settings: np.ndarray,
    sensors: np.ndarray,
    rul: np.ndarray | None,
    sensor_names: tuple[str, ...],
    setting_names: tuple[str, ...],
    first_row: int,
) -> RunToFailure:
    """Sort by unit then time, check each unit has two rows, derive RUL if needed."""
    def natural(name: str) -> tuple:
        try:
            return (0, float(name), name)
        except ValueError:
            return (1, 0.0, name)

    ids = {name: i + 1 for i, name in enumerate(sorted(set(units), key=natural))}
    unit_idx = np.array([ids[u] for u in units])
    order = np.lexsort((times, unit_idx))
    unit_idx, times = unit_idx[order], times[order]
    settings, sensors = settings[order], sensors[order]
    rul = None if rul is None else rul[order]
    counts = np.bincount(unit_idx)
    for name, uid in ids.items():
        if counts[uid] < 2:
            row = units.index(name) + first_row
            raise DataFormatError(
                f"{path}: unit {name!r} (row {row}) has only one row; a unit needs at least two cycles "
                "of history - remove it or add its records"
            )
    cycle = np.zeros(len(unit_idx), dtype=int)
    derived = np.zeros(len(unit_idx))
    for uid in ids.values():
        idx = np.flatnonzero(unit_idx == uid)
        cycle[idx] = np.arange(1, len(idx) + 1)
        derived[idx] = np.arange(len(idx) - 1, -1, -1)
    return RunToFailure(
        unit=unit_idx,
        cycle=cycle,
        settings=settings,
        sensors=sensors,
        rul=derived if rul is None else rul,
        sensor_names=sensor_names,
        setting_names=setting_names,
        source=str(path),
        extra={"unit_ids": {v: k for k, v in ids.items()}},
    )


def _csv_files(path: Path) -> list[Path]:
    """The CSV files of ``path``: the file itself, or every ``*.csv`` of a data directory in name order."""
    if path.is_dir():  # a gateway's data directory: every *.csv, one header, rows appended in name order
        files = sorted(path.glob("*.csv"))
        if not files:
            raise DataFormatError(f"{path}: no *.csv files in this data directory; export the plant's records "
                                  "there in the CSV schema of tasks/predictive_maintenance/loader.py")
        return files
    if path.is_file():
        return [path]
    raise DataFormatError(f"{path}: file not found; check task.data.path")


def csv_lines(file: Path, sep: str, encoding: str = "utf-8", sep_key: str = "task.data.csv.sep",
              ) -> list[tuple[int, list[str]]]:
    """The non-blank rows of one CSV file as (line, fields); a file that is not text in ``encoding`` or has
    a field beyond csv's limit (131,072 characters) is one line naming it (``sep_key``: where the
    separator is set, for the fix)."""
    try:
        with file.open(newline="", encoding=encoding) as fh:
            return [(n, r) for n, r in enumerate(csv.reader(fh, delimiter=sep), 1) if any(c.strip() for c in r)]
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{file}: not {encoding.upper()} text (it holds byte "
                              f"{err.object[err.start:err.start + 1]!r}); save it as {encoding.upper()}") from None
    except csv.Error as err:
        raise DataFormatError(f"{file}: not a readable CSV file ({err}); fix the file or {sep_key}") from None


def unsplit_header(fields: list[str], sep: str) -> bool:
    """Whether a header row is one field that another separator would have split: ``sep`` is wrong."""
    return len(fields) == 1 and sep not in fields[0] and any(s in fields[0] for s in ",;\t|")


def _read_rows(path: Path, sep: str) -> tuple[list[str], list[list[str]], list[tuple[Path, int]]]:
    """(header, rows with a placeholder first, (file, line) of every row) of every file of ``path``."""
    files = _csv_files(path)
    header: list[str] = []
    rows: list[list[str]] = [[]]
    where: list[tuple[Path, int]] = [(path, 1)]  # (file, line) of every row, for error messages
    for file in files:
        lines = csv_lines(file, sep)
        if not lines:
            raise DataFormatError(f"{file}: file is empty; it needs a header row and at least two rows per unit")
        first = [h.strip() for h in lines[0][1]]
        if unsplit_header(lines[0][1], sep):
            raise DataFormatError(
                f"{file}: header {lines[0][1][0]!r} was not split by separator {sep!r}; set task.data.csv.sep"
            )
        if header and first != header:
            raise DataFormatError(f"{file}: header {first} differs from {files[0].name}'s {header}; every file "
                                  "in a data directory needs the same columns")
        doubled = sorted({h for h in first if first.count(h) > 1})
        if doubled:
            raise DataFormatError(f"{file}: column {doubled[0]!r} appears twice in the header; rename or remove one")
        header = header or first
        rows += [r for _, r in lines[1:]]
        where += [(file, n) for n, _ in lines[1:]]
    return header, rows, where


def _columns(path: Path, header: list[str], unit: str, time: str, settings: list[str], sensors: list[str] | None,
             rul: str | None, drop: list[str] | None) -> tuple[list[str], bool]:
    """The sensor columns (all but unit, time, settings, RUL and ``drop`` when not named) and whether RUL is there."""
    has_rul = rul is not None and rul in header
    for col in [unit, time, *settings, *(sensors or [])]:
        if col not in header:
            raise DataFormatError(
                f"{path}: column {col!r} missing (header has {header}); rename it or set task.data.csv "
                "to the right column names"
            )
    if sensors is None:
        taken = {unit, time, *settings, *([rul] if has_rul and rul else []), *(drop or [])}
        sensors = [h for h in header if h not in taken]
    if not sensors:
        raise DataFormatError(f"{path}: no sensor columns besides {unit!r} and {time!r}; add sensor columns")
    return sensors, has_rul


def _no_repeated_cycles(units: list[str], times: np.ndarray, where: list[tuple[Path, int]], unit: str,
                        time: str) -> None:
    """Each (unit, time) once: a repeated row would be trained on twice and break the unit's RUL count."""
    seen: dict[tuple[str, float], int] = {}
    for i, key in enumerate(zip(units, times.tolist())):
        if key in seen:
            (f0, l0), (f1, l1) = where[seen[key] + 1], where[i + 1]
            raise DataFormatError(f"{f1}: row {l1} repeats {unit} {key[0]!r} at {time} {key[1]:g} "
                                  f"({f0.name} row {l0}); remove the duplicate")
        seen[key] = i


def load_csv(
    path: str | Path,
    *,
    unit: str = "unit",
    time: str = "cycle",
    sensors: list[str] | None = None,
    settings: list[str] | None = None,
    rul: str | None = "rul",
    sep: str = ",",
    drop: list[str] | None = None,
) -> RunToFailure:
    """Load run-to-failure records in the CSV schema above (``drop``: columns never read).

    ``path`` may be a directory: every ``*.csv`` in it (same header) is read, in name order,
    as one table, so a plant can append a file a day and units may span files."""
    path = Path(path)
    header, rows, where = _read_rows(path, sep)
    settings = list(settings or [])
    sensors, has_rul = _columns(path, header, unit, time, settings, sensors, rul, drop)
    if len(rows) < 3:
        raise DataFormatError(f"{path}: only {len(rows) - 1} data row(s); need at least two rows per unit")
    col = {h: i for i, h in enumerate(header)}
    units: list[str] = []
    times = np.zeros(len(rows) - 1)
    sens = np.zeros((len(rows) - 1, len(sensors)))
    sets = np.zeros((len(rows) - 1, len(settings)))
    ruls = np.zeros(len(rows) - 1) if has_rul else None
    for i, r in enumerate(rows[1:]):
        file, line = where[i + 1]
        if len(r) != len(header):
            raise DataFormatError(
                f"{file}: row {line} has {len(r)} fields, header has {len(header)}; fix that row or set "
                "task.data.csv.sep"
            )
        units.append(r[col[unit]].strip())
        times[i] = _time_value(r[col[time]], f"{file}: row {line}, column {time!r}")
        for j, name in enumerate(sensors):
            sens[i, j] = _number(r[col[name]], f"{file}: row {line}, column {name!r}")
        for j, name in enumerate(settings):
            sets[i, j] = _number(r[col[name]], f"{file}: row {line}, column {name!r}")
        if ruls is not None and rul is not None:
            ruls[i] = _number(r[col[rul]], f"{file}: row {line}, column {rul!r}")
            if ruls[i] < 0:
                raise DataFormatError(f"{file}: row {line}, column {rul!r}: remaining useful life {r[col[rul]]!r} "
                                      "is negative; fix that row or leave the column out to derive it")
    _no_repeated_cycles(units, times, where, unit, time)
    return _assemble(path, units, times, sets, sens, ruls, tuple(sensors), tuple(settings), first_row=2)


def _failed_units(table: dict[str, list], source: str) -> dict[str, list]:
    """The records of the units that have failed (``failed`` non-zero), up to their first failure."""
    rows = table.get("_row") or [f"{source}: record {i + 1}" for i in range(len(table["unit"]))]
    units = [str(u).strip() for u in table["unit"]]
    times = [_time_value(str(v), f"{rows[i]}, column 'cycle'") for i, v in enumerate(table["cycle"])]
    failed = [_number(str(v), f"{rows[i]}, column 'failed'") for i, v in enumerate(table["failed"])]
    end: dict[str, float] = {}
    for u, t, f in zip(units, times, failed):
        if f and t < end.get(u, math.inf):
            end[u] = t
    if not end:
        raise DataFormatError(f"{source}: no unit has failed yet (signal 'failed' is 0 on all {len(units)} records); "
                              "training starts once one has run to failure")
    keep = [i for i, (u, t) in enumerate(zip(units, times)) if u in end and t <= end[u]]
    counts = {u: sum(units[i] == u for i in keep) for u in end}
    keep = [i for i in keep if counts[units[i]] >= 2]  # a unit the store saw only the failure of
    return {c: [v[i] for i in keep] for c, v in table.items() if c != "failed"}


def from_table(table: dict[str, list], sensors: list[str], *, settings: tuple[str, ...] = (),
               source: str = "") -> RunToFailure:
    """Run-to-failure records from columns (a gateway's CSV export or local store, already mapped to
    this schema's names): ``unit``, ``cycle`` (number or ISO time), each of ``sensors``, optionally
    ``rul``, ``failed`` and the ``settings`` present in ``table``.

    Without ``rul`` each unit's last record is taken as its failure (a run-to-failure export). With
    ``failed`` (non-zero on the record at which a unit failed: a live plant's units are still running)
    only the units that have failed are kept, up to their failure."""
    missing = [c for c in ("unit", "cycle", *sensors) if c not in table]
    if missing:
        raise DataFormatError(f"{source}: no signal for {missing} (predictive maintenance needs unit, cycle and "
                              f"the run's sensors {sensors}); map them in the gateway's data description")
    if "failed" in table and "rul" not in table:
        table = _failed_units(table, source)
    n = len(table["unit"])
    if n < 2:
        raise DataFormatError(f"{source}: only {n} record(s); need at least two cycles per unit")
    rows = table.get("_row") or [f"{source}: record {i + 1}" for i in range(n)]  # tasks.ROW

    def where(i: int, c: str) -> str:
        return f"{rows[i]}, column {c!r}"

    units = [str(u).strip() for u in table["unit"]]
    times = np.array([_time_value(str(v), where(i, "cycle")) for i, v in enumerate(table["cycle"])])
    settings = tuple(s for s in settings if s in table)

    def numbers(cols) -> np.ndarray:
        out = np.zeros((n, len(cols)))
        for j, c in enumerate(cols):
            for i, v in enumerate(table[c]):
                out[i, j] = _number(str(v), where(i, c))
        return out

    rul = numbers(["rul"])[:, 0] if "rul" in table else None
    if rul is not None and (rul < 0).any():
        raise DataFormatError(f"{source}: record {int(np.argmax(rul < 0)) + 1}, signal 'rul': remaining useful life "
                              "is negative; fix it or leave rul out to derive it")
    places = [(Path(r.partition(": row ")[0]), int(r.rpartition(" ")[2]) if ": row " in r else i + 1)
              for i, r in enumerate(rows)]
    _no_repeated_cycles(units, times, [(Path(source), 1), *places], "unit", "cycle")
    return _assemble(Path(source), units, times, numbers(settings), numbers(sensors), rul, tuple(sensors), settings,
                     first_row=1)


def load_cmapss(path: str | Path, rul_file: str | Path | None = None) -> RunToFailure:
    """Load a C-MAPSS ``train_FDxxx.txt`` / ``test_FDxxx.txt`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found; check task.data.path")
    lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataFormatError(f"{path}: file is empty; a C-MAPSS file has 26 whitespace-separated columns")
    values = np.zeros((len(lines), 26))
    for i, fields in enumerate(lines):
        if len(fields) != 26:
            raise DataFormatError(
                f"{path}: row {i + 1} has {len(fields)} columns, C-MAPSS has 26 (unit, cycle, 3 settings, "
                "21 sensors); is this the right file?"
            )
        for j, text in enumerate(fields):
            name = ("unit", "cycle", *CMAPSS_SETTINGS, *CMAPSS_SENSORS)[j]
            values[i, j] = _number(text, f"{path}: row {i + 1}, column {j + 1} ({name})")
    units = [str(int(u)) for u in values[:, 0]]
    data = _assemble(
        path, units, values[:, 1], values[:, 2:5], values[:, 5:], None,
        CMAPSS_SENSORS, CMAPSS_SETTINGS, first_row=1,
    )
    if rul_file is not None:
        rul_path = Path(rul_file)
        if not rul_path.is_file():
            raise DataFormatError(f"{rul_path}: RUL file not found; check task.data.rul_path")
        rul_lines = [ln.strip() for ln in rul_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        finals = [_number(t, f"{rul_path}: row {i + 1}") for i, t in enumerate(rul_lines)]
        if len(finals) != data.n_units:
            raise DataFormatError(
                f"{rul_path}: {len(finals)} RUL values for {data.n_units} units in {path}; use the RUL file "
                "that belongs to this test file"
            )
        data.rul = data.rul + np.asarray(finals)[data.unit - 1]
    return data


def save_csv(data: RunToFailure, path: str | Path, sep: str = ",") -> None:
    """Write records in the CSV schema (unit, cycle, settings, sensors, rul)."""
    path = Path(path)
    header = ["unit", "cycle", *data.setting_names, *data.sensor_names] + (["rul"] if data.rul is not None else [])
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow(header)
        for i in range(len(data)):
            row = [int(data.unit[i]), int(data.cycle[i]), *data.settings[i].tolist(), *data.sensors[i].tolist()]
            if data.rul is not None:
                row.append(float(data.rul[i]))
            w.writerow(row)
