"""Labelled faults injected at known times into a held-out period.

Each event has a kind, a first row and a length (rows of one site, consecutive steps).
Events of one site never overlap and keep ``gap`` normal steps between them. Rows the
fault changed by more than a tolerance get the kind's label; rows of the event it did not
change (a power cap above what the turbine produced, a frozen value equal to the true one)
are left out of the scoring (label -1): they are neither normal nor detectable.

Kinds (what :func:`apply` does to the channel ``x`` over the event's rows):

* ``scale``  — x times a factor (underperformance: power scaled down; spike and level shift:
  load times a factor)
* ``cap``    — x capped at a value (derating: power limited below rated)
* ``freeze`` — x repeats its last value before the event (stuck sensor, stale meter values)
* ``ramp``   — x plus a linear ramp from 0 to ``amount`` (sensor drift)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iiotfl.tasks.energy_anomaly.data import IGNORED


@dataclass(frozen=True)
class Event:
    kind: str     # label name (data.KINDS)
    start: int    # first row
    length: int   # rows
    op: str       # scale | cap | freeze | ramp
    channel: str  # which raw channel it changes
    amount: float  # factor, cap, or ramp end (unused for freeze)


def schedule(rng: np.random.Generator, lo: int, hi: int, lengths: list[tuple[str, int]], gap: int,
             allowed: np.ndarray | None = None) -> list[tuple[str, int, int]]:
    """Non-overlapping (kind, start, length) in rows [lo, hi), ``gap`` rows apart, in random
    order and places; ``allowed`` (bool per row) keeps events inside rows that are True."""
    taken = np.zeros(hi, dtype=bool)
    out = []
    for kind, length in lengths:
        for _ in range(200):
            start = int(rng.integers(lo, max(lo + 1, hi - length)))
            a, b = max(lo, start - gap), min(hi, start + length + gap)
            if start + length > hi or taken[a:b].any():
                continue
            if allowed is not None and not allowed[start : start + length].all():
                continue
            taken[start : start + length] = True
            out.append((kind, start, length))
            break
    return sorted(out, key=lambda e: e[1])


def apply(x: np.ndarray, ev: Event) -> None:
    """Change channel ``x`` in place over the event's rows."""
    s, e = ev.start, ev.start + ev.length
    if ev.op == "scale":
        x[s:e] = x[s:e] * ev.amount
    elif ev.op == "cap":
        x[s:e] = np.minimum(x[s:e], ev.amount)
    elif ev.op == "freeze":
        before = x[:s][np.isfinite(x[:s])]
        x[s:e] = before[-1] if len(before) else x[s]
    elif ev.op == "ramp":
        x[s:e] = x[s:e] + np.linspace(0.0, ev.amount, e - s)
    else:
        raise ValueError(f"unknown fault operation {ev.op!r}")


def inject(channels: dict[str, np.ndarray], events: list[Event], label: np.ndarray, event_id: np.ndarray,
           tolerance: dict[str, float], codes: dict[str, int]) -> None:
    """Apply ``events`` to ``channels`` (in place) and write labels and event ids."""
    for i, ev in enumerate(events):
        x = channels[ev.channel]
        s, e = ev.start, ev.start + ev.length
        before = x[s:e].copy()
        apply(x, ev)
        changed = np.abs(x[s:e] - before) > tolerance[ev.channel]
        changed &= np.isfinite(before)
        label[s:e] = np.where(changed, codes[ev.kind], IGNORED)
        event_id[s:e] = i
