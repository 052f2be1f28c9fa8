"""The industrial use cases. ``get_task`` turns the ``task`` config section into a task object.

Every task is one package under ``tasks/`` with one class the apps drive the same way
(:class:`Task` states the contract): the ServerApp asks it for the held-out data, the
model and the metrics; each ClientApp asks it for its gateway's records, turns them
into (x, y) with the fleet-wide normaliser, and trains with the task's loss.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Protocol

import numpy as np
import torch

# a table's optional column naming each record's place ("day-2.csv: row 14") for error messages
ROW = "_row"

# config name -> "module:Class"
TASKS = {
    "predictive_maintenance": "iiotfl.tasks.predictive_maintenance:PredictiveMaintenance",
    "energy_anomaly": "iiotfl.tasks.energy_anomaly:EnergyAnomaly",
    "quality_control": "iiotfl.tasks.quality_control:QualityControl",
}


class Task(Protocol):
    """What the ServerApp, the ClientApps, the audits and the report use of a task.

    ``cfg`` is the ``task`` section of the run config (``configs/task/<name>.yaml``).
    Data objects are the task's own; only the task looks inside them.
    """

    name: str
    primary_metric: str      # key of evaluate()'s dict that the report and sweeps compare
    higher_is_better: bool   # False for errors (RMSE), True for scores (F1, PR-AUC)

    def __init__(self, cfg: Mapping[str, Any], seed: int) -> None: ...

    def local_data(self, partition_id: int, node_config: Mapping[str, Any] | None = None) -> Any:
        """All records of gateway ``partition_id`` (generated, or read from its files)."""

    def gateway_data(self, partition_id: int, node_config: Mapping[str, Any] | None = None,
                     data: Any | None = None) -> tuple[Any, Any]:
        """(train, validation) of a gateway: of ``data``, else of :meth:`local_data`."""

    def table_columns(self) -> tuple[list[str], list[str]]:
        """(required, optional) column names this run reads from a gateway's own table: what a
        gateway's data description (``clients/sources``) must map, and may."""

    def from_table(self, table: dict[str, list], partition_id: int, node_config: Mapping[str, Any] | None = None,
                   source: str = "") -> Any:
        """A gateway's records from columns named as :meth:`table_columns` says (values as text or
        numbers); a missing or malformed column raises ValueError naming it and ``source``."""

    def server_test_data(self, num_plants: int) -> Any | None:
        """Held-out data for the server-side evaluation of the global model (None: none)."""

    def feature_sums(self, data: Any, centre: np.ndarray | None = None) -> np.ndarray:
        """A 2-D array of per-group (count, sums, M2) a gateway contributes to the fleet-wide
        normalisation (:mod:`iiotfl.tasks.moments`); merged over gateways with ``moments.combine``,
        or with ``centre`` (the fleet's mean) summed as they are (securely when HE is on)."""

    def normaliser(self, sums: np.ndarray) -> Any:
        """The normaliser built from the fleet's merged ``feature_sums``."""

    def windows(self, data: Any, normaliser: Any, last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs (float32) and labels of ``data``."""

    def build_model(self) -> torch.nn.Module: ...

    def target(self, y: np.ndarray) -> np.ndarray:
        """Labels as the loss sees them (e.g. scaled)."""

    def loss(self) -> torch.nn.Module:
        """The training criterion (mean over the batch; Opacus needs a mean or sum reduction)."""

    def predict(self, model: torch.nn.Module, x: np.ndarray) -> np.ndarray: ...

    def evaluate(self, model: torch.nn.Module, data: Any, normaliser: Any) -> dict[str, float]:
        """Metrics of ``model`` on ``data``, ``primary_metric`` and ``num-examples`` among them."""


def task_class(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(task_cfg: Mapping[str, Any], seed: int) -> Task:
    return task_class(task_cfg["name"])(task_cfg, seed)
