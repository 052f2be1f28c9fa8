"""The industrial use cases. ``get_task`` turns the ``task`` config section into a task object."""

from __future__ import annotations

from typing import Any, Mapping

TASKS = ("predictive_maintenance",)


def get_task(task_cfg: Mapping[str, Any], seed: int):
    name = task_cfg["name"]
    if name == "predictive_maintenance":
        from tasks.predictive_maintenance import PredictiveMaintenance

        return PredictiveMaintenance(task_cfg, seed)
    raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
