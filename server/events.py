"""What the user must see while a run goes on: a gateway that failed, and the ServerApp's own error.

The ServerApp appends one JSON line per event to ``RUN_DIR/events.jsonl``; ``iiotfl run``
prints each new one as it appears (``server/launch/run.py``), so a plant's bad data file
shows up in the terminal within seconds as one line naming the gateway and the reason,
not in a SuperNode log. A failed run's error in ``launch.json`` is the ServerApp's own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from iiotfl.privacy.ledger import read_jsonl

EVENTS = "events.jsonl"


def record(out: Path, kind: str, message: str, **fields: Any) -> None:
    """Append one event (``kind``: "gateway" or "error"); its message is one line."""
    line = " ".join(str(message).split())
    with (Path(out) / EVENTS).open("a") as fh:
        fh.write(json.dumps({"t": time.time(), "kind": kind, "message": line, **fields}) + "\n")


def gateway_failed(out: Path, node: int, partition: int | None, stage: str, reason: str) -> None:
    who = f"gateway {partition}" if partition is not None else f"gateway (node {node})"
    record(out, "gateway", f"{who}: {stage}: {reason}", node=node, partition=partition)


def read(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / EVENTS)


def last_error(run_dir: Path) -> str | None:
    """The ServerApp's error, if it recorded one."""
    errors = [e["message"] for e in read(run_dir) if e.get("kind") == "error"]
    return errors[-1] if errors else None
