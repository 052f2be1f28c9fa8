"""Predictive maintenance: remaining useful life of machine units from sensor windows."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from iiotfl.configs import ConfigError, choice, integer, number, require
from iiotfl.tasks.heterogeneity import SKEWS, check_skews, skews
from iiotfl.tasks.predictive_maintenance.anonymise import anonymise, plant_key
from iiotfl.tasks.predictive_maintenance.data import Normaliser, RunToFailure, condition_sums, make_windows
from iiotfl.tasks.predictive_maintenance.generator import CONDITIONS, SENSORS, SETTINGS, generate_plant, truncate_units
from iiotfl.tasks.predictive_maintenance.loader import DataFormatError, from_table, load_cmapss, load_csv
from iiotfl.tasks.predictive_maintenance.metrics import phm08_score, rmse
from iiotfl.tasks.predictive_maintenance.model import RulCNN

DATA_SOURCES = ("generator", "csv", "cmapss")


class PredictiveMaintenance:
    """The task as the apps see it: data for a gateway, the model, the metrics.

    ``cfg`` is the ``task`` section of the run config (configs/task/predictive_maintenance.yaml).
    """

    name = "predictive_maintenance"
    primary_metric = "rmse"
    higher_is_better = False

    def __init__(self, cfg: Mapping[str, Any], seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.window = int(cfg["window"])
        self.rul_cap = int(cfg["rul_cap"])
        self.features = list(cfg.get("features") or SENSORS)
        self.conditions = CONDITIONS
        # how unlike the generated plants are (task.plants; 1 = the generator's own spreads)
        self.skews = skews(cfg.get("plants"), label_skew=1.0, feature_skew=1.0, quantity_skew=1.0)

    @staticmethod
    def validate(cfg: Mapping[str, Any]) -> None:
        """Check the task section of a run config; raise configs.ConfigError naming the key and the fix."""
        integer(cfg, "task.window", 2)
        integer(cfg, "task.rul_cap", 1)
        source = choice(cfg, "task.data.source", DATA_SOURCES)
        if source == "generator":
            low = integer(cfg, "task.data.units_min", 2)
            integer(cfg, "task.data.units_max", low)
            integer(cfg, "task.data.test_units", 1)
            if cfg["task"]["data"].get("test_plants") is not None:
                integer(cfg, "task.data.test_plants", 1)
            check_skews(cfg, SKEWS)
        elif not require(cfg, "task.data.path") and cfg["engine"]["name"] != "remote":  # remote: `gateway --data`
            raise ConfigError(
                f"config: task.data.path is empty but task.data.source={source}; give each gateway's file "
                "(\"{partition}\" is replaced by its partition id)"
            )
        number(cfg, "task.data.local_val_fraction", 0.0, 0.9)

    # -- data -------------------------------------------------------------------
    def _read(self, path: str, rul_path: str | None = None) -> RunToFailure:
        data_cfg = self.cfg["data"]
        if data_cfg["source"] == "cmapss":
            return load_cmapss(path, rul_path)
        csv_cfg = dict(data_cfg.get("csv") or {})
        return load_csv(path, **csv_cfg)

    def local_data(self, partition_id: int, node_config: Mapping[str, Any] | None = None) -> RunToFailure:
        """This gateway's records: generated for plant ``partition_id`` or read from its files."""
        data_cfg = self.cfg["data"]
        node_config = node_config or {}
        if data_cfg["source"] == "generator":
            data = generate_plant(
                self.seed,
                partition_id,
                units_min=int(data_cfg["units_min"]),
                units_max=int(data_cfg["units_max"]),
                rul_cap=self.rul_cap,
                label_skew=self.skews["label_skew"],
                feature_skew=self.skews["feature_skew"],
                quantity_skew=self.skews["quantity_skew"],
            )
        else:
            path = node_config.get("data-path") or str(data_cfg["path"]).format(partition=partition_id)
            # identifiers and exact times stop here, on the device (privacy/anonymise.py)
            data = anonymise(self._read(path), plant_key(node_config, partition_id))
        return data.select_sensors(self.features)

    def table_columns(self) -> tuple[list[str], list[str]]:
        """(required, optional) columns this run reads from a gateway's own table (clients/sources)."""
        return ["unit", "cycle", *self.features], ["rul", "failed", *SETTINGS]

    def from_table(self, table: dict[str, list], partition_id: int, node_config: Mapping[str, Any] | None = None,
                   source: str = "") -> RunToFailure:
        """A gateway's records from its own table (a described CSV export or its local store), anonymised."""
        data = from_table(table, self.features, settings=SETTINGS, source=source)
        return anonymise(data, plant_key(node_config or {}, partition_id)).select_sensors(self.features)

    def gateway_data(
        self, partition_id: int, node_config: Mapping[str, Any] | None = None, data: RunToFailure | None = None
    ) -> tuple[RunToFailure, RunToFailure]:
        """(train, validation) of a gateway (``data``: its records, else :meth:`local_data`'s): whole
        units held out for ClientApp-side evaluation."""
        data = self.local_data(partition_id, node_config) if data is None else data
        fraction = float(self.cfg["data"]["local_val_fraction"])
        if fraction > 0 and data.n_units >= 2:
            return data.split_units(fraction, self.seed + partition_id)
        return data, data

    def server_test_data(self, num_plants: int) -> RunToFailure | None:
        """Held-out units for server-side evaluation (None if the config names none).

        With the generator: fresh units of every plant, cut at a random point as in the
        C-MAPSS test files; of at most ``data.test_plants`` plants, evenly spread over the
        fleet (a 1000-gateway simulation would otherwise score 8000 units every round).
        """
        data_cfg = self.cfg["data"]
        if data_cfg["source"] == "generator":
            cap = int(data_cfg.get("test_plants") or num_plants)
            plants = sorted({int(i) for i in np.linspace(0, num_plants - 1, min(cap, num_plants))})
            parts = [
                generate_plant(self.seed, p, n_units=int(data_cfg["test_units"]), split="test", rul_cap=self.rul_cap,
                               label_skew=self.skews["label_skew"], feature_skew=self.skews["feature_skew"])
                for p in plants
            ]
            merged = _concat(parts)
            return truncate_units(merged, self.seed).select_sensors(self.features)
        if not data_cfg.get("test_path"):
            return None
        return self._read(str(data_cfg["test_path"]), data_cfg.get("test_rul_path")).select_sensors(self.features)

    def feature_sums(self, data: RunToFailure, centre: np.ndarray | None = None) -> np.ndarray:
        return condition_sums(data, self.conditions, centre)

    def normaliser(self, sums: np.ndarray) -> Normaliser:
        return Normaliser.from_sums(sums, self.conditions)

    def windows(self, data: RunToFailure, normaliser: Normaliser, last_only: bool = False):
        return make_windows(data, normaliser, self.window, self.rul_cap, last_only=last_only)

    # -- model and metrics ------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return RulCNN(n_sensors=len(self.features), window=self.window)

    def target(self, y: np.ndarray) -> np.ndarray:
        return y / self.rul_cap

    def loss(self) -> torch.nn.Module:
        return torch.nn.MSELoss()

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        model.eval()
        out = [model(torch.from_numpy(x[i : i + 4096])) for i in range(0, len(x), 4096)]
        return torch.cat(out).numpy() * self.rul_cap

    def evaluate(self, model: torch.nn.Module, data: RunToFailure, normaliser: Normaliser) -> dict[str, float]:
        """RMSE over all windows, and RMSE and PHM08 score at each unit's last cycle."""
        x, y = self.windows(data, normaliser)
        xl, yl = self.windows(data, normaliser, last_only=True)
        pred, pred_last = self.predict(model, x), self.predict(model, xl)
        return {
            "rmse": rmse(pred, y),
            "rmse_last": rmse(pred_last, yl),
            "phm_score": phm08_score(pred_last, yl),
            "num-examples": float(len(y)),
        }


def _concat(parts: list[RunToFailure]) -> RunToFailure:
    offset, units = 0, []
    for p in parts:
        units.append(p.unit + offset)
        offset += int(p.unit.max())
    first = parts[0]
    return RunToFailure(
        unit=np.concatenate(units),
        cycle=np.concatenate([p.cycle for p in parts]),
        settings=np.concatenate([p.settings for p in parts]),
        sensors=np.concatenate([p.sensors for p in parts]),
        rul=np.concatenate([p.rul for p in parts]),
        sensor_names=first.sensor_names,
        setting_names=first.setting_names,
        source="+".join(p.source for p in parts),
    )


__all__ = ["PredictiveMaintenance", "DataFormatError", "RunToFailure"]
