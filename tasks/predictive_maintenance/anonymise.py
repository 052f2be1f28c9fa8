"""On-device preprocessing: nothing that identifies a plant, a machine or a person goes further.

Runs on the gateway right after its files are read, before any training or statistics:

* machine identifiers (unit serial numbers) become keyed pseudonyms, HMAC-SHA256 under a
  plant key that stays on the gateway (``plant-key-file`` in its node config, or a key
  created once under ``$IIOTFL_PLANT_KEYS``/``~/.iiotfl/plant-keys``, mode 0600); the same
  serial always maps to the same pseudonym inside a plant, never across plants;
* exact timestamps / operating hours become the cycle's position in its unit's life
  (1, 2, 3, ...), keeping order and nothing else;
* only the sensor columns the task needs are kept (``task.features``); identifier columns
  named in ``task.data.csv.drop`` (site, operator, ...) are never parsed at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from iiotfl.tasks.predictive_maintenance.data import RunToFailure


def plant_key(node_config: Mapping[str, Any], partition: int) -> bytes:
    """This plant's pseudonymisation key; created on first use, never sent anywhere."""
    path = node_config.get("plant-key-file")
    if path:
        key_path = Path(str(path))
        if not key_path.is_file():
            raise FileNotFoundError(f"plant key {key_path} (node config plant-key-file) does not exist; create it "
                                    "with 32 random bytes, e.g. `head -c 32 /dev/urandom > plant.key`")
    else:
        base = Path(os.environ.get("IIOTFL_PLANT_KEYS", Path.home() / ".iiotfl" / "plant-keys"))
        base.mkdir(parents=True, exist_ok=True)
        key_path = base / f"plant-{partition}.key"
        if not key_path.exists():
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    key = key_path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"plant key {key_path} is shorter than 16 bytes; use 32 random bytes")
    return key


def pseudonym(key: bytes, identifier: str) -> str:
    return "u-" + hmac.new(key, identifier.encode(), hashlib.sha256).hexdigest()[:16]


def anonymise(data: RunToFailure, key: bytes) -> RunToFailure:
    """Pseudonymous units, cycle positions instead of times, no side information."""
    unit = np.asarray(data.unit)
    names = data.extra.get("unit_ids") or {}
    pseudo = {u: pseudonym(key, str(names.get(int(u), u))) for u in np.unique(unit)}
    ids = {p: i + 1 for i, p in enumerate(sorted(pseudo.values()))}  # order carries no serial
    new_unit = np.array([ids[pseudo[u]] for u in unit])
    cycle = np.zeros(len(unit))
    for u in np.unique(unit):
        rows = np.nonzero(unit == u)[0]
        cycle[rows[np.argsort(data.cycle[rows], kind="stable")]] = np.arange(1, len(rows) + 1)
    order = np.lexsort((cycle, new_unit))
    return replace(
        data, unit=new_unit[order], cycle=cycle[order], settings=data.settings[order], sensors=data.sensors[order],
        rul=None if data.rul is None else data.rul[order], source="", extra={},
    )
