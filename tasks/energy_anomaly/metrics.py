"""Detection metrics: PR-AUC, F1 at a threshold, detection delay, a persistence baseline."""

from __future__ import annotations

import numpy as np


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (scikit-learn's definition:
    sum over thresholds of precision x recall increment; tied scores form one threshold)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    labels = np.asarray(labels, dtype=bool)
    alarm = np.asarray(scores) > threshold
    tp = float(np.sum(alarm & labels))
    precision = tp / max(float(alarm.sum()), 1.0)
    recall = tp / max(float(labels.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall,
            "alarm_rate": float(alarm.mean()) if len(alarm) else 0.0}


def detection_delay(step: np.ndarray, label: np.ndarray, event: np.ndarray, scores: np.ndarray,
                    threshold: float) -> dict[str, float]:
    """Per injected event: steps from its first changed row (label > 0) to the first alarm
    (score > threshold) at or after it, within the event. An event never alarmed counts
    with its whole remaining length (censored). Means over events; events the fault never
    changed are not counted. ``step``, ``label``, ``event`` and ``scores`` are per window end."""
    delays, detected = [], []
    for eid in np.unique(event[event >= 0]):
        rows = np.flatnonzero(event == eid)
        changed = rows[label[rows] > 0]
        if len(changed) == 0:
            continue
        start = step[changed[0]]
        after = rows[step[rows] >= start]
        alarms = after[scores[after] > threshold]
        if len(alarms):
            delays.append(float(step[alarms[0]] - start))
            detected.append(1.0)
        else:
            delays.append(float(step[rows[-1]] - start + 1))
            detected.append(0.0)
    if not delays:
        return {"detection_delay": float("nan"), "events": 0.0, "events_detected": float("nan")}
    return {"detection_delay": float(np.mean(delays)), "events": float(len(delays)),
            "events_detected": float(np.mean(detected))}
