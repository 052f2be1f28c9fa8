"""Energy anomaly detection: abnormal operation of wind turbines or of metered sites.

Unsupervised: every gateway trains a small regressor on its own normal operation (wind
turbine: power from wind speed, temperature and wind direction — a power curve; smart
meter: load from the same hours of the previous days, temperature and the calendar). The
anomaly score of a step is the absolute residual between the measured and the predicted
quantity, relative to the typical residual of training-period windows with a similar
prediction, averaged over the last ``score_window`` steps; an alarm is a score above the
``threshold_quantile`` of the scores on fault-free training-period windows.

Data sources (``task.data.source``):

* ``scada`` — real 10-minute SCADA of ENGIE's La Haute Borne wind farm (4 Senvion MM82
  turbines, 2014-2015; Etalab Open Licence 2.0, data © ENGIE, shipped in NREL OpenOA's
  ``openoa`` wheel: ``pip install --no-deps openoa==3.2``). One turbine per gateway. Train
  on 2014 without flagged rows, evaluate on 2015. Labels: the data set's own availability
  and curtailment flags, and faults injected at known times in 2015 (``scada.py``):
  ``underperformance`` (power x 0.7-0.85, 1-3 days), ``stuck`` (wind speed or power frozen
  at its last value, 6-24 h), ``drift`` (wind speed plus a linear ramp to ±1.5-3 m/s, 2-5
  days), ``derating`` (power capped at 40-70 % of rated, 12-48 h).
* ``smart_meter`` — a generator of hourly smart-meter / substation load, one site per
  gateway, deterministic per (seed, site), any fleet size (``smart_meter.py``), with
  ``spike``, ``level_shift``, ``stale`` and ``drift`` anomalies.

Metrics (``evaluate``): PR-AUC (primary; average precision over every scored window of the
evaluation period), F1 / precision / recall at the threshold, detection delay (steps from
a fault's first changed row to the first alarm, mean over injected events, a missed event
counting its whole length), the share of events detected, and the same PR-AUC for the
persistence baseline (score |x_t - x_{t-1}| of the monitored quantity) and the prevalence
(PR-AUC of a constant score).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from iiotfl.configs import ConfigError, choice, integer, number, require
from iiotfl.tasks.energy_anomaly.data import (
    FLAG_KINDS,
    KINDS,
    TIME_FEATURES,
    EnergySeries,
    Normaliser,
    concat,
    feature_sums,
    make_windows,
    smooth,
)
from iiotfl.tasks.energy_anomaly.data import from_table as table_series
from iiotfl.tasks.energy_anomaly.metrics import detection_delay, f1_at, pr_auc
from iiotfl.tasks.energy_anomaly.model import ResidualMLP
from iiotfl.tasks.energy_anomaly.scada import TURBINES, ScadaUnavailable, turbine_series, zip_path
from iiotfl.tasks.energy_anomaly.smart_meter import FEATURES, generate_site
from iiotfl.tasks.heterogeneity import check_skews, skews

SOURCES = ("scada", "smart_meter")
# task.plants (smart_meter only): feature skew at the generator's own spread; every site its whole training
# period (quantity skew 0). No label skew: gateways train on normal operation only (unsupervised), the
# injected anomalies are only scored.
SITE_SKEW_DEFAULTS = {"feature_skew": 1.0, "quantity_skew": 0.0}
SITE_SKEWS = tuple(SITE_SKEW_DEFAULTS)


class EnergyAnomaly:
    """The task as the apps see it: data for a gateway, the model, the metrics.

    ``cfg`` is the ``task`` section of the run config (configs/task/energy_anomaly.yaml).
    """

    name = "energy_anomaly"
    primary_metric = "pr_auc"
    higher_is_better = True

    def __init__(self, cfg: Mapping[str, Any], seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.window = int(cfg["window"])
        self.hidden = int(cfg["hidden"])
        self.score_bins = int(cfg["score_bins"])
        self.quantile = float(cfg["threshold_quantile"])
        self.source = str(cfg["data"]["source"])
        self.score_window = int(cfg["data"][self.source]["score_window"])
        if self.source == "scada":
            self.features = ["wind_speed", "outdoor_temp", "wind_dir_sin", "wind_dir_cos"]
        else:
            self.features = list(FEATURES)

    @staticmethod
    def validate(cfg: Mapping[str, Any]) -> None:
        """Check the task section of a run config; raise configs.ConfigError naming the key and the fix."""
        integer(cfg, "task.window", 1, 144)
        integer(cfg, "task.hidden", 1, 4096)
        integer(cfg, "task.score_bins", 1, 1000)
        number(cfg, "task.threshold_quantile", 0.5, 0.99999)
        source = choice(cfg, "task.data.source", SOURCES)
        gateways = int(cfg["fleet"]["gateways"])
        knobs = check_skews(cfg, SITE_SKEWS)
        if source == "scada":
            moved = [f"task.plants.{k}={knobs[k]:g}" for k, v in SITE_SKEW_DEFAULTS.items() if knobs[k] != v]
            if moved:
                restore = " ".join(f"task.plants.{k}={v:g}" for k, v in SITE_SKEW_DEFAULTS.items())
                raise ConfigError(f"config: task.data.source=scada cannot take {', '.join(moved)} (real turbines: "
                                  "their differences are the farm's own); use task.data.source=smart_meter or "
                                  f"restore {restore}")
            integer(cfg, "task.data.scada.events_per_kind", 0, 10)  # 40 events fit in 2015
            integer(cfg, "task.data.scada.score_window", 1, 1000)
            if gateways > len(TURBINES):
                raise ConfigError(f"config: fleet.gateways={gateways} but task.data.source=scada has "
                                  f"{len(TURBINES)} turbines (one per gateway); set fleet.gateways<={len(TURBINES)} "
                                  "or use task.data.source=smart_meter")
            try:
                zip_path(require(cfg, "task.data.scada.zip"))
            except ScadaUnavailable as err:
                raise ConfigError(f"config: task.data.source=scada: {err}") from None
        else:
            integer(cfg, "task.data.smart_meter.train_days", 7)
            integer(cfg, "task.data.smart_meter.score_window", 1, 1000)
            per_kind = integer(cfg, "task.data.smart_meter.events_per_kind", 0, 100)
            integer(cfg, "task.data.smart_meter.test_days", max(1, 14 * per_kind))  # room for every event
            integer(cfg, "task.data.smart_meter.test_sites", 1)

    # -- data -------------------------------------------------------------------
    def _series(self, partition_id: int, node_config: Mapping[str, Any] | None = None) -> EnergySeries:
        data_cfg = self.cfg["data"]
        if self.source == "scada":
            scada = data_cfg["scada"]
            path = (node_config or {}).get("data-path") or scada.get("zip")
            return turbine_series(self.seed, int(partition_id), int(scada["events_per_kind"]), path)
        meter = data_cfg["smart_meter"]
        return generate_site(self.seed, int(partition_id), int(meter["train_days"]), int(meter["test_days"]),
                             int(meter["events_per_kind"]), **skews(self.cfg.get("plants"), **SITE_SKEW_DEFAULTS))

    def local_data(self, partition_id: int, node_config: Mapping[str, Any] | None = None) -> EnergySeries:
        """This gateway's records: its training period and its evaluation period with labelled faults."""
        return self._series(partition_id, node_config)

    def table_columns(self) -> tuple[list[str], list[str]]:
        """(required, optional) columns this run reads from a gateway's own table (clients/sources);
        time-of-day and day-of-week features come from the timestamp."""
        return ["timestamp", "target", *[f for f in self.features if f not in TIME_FEATURES]], ["label"]

    def from_table(self, table: dict[str, list], partition_id: int, node_config: Mapping[str, Any] | None = None,
                   source: str = "") -> EnergySeries:
        """A gateway's own series (a described CSV export or its local store), in steps of the source's
        length (10 minutes for turbines' SCADA, an hour for metered sites)."""
        step_s = 600.0 if self.source == "scada" else 3600.0
        fraction = float(self.cfg["data"].get("local_val_fraction") or 0.2)
        return table_series(table, self.features, step_s, fraction, site=partition_id, source=source)

    def gateway_data(
        self, partition_id: int, node_config: Mapping[str, Any] | None = None, data: EnergySeries | None = None
    ) -> tuple[EnergySeries, EnergySeries]:
        """(train, validation) (``data``: its series, else :meth:`local_data`'s): normal rows of the
        training period; everything (the training period calibrates the threshold, the evaluation
        period is scored)."""
        data = self.local_data(partition_id, node_config) if data is None else data
        return data.subset((data.period == 0) & (data.label == 0)), data

    def server_test_data(self, num_plants: int) -> EnergySeries:
        """Every turbine (scada), or up to ``smart_meter.test_sites`` sites spread over the fleet."""
        if self.source == "scada":
            sites = range(min(int(num_plants), len(TURBINES)))
        else:
            count = min(int(num_plants), int(self.cfg["data"]["smart_meter"]["test_sites"]))
            sites = np.unique(np.round(np.linspace(0, int(num_plants) - 1, count)).astype(int)).tolist()
        return concat([self._series(s) for s in sites])

    def feature_sums(self, data: EnergySeries, centre: np.ndarray | None = None) -> np.ndarray:
        return feature_sums(data, centre)

    def normaliser(self, sums: np.ndarray) -> Normaliser:
        return Normaliser.from_sums(sums)

    def windows(self, data: EnergySeries, normaliser: Normaliser, last_only: bool = False):
        """Inputs (n, window, features) and the normalised target at each window's end. With
        ``last_only``: the last window of each site only."""
        x, y, ends = make_windows(data, normaliser, self.window)
        if last_only and len(ends):
            last = np.r_[np.flatnonzero(np.diff(data.site[ends])), len(ends) - 1]
            return x[last], y[last]
        return x, y

    # -- model and metrics ------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return ResidualMLP(n_features=len(self.features), window=self.window, hidden=self.hidden)

    def target(self, y: np.ndarray) -> np.ndarray:
        return y  # windows() already z-scores the target with the fleet's statistics

    def loss(self) -> torch.nn.Module:
        return torch.nn.MSELoss()

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        model.eval()
        out = [model(torch.from_numpy(x[i : i + 8192])) for i in range(0, len(x), 8192)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)

    def scores(self, model: torch.nn.Module, data: EnergySeries, normaliser: Normaliser):
        """(anomaly score per window end, the rows they end at).

        The absolute residual is divided by the mean absolute residual of the fault-free
        training-period windows whose prediction falls in the same of ``score_bins`` quantile
        bins (a power curve is noisier at mid wind speeds than at rated power), then averaged
        over the last ``score_window`` steps."""
        x, y, ends = make_windows(data, normaliser, self.window)
        pred = self.predict(model, x)
        residual = np.abs(pred - y).astype(np.float64)
        calib = (data.period[ends] == 0) & (data.label[ends] == 0)
        if self.score_bins > 1 and calib.sum() >= 20 * self.score_bins:
            edges = np.quantile(pred[calib], np.linspace(0.0, 1.0, self.score_bins + 1)[1:-1])
            bins = np.digitize(pred, edges)
            spread = np.array([residual[calib & (bins == b)].mean() if (calib & (bins == b)).any() else np.nan
                               for b in range(self.score_bins)])
            spread = np.where(np.isfinite(spread) & (spread > 1e-6), spread, np.nanmean(spread))
            residual = residual / spread[bins]
        return smooth(data, ends, residual, self.score_window), ends

    def threshold(self, score: np.ndarray, data: EnergySeries, ends: np.ndarray) -> float:
        """The ``threshold_quantile`` of the scores of fault-free training-period windows (of the
        evaluation period's normal windows where the data hold no training period)."""
        lab, per = data.label[ends], data.period[ends]
        calib = score[(per == 0) & (lab == 0)]
        if len(calib) == 0:
            calib = score[(per == 1) & (lab == 0)]
        return float(np.quantile(calib, self.quantile)) if len(calib) else float("inf")

    def evaluate(self, model: torch.nn.Module, data: EnergySeries, normaliser: Normaliser) -> dict[str, float]:
        """PR-AUC, F1 at the threshold and detection delay on the evaluation period, with the
        persistence baseline's PR-AUC and the prevalence beside them."""
        score, ends = self.scores(model, data, normaliser)
        thr = self.threshold(score, data, ends)
        lab, per = data.label[ends], data.period[ends]
        scored = (per == 1) & (lab >= 0)
        truth = lab[scored] > 0
        out = {"pr_auc": pr_auc(truth, score[scored]), **f1_at(truth, score[scored], thr), "threshold": thr}
        injected = np.where(np.isin(lab, [KINDS.index(k) + 1 for k in FLAG_KINDS]), 0, lab)
        out.update(detection_delay(data.step[ends], injected, data.event[ends], score, thr))
        out["persistence_pr_auc"] = pr_auc(truth, persistence_scores(data, ends)[scored])
        out["prevalence"] = float(truth.mean()) if len(truth) else float("nan")
        normal = score[scored][~truth]
        out["score_normal"] = float(normal.mean()) if len(normal) else float("nan")
        for code in np.unique(lab[scored & (lab > 0)]):
            out[f"score_{KINDS[code - 1]}"] = float(score[scored & (lab == code)].mean())
        out["num-examples"] = float(scored.sum())
        return out


def persistence_scores(data: EnergySeries, ends: np.ndarray) -> np.ndarray:
    """The trivial baseline: |x_t - x_{t-1}| of the monitored quantity (0 without a previous step)."""
    prev = np.maximum(ends - 1, 0)
    ok = (ends > 0) & (data.site[prev] == data.site[ends]) & (data.step[ends] - data.step[prev] == 1)
    diff = np.abs(data.target[ends] - data.target[prev])
    return np.where(ok & np.isfinite(diff), diff, 0.0)


__all__ = ["EnergyAnomaly", "EnergySeries", "Normaliser", "persistence_scores"]
