"""Scores for rare failure labels: PR-AUC (average precision) and F1 at a chosen threshold.

At ~3.4 % machine failures and 0.1-1.2 % per mode, accuracy says nothing (predicting
"no failure" everywhere scores 96.6 %), so the task reports per label:

* ``pr_auc_<label>``: average precision, the area under the precision-recall curve
  (step-wise, as scikit-learn's ``average_precision_score``); threshold-free. The
  majority-class baseline (a constant score) gets the label's prevalence.
* ``f1_<label>``: F1 at the decision threshold that maximises F1 on *calibration* records
  (the gateway's own training records for ClientApp-side evaluation; fresh records of
  the same plants for the server), never on the records being scored; with no positive
  among the calibration records the threshold is 0.5. The majority baseline's F1 is 0.

A label with no positive among the scored records has no defined F1 / PR-AUC: NaN.
"""

from __future__ import annotations

import numpy as np


def _curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold (descending) and the thresholds."""
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(t)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve (scikit-learn's definition); NaN without positives."""
    y, score = np.asarray(y).ravel(), np.asarray(score, dtype=np.float64).ravel()
    positives = float(y.sum())
    if positives == 0:
        return float("nan")
    tps, fps, _ = _curve(y, score)
    precision = tps / (tps + fps)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_threshold(y: np.ndarray, score: np.ndarray, default: float = 0.5) -> float:
    """The threshold (predict positive when score >= it) with the highest F1 on (y, score):
    half-way between the chosen score and the next lower one."""
    y, score = np.asarray(y).ravel(), np.asarray(score, dtype=np.float64).ravel()
    positives = float(y.sum())
    if positives == 0:
        return default
    tps, fps, thr = _curve(y, score)
    f1 = 2 * tps / (2 * tps + fps + (positives - tps))
    i = int(np.argmax(f1))
    return float((thr[i] + thr[i + 1]) / 2) if i + 1 < len(thr) else float(thr[i])


def f1_at(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """F1 of ``score >= threshold``; NaN when ``y`` has no positive."""
    y, pred = np.asarray(y).ravel().astype(bool), np.asarray(score).ravel() >= threshold
    if not y.any():
        return float("nan")
    tp = float(np.sum(pred & y))
    return 2 * tp / (2 * tp + float(np.sum(pred & ~y)) + float(np.sum(~pred & y)))


def nanmean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else float("nan")
