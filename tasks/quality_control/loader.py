"""A plant's own process records as CSV, in the column layout of the published AI4I 2020 file.

Header (names configurable through ``task.data.csv``):

``UDI, Product ID, Type, Air temperature [K], Process temperature [K], Rotational speed [rpm],
Torque [Nm], Tool wear [min], Machine failure, TWF, HDF, PWF, OSF, RNF``

``UDI`` and ``Product ID`` are identifiers: read for traceability on the gateway, never model
features. ``Machine failure`` may be absent (then: any of the five modes). The UCI file
itself can be read as it is. A malformed file stops with one line naming the file, the
row or column and the fix.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from iiotfl.tasks.predictive_maintenance.loader import DataFormatError
from iiotfl.tasks.quality_control.generator import MODES, TYPES, records

COLUMNS = {
    "udi": "UDI",
    "product_id": "Product ID",
    "type": "Type",
    "air": "Air temperature [K]",
    "process": "Process temperature [K]",
    "speed": "Rotational speed [rpm]",
    "torque": "Torque [Nm]",
    "wear": "Tool wear [min]",
    "machine_failure": "Machine failure",
    **{m.lower(): m for m in MODES},
}


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataFormatError(f"{where}: value {text!r} is not a number; fix or remove that row") from None


def load_csv(path: str | Path, *, derived: bool = False, sep: str = ",", plant: int = -1,
             columns: dict[str, Any] | None = None) -> Any:
    """Read one plant's records (see the module docstring) as ProcessRecords."""
    path = Path(path)
    names = {**COLUMNS, **{k: v for k, v in (columns or {}).items() if v}}
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found; set task.data.path (\"{{partition}}\" = the gateway's "
                              "partition id) or the gateway's node config data-path")
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter=sep)
        header = next(reader, None)
        if not header:
            raise DataFormatError(f"{path}: empty file; export the plant's process records with a header row")
        header = [h.strip() for h in header]
        optional = {"udi", "product_id", "machine_failure"}
        missing = [names[k] for k in names if k not in optional and names[k] not in header]
        if missing:
            raise DataFormatError(f"{path}: column(s) {missing} missing (have {header}); rename them or set "
                                  "task.data.csv.<key>=<your column name>")
        col = {k: header.index(names[k]) for k in names if names[k] in header}
        rows = [r for r in reader if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataFormatError(f"{path}: {len(rows)} data row(s); a gateway needs at least 2 process records")
    table = {k: [r[col[k]] if col[k] < len(r) else None for r in rows] for k in col}
    short = next((i for i, r in enumerate(rows) if len(r) < len(header)), None)
    if short is not None:
        raise DataFormatError(f"{path}, row {short + 2}: {len(rows[short])} fields, header has {len(header)}; "
                              "fix that row")
    return from_table(table, derived=derived, plant=plant, source=str(path),
                      where=lambda i, k: f"{path}, row {i + 2}, column {names[k]!r}")


# the columns of a plant's process record, by their keys in COLUMNS (a gateway's data description maps them)
REQUIRED = ("type", "air", "process", "speed", "torque", "wear")
OPTIONAL = ("udi", "product_id", "machine_failure", *[m.lower() for m in MODES])


def from_table(table: dict[str, list], *, derived: bool = False, plant: int = -1, source: str = "",
               where=None) -> Any:
    """ProcessRecords from columns keyed as in ``COLUMNS`` (values as text or numbers): a CSV file's or a
    gateway's local store's. ``where(i, key)`` names row ``i``'s value in an error (default: the source)."""
    rows = table.get("_row")  # tasks.ROW: each record's file and row
    where = where or (lambda i, k: f"{rows[i] if rows else f'{source}: record {i + 1}'}, column {k!r}")
    missing = [k for k in REQUIRED if k not in table]
    if missing:
        raise DataFormatError(f"{source}: no {missing} (quality control needs {list(REQUIRED)}); map them in the "
                              "gateway's data description")
    n = len(table["type"])
    if n < 2:
        raise DataFormatError(f"{source}: {n} process record(s); a gateway needs at least 2")
    ptype = np.zeros(n, dtype=np.int64)
    vals = {k: np.zeros(n) for k in ("air", "process", "speed", "torque", "wear", "machine_failure",
                                     *[m.lower() for m in MODES])}
    for i, raw in enumerate(table["type"]):
        letter = str(raw).strip().upper()
        if letter not in TYPES:
            raise DataFormatError(f"{where(i, 'type')}: {letter!r} is not a product type L/M/H; fix that row")
        ptype[i] = TYPES.index(letter)
    for k in vals:
        for i, raw in enumerate(table.get(k) or ()):
            vals[k][i] = _number(str(raw).strip(), where(i, k))
    modes = np.stack([vals[m.lower()] for m in MODES], axis=1) > 0
    failure = vals["machine_failure"] > 0 if "machine_failure" in table else modes.any(axis=1)
    sim: dict[str, np.ndarray] = {
        "type": ptype, "air": vals["air"], "process": vals["process"], "speed": vals["speed"],
        "torque": vals["torque"], "wear": vals["wear"], "modes": modes,
        "machine_failure": failure}  # type: ignore[dict-item]  # numpy's stub: any(axis=) may be a scalar
    out = records(sim, derived=derived, plant=plant, source=source)
    if "udi" in table:
        out.udi = np.array([int(_number(str(v), where(i, "udi"))) for i, v in enumerate(table["udi"])],
                           dtype=np.int64)
    if "product_id" in table:
        out.product_id = np.array([str(v).strip() for v in table["product_id"]])
    return out


def write_csv(data: Any, path: str | Path) -> None:
    """ProcessRecords as an AI4I-layout CSV file (the generator's records as a plant would export them)."""
    f = {name: data.features[:, i] for i, name in enumerate(data.feature_names)}
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(COLUMNS.values()))
        for i in range(len(data)):
            w.writerow([int(data.udi[i]), data.product_id[i], TYPES[int(data.product_type[i])],
                        f"{f['air_temperature_K'][i]:.1f}", f"{f['process_temperature_K'][i]:.1f}",
                        f"{f['rotational_speed_rpm'][i]:.0f}", f"{f['torque_Nm'][i]:.1f}",
                        f"{f['tool_wear_min'][i]:.0f}", *[int(v) for v in data.labels[i]]])
