"""Quality control: which failure mode (if any) ends a milling process, from its sensor readings.

Records follow the AI4I 2020 predictive-maintenance data set (Matzka 2020; rules in
``tasks/quality_control/generator.py``): one row per process with product type, air and
process temperature, rotational speed, torque and tool wear; labels machine failure and
its five modes TWF, HDF, PWF, OSF, RNF. Each plant (gateway) runs its own product mix and
operating point.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from iiotfl.configs import ConfigError, choice, flag, integer, number, require
from iiotfl.tasks.heterogeneity import SKEWS, check_skews, skews
from iiotfl.tasks.quality_control import loader
from iiotfl.tasks.quality_control.data import Normaliser, feature_sums, make_samples
from iiotfl.tasks.quality_control.generator import (
    DERIVED,
    LABELS,
    MODES,
    SENSORS,
    TYPES,
    ProcessRecords,
    concat,
    generate_plant,
)
from iiotfl.tasks.quality_control.loader import DataFormatError, load_csv
from iiotfl.tasks.quality_control.metrics import average_precision, best_threshold, f1_at, nanmean
from iiotfl.tasks.quality_control.model import FailureMLP, MultiLabelBCE

DATA_SOURCES = ("generator", "csv")
IDENTIFIERS = ("UDI", "udi", "Product ID", "product_id")
PROCESS_MODES = ("TWF", "HDF", "PWF", "OSF")  # the modes the process data can explain (RNF is random)
# task.plants' operating-point shifts and their largest values (also once multiplied by feature_skew)
SHIFT_LIMITS = {"ambient_shift": 30.0, "cooling_shift": 5.0, "torque_shift": 30.0, "speed_shift": 0.5}


def available_features(derived: bool) -> tuple[str, ...]:
    return (*SENSORS, *(DERIVED if derived else ()), *(f"type_{t}" for t in TYPES))


class QualityControl:
    """The task as the apps see it: data for a gateway, the model, the metrics.

    ``cfg`` is the ``task`` section of the run config (configs/task/quality_control.yaml).
    """

    name = "quality_control"
    primary_metric = "pr_auc_machine"
    higher_is_better = True

    def __init__(self, cfg: Mapping[str, Any], seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.derived = bool(cfg.get("derived_features", False))
        self.all_features = available_features(self.derived)
        self.features = list(cfg.get("features") or self.all_features)
        self.hidden = int(cfg.get("hidden", 48))
        self.pos_weight = cfg.get("pos_weight")
        self.plants = dict(cfg.get("plants") or {})

    @staticmethod
    def validate(cfg: Mapping[str, Any]) -> None:
        """Check the task section of a run config; raise configs.ConfigError naming the key and the fix."""
        derived = flag(cfg, "task.derived_features")
        features = require(cfg, "task.features")
        if features is not None:
            names = available_features(derived)
            if not isinstance(features, (list, tuple)) or not features:
                raise ConfigError(f"config: task.features={features!r} is invalid; give a list of feature names "
                                  f"from {list(names)} or null for all")
            ids = [f for f in features if f in IDENTIFIERS]
            if ids:
                raise ConfigError(f"config: task.features names identifier(s) {ids}; identifiers are never model "
                                  f"features, remove them (choose from {list(names)})")
            unknown = [f for f in features if f not in names]
            if unknown:
                raise ConfigError(f"config: task.features has unknown name(s) {unknown}; choose from {list(names)}"
                                  + ("" if derived else " (power_W etc. need task.derived_features=true)"))
        integer(cfg, "task.hidden", 2, 4096)
        pos_weight = require(cfg, "task.pos_weight")
        if pos_weight is not None:
            number(cfg, "task.pos_weight", 0.0, 1e4, low_open=True)
        source = choice(cfg, "task.data.source", DATA_SOURCES)
        if source == "generator":
            low = integer(cfg, "task.data.rows_min", 10)
            integer(cfg, "task.data.rows_max", low)
            integer(cfg, "task.data.test_rows", 10)
            integer(cfg, "task.data.calibration_rows", 10)
            if require(cfg, "task.plants.mix_concentration") is not None:
                number(cfg, "task.plants.mix_concentration", 0.0, 1e6, low_open=True)
            knobs = check_skews(cfg, SKEWS)
            for key, high in SHIFT_LIMITS.items():
                shift = number(cfg, f"task.plants.{key}", 0.0, high)
                if shift * knobs["feature_skew"] > high:  # the shift a plant gets: e.g. speeds stay > 0
                    raise ConfigError(
                        f"config: task.plants.{key} × task.plants.feature_skew = {shift:g} × "
                        f"{knobs['feature_skew']:g} is invalid; their product must be <= {high:g} "
                        f"(lower task.plants.feature_skew to at most {high / shift:.3g})")
        elif not require(cfg, "task.data.path") and cfg["engine"]["name"] != "remote":  # remote: `gateway --data`
            raise ConfigError(
                f"config: task.data.path is empty but task.data.source={source}; give each gateway's file "
                "(\"{partition}\" is replaced by its partition id)"
            )
        number(cfg, "task.data.local_val_fraction", 0.0, 0.9)

    # -- data -------------------------------------------------------------------
    def _plant_kw(self) -> dict[str, Any]:
        p = self.plants
        return {
            "mix_concentration": p["mix_concentration"],
            "ambient_shift": float(p["ambient_shift"]),
            "cooling_shift": float(p["cooling_shift"]),
            "torque_shift": float(p["torque_shift"]),
            "speed_shift": float(p["speed_shift"]),
            **skews(p, label_skew=1.0, feature_skew=1.0),
        }

    def _select(self, data: ProcessRecords) -> ProcessRecords:
        if list(data.feature_names) == self.features:
            return data
        cols = [data.feature_names.index(f) for f in self.features]
        out = data.subset(np.arange(len(data)))
        out.features = data.features[:, cols]
        out.feature_names = tuple(self.features)
        out.calibration = None if data.calibration is None else self._select(data.calibration)
        return out

    def _generate(self, partition: int, split: str, n_rows: int | None = None) -> ProcessRecords:
        data_cfg = self.cfg["data"]
        return generate_plant(
            self.seed, partition, n_rows, rows_min=int(data_cfg["rows_min"]), rows_max=int(data_cfg["rows_max"]),
            split=split, derived=self.derived, **skews(self.plants, quantity_skew=1.0), **self._plant_kw(),
        )

    def _read(self, path: str, plant: int = -1) -> ProcessRecords:
        csv_cfg = dict(self.cfg["data"].get("csv") or {})
        sep = csv_cfg.pop("sep", ",") or ","
        return load_csv(path, derived=self.derived, sep=sep, plant=plant, columns=csv_cfg)

    def local_data(self, partition_id: int, node_config: Mapping[str, Any] | None = None) -> ProcessRecords:
        """This gateway's process records: generated for plant ``partition_id`` or read from its file."""
        data_cfg = self.cfg["data"]
        node_config = node_config or {}
        if data_cfg["source"] == "generator":
            data = self._generate(partition_id, "train")
        else:
            path = node_config.get("data-path") or str(data_cfg["path"]).format(partition=partition_id)
            data = self._read(path, partition_id)
        return self._select(data)

    export_names = loader.COLUMNS  # a plant's CSV export names the columns as the AI4I file does

    def table_columns(self) -> tuple[list[str], list[str]]:
        """(required, optional) columns this run reads from a gateway's own table (clients/sources)."""
        return list(loader.REQUIRED), list(loader.OPTIONAL)

    def from_table(self, table: dict[str, list], partition_id: int, node_config: Mapping[str, Any] | None = None,
                   source: str = "") -> ProcessRecords:
        """A gateway's process records from its own table (a described CSV export or its local store)."""
        return self._select(loader.from_table(table, derived=self.derived, plant=partition_id, source=source))

    def gateway_data(
        self, partition_id: int, node_config: Mapping[str, Any] | None = None, data: ProcessRecords | None = None
    ) -> tuple[ProcessRecords, ProcessRecords]:
        """(train, validation) (``data``: its records, else :meth:`local_data`'s): the plant's most recent
        processes are held out for ClientApp-side evaluation; their F1 thresholds are chosen on the
        training records."""
        data = self.local_data(partition_id, node_config) if data is None else data
        fraction = float(self.cfg["data"]["local_val_fraction"])
        if fraction > 0 and len(data) >= 4:
            train, val = data.split_recent(fraction)
        else:
            train, val = data, data.subset(np.arange(len(data)))
        val.calibration = train
        return train, val

    def server_test_data(self, num_plants: int) -> ProcessRecords | None:
        """Fresh processes of every plant for the server's evaluation, with another fresh set of
        the same plants (``calibration``) on which the F1 thresholds are chosen. None for csv
        without ``task.data.test_path``."""
        data_cfg = self.cfg["data"]
        if data_cfg["source"] == "generator":
            test = concat([self._generate(p, "test", int(data_cfg["test_rows"])) for p in range(num_plants)])
            test.calibration = concat(
                [self._generate(p, "calibration", int(data_cfg["calibration_rows"])) for p in range(num_plants)]
            )
            return self._select(test)
        if not data_cfg.get("test_path"):
            return None
        test = self._read(str(data_cfg["test_path"]))
        if data_cfg.get("calibration_path"):
            test.calibration = self._read(str(data_cfg["calibration_path"]))
        return self._select(test)

    def feature_sums(self, data: ProcessRecords, centre: np.ndarray | None = None) -> np.ndarray:
        return feature_sums(data, centre)

    def normaliser(self, sums: np.ndarray) -> Normaliser:
        return Normaliser.from_sums(sums, self.features)

    def windows(self, data: ProcessRecords, normaliser: Normaliser, last_only: bool = False):
        """(x, y): normalised features (n, F) float32 and labels (n, 6) — one process per sample,
        no time windows (``last_only`` changes nothing)."""
        return make_samples(data, normaliser)

    # -- model and metrics ------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return FailureMLP(n_features=len(self.features), hidden=self.hidden, n_labels=len(LABELS))

    def target(self, y: np.ndarray) -> np.ndarray:
        return y.astype(np.float32)

    def loss(self) -> torch.nn.Module:
        return MultiLabelBCE(pos_weight=None if self.pos_weight is None else float(self.pos_weight))

    @torch.no_grad()
    def logits(self, model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
        model.eval()
        out = [model(torch.from_numpy(x[i : i + 8192])) for i in range(0, len(x), 8192)]
        return torch.cat(out) if out else torch.zeros((0, len(LABELS)))

    def predict(self, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        """Probabilities (n, 6): machine failure, TWF, HDF, PWF, OSF, RNF."""
        return torch.sigmoid(self.logits(model, x)).numpy()

    def thresholds(self, model: torch.nn.Module, calibration: ProcessRecords | None,
                   normaliser: Normaliser) -> np.ndarray:
        """Per label, the F1-maximising threshold on ``calibration`` (0.5 without one)."""
        if calibration is None or len(calibration) == 0:
            return np.full(len(LABELS), 0.5)
        x, y = self.windows(calibration, normaliser)
        p = self.predict(model, x)
        return np.array([best_threshold(y[:, j], p[:, j]) for j in range(len(LABELS))])

    def evaluate(self, model: torch.nn.Module, data: ProcessRecords, normaliser: Normaliser) -> dict[str, float]:
        """Per label (machine, twf, hdf, pwf, osf, rnf): PR-AUC and F1 at the threshold chosen on
        ``data.calibration``; macro averages over TWF/HDF/PWF/OSF; prevalence of machine failure
        (the majority-class baseline's PR-AUC; its F1 is 0)."""
        x, y = self.windows(data, normaliser)
        z = self.logits(model, x)
        p = torch.sigmoid(z).numpy()
        thr = self.thresholds(model, data.calibration, normaliser)
        out: dict[str, float] = {}
        keys = ["machine", *[m.lower() for m in MODES]]
        for j, key in enumerate(keys):
            out[f"pr_auc_{key}"] = average_precision(y[:, j], p[:, j])
            out[f"f1_{key}"] = f1_at(y[:, j], p[:, j], thr[j])
        out["pr_auc_macro"] = nanmean([out[f"pr_auc_{m.lower()}"] for m in PROCESS_MODES])
        out["f1_macro"] = nanmean([out[f"f1_{m.lower()}"] for m in PROCESS_MODES])
        out["threshold_machine"] = float(thr[0])
        out["prevalence_machine"] = float(y[:, 0].mean()) if len(y) else float("nan")
        out["positives_machine"] = float(y[:, 0].sum())
        out["bce"] = float(MultiLabelBCE()(z, torch.from_numpy(y))) if len(y) else float("nan")  # unweighted
        out["num-examples"] = float(len(y))
        return out


__all__ = ["QualityControl", "DataFormatError", "ProcessRecords", "LABELS", "MODES"]
