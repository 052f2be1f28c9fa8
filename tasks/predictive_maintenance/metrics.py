"""RUL metrics: RMSE and the PHM08 asymmetric score."""

from __future__ import annotations

import numpy as np


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(true)) ** 2)))


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    """Sum over units of exp(-d/13) - 1 for early and exp(d/10) - 1 for late predictions.

    ``d = predicted - true``: predicting failure too late (d > 0) costs more than
    too early, as in the PHM08 data challenge (Saxena et al. 2008).
    """
    d = np.asarray(pred, dtype=float) - np.asarray(true, dtype=float)
    return float(np.sum(np.where(d < 0, np.expm1(-d / 13.0), np.expm1(d / 10.0))))
