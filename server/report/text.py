"""How the report writes a figure or a metric name: one cell of a table, one label of a plot.

``fmt``: ``None`` and ``""`` as ``-``, floats to 4 significant digits (thousands separated, no
decimals from 10^4 up). ``finite``: a real number the report can plot or compare (not a bool,
not inf/nan). Nothing here reads a file.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

METRIC_LABELS = {"rmse": "RMSE", "rmse_last": "RMSE last cycle", "phm_score": "PHM08 score", "pr_auc": "PR-AUC",
                 "roc_auc": "ROC AUC", "f1": "F1", "accuracy": "accuracy", "precision": "precision",
                 "recall": "recall"}


def finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean(values: list[Any]) -> float | None:
    """Mean of the finite numbers among ``values`` (None when there is none)."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def cell(value: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(fmt(value).split()).replace("|", "\\|")


def metric_label(name: str | None) -> str:
    """``rmse`` -> RMSE, ``pr_auc_machine`` -> PR-AUC machine; unknown names as they are."""
    if not name:
        return "metric"
    if name.startswith("personal-"):  # fleet.personalise_epochs: the plant's fine-tuned model
        return f"{metric_label(name[len('personal-'):])}, fine-tuned"
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    for prefix in ("pr_auc", "roc_auc", "f1", "rmse"):
        if name.startswith(prefix + "_"):
            return f"{METRIC_LABELS[prefix]} {name[len(prefix) + 1:].replace('_', ' ')}"
    return name


def direction(higher_is_better: bool | None) -> str:
    return "" if higher_is_better is None else ("higher is better" if higher_is_better else "lower is better")
