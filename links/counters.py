"""``<run>/wire.json``: the wire bytes per gateway of a shaped fleet, from the launcher to the ServerApp.

The ServerApp does not read host interfaces; the launcher, which made the links
(``links/namespaces.py``), hands it their counters. With shaped links the launcher writes the
file before it submits the run, rewrites it about every 0.5 s while the run is live (so a
reading is up to that old), and once more after the run; it never exists
on loopback, under ``engine=sim`` or ``engine=remote``. Format (bytes since the link was made)::

    {"time": <unix time>, "gateways": {"<gateway index>": {"up": <bytes>, "down": <bytes>}}}

``up`` is what the gateway sent (received on the host side of its veth), ``down`` what it was
sent. The file is replaced atomically (a temporary file, then ``os.replace``), so a reader
sees the previous snapshot or the next, never half of one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

WIRE_FILE = "wire.json"


def write_wire(run_dir: Path, counters: Mapping[int, Mapping[str, int]], now: float | None = None) -> None:
    """Replace ``run_dir/wire.json`` with ``counters`` (gateway index -> {"up", "down"})."""
    record = {"time": time.time() if now is None else now,
              "gateways": {str(i): {"up": int(c["up"]), "down": int(c["down"])} for i, c in counters.items()}}
    path = Path(run_dir) / WIRE_FILE
    tmp = path.with_name(f".{WIRE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_wire(run_dir: Path) -> dict[int, dict[str, int]] | None:
    """Gateway index -> {"up", "down"} from ``run_dir/wire.json``; None when there is none (unshaped links)."""
    try:
        record = json.loads((Path(run_dir) / WIRE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {int(i): {"up": int(c["up"]), "down": int(c["down"])} for i, c in record.get("gateways", {}).items()}
