"""Normalisation statistics that stay exact at any offset: per group, (count, sum, M2).

Every task's ``feature_sums`` is a 2-D array, one row per group (an operating condition, or
the whole plant) laid out as ``[n, Σx (K columns), M2 (K columns)]``, where M2 is the sum of
squared deviations from *that row's own mean* (Welford's and Chan et al.'s form). Unlike
sums of squares, M2 keeps the deviation exact at any offset: a sensor reading 1e10 ± 1 has
M2/n = 1, where Σx²/n − mean² would give 0 or noise.

Rows of different gateways are merged with :func:`combine` (Chan et al.'s pairwise update),
which needs each gateway's statistics: the server has them when they travel in plaintext.
Under encrypted aggregation the server sees only sums, so the fleet takes two passes: the
summed counts and sums give the fleet's mean (:func:`centre_of`); each gateway then sends its
squared deviations from that shared centre (``feature_sums(data, centre)``), whose plain sum
:func:`recentre` turns into the fleet's M2 — additive, so it can be summed encrypted.
"""

from __future__ import annotations

import numpy as np


def moment_rows(groups: list[np.ndarray], centre: np.ndarray | None = None) -> np.ndarray:
    """One row per group of ``(n, K)`` values: ``[n, Σx, M2]`` about the group's own mean, or with
    ``centre`` (shape ``(len(groups), K)``) ``[n, Σx, Σ(x − centre)²]`` (the second pass)."""
    k = groups[0].shape[1] if groups else 0
    out = np.zeros((len(groups), 1 + 2 * k), dtype=np.float64)
    for g, x in enumerate(groups):
        x = np.asarray(x, dtype=np.float64)
        out[g, 0] = len(x)
        if not len(x):
            continue
        out[g, 1:1 + k] = x.sum(axis=0)
        about = x.mean(axis=0) if centre is None else np.asarray(centre, dtype=np.float64)[g]
        out[g, 1 + k:] = ((x - about) ** 2).sum(axis=0)
    return out


def _split(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sums = np.atleast_2d(np.asarray(sums, dtype=np.float64))
    k = (sums.shape[1] - 1) // 2
    return sums[:, :1], sums[:, 1:1 + k], sums[:, 1 + k:]


def centre_of(sums: np.ndarray) -> np.ndarray:
    """Each row's mean (0 for an empty row): the shared centre of the second pass."""
    n, s, _ = _split(sums)
    return np.where(n > 0, s / np.maximum(n, 1.0), 0.0)


def recentre(summed: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Summed second-pass rows (squared deviations from ``centre``) as ``[n, Σx, M2]``."""
    n, s, q = _split(summed)
    mean = centre_of(summed)
    m2 = np.maximum(q - n * (mean - np.asarray(centre, dtype=np.float64)) ** 2, 0.0)
    return np.concatenate([n, s, m2], axis=1)


def combine(parts: list[np.ndarray]) -> np.ndarray:
    """Merge the rows of several ``[n, Σx, M2]`` arrays of the same shape (Chan et al.)."""
    parts = [np.atleast_2d(np.asarray(p, dtype=np.float64)) for p in parts]
    if len({p.shape for p in parts}) != 1:
        raise ValueError(f"statistics of different shapes {sorted({p.shape for p in parts})}; every gateway "
                         "must run the same task with the same features")
    n = sum(_split(p)[0] for p in parts)
    s = sum(_split(p)[1] for p in parts)
    mean = np.where(n > 0, s / np.maximum(n, 1.0), 0.0)
    m2 = sum(_split(p)[2] + _split(p)[0] * (centre_of(p) - mean) ** 2 for p in parts)
    return np.concatenate([n, s, m2], axis=1)


def pooled(sums: np.ndarray) -> np.ndarray:
    """All rows of one array merged into one (e.g. every operating condition together)."""
    return combine([row[None, :] for row in np.atleast_2d(sums)])


def variance(sums: np.ndarray) -> np.ndarray:
    """Each row's population variance (0 for an empty row)."""
    n, _, m2 = _split(sums)
    return np.where(n > 0, m2 / np.maximum(n, 1.0), 0.0)
