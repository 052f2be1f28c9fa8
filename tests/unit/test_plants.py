"""Is the global model good for every plant? The spread of the plants' own figures for the final model, and
where it shows: report.md's "Per plant" (a row per gateway: its class, held-out examples, metrics; the worst
and median plant) and the sweep table's worst and median plant.

Fast: :func:`plant_spread` on hand-made replies (both metric directions, ties, odd and even counts, missing
values) and the report and sweep table on run directories written by hand. The ServerApp's final evaluation
against a scripted grid: ``tests/unit/test_first_metric.py``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from iiotfl.configs import ConfigError, compose
from iiotfl.server.app import evaluate_plants
from iiotfl.server.checks import validate
from iiotfl.server.plants import plant_spread
from iiotfl.server.report import run_summary, write_report, write_summary

PER_GATEWAY = [
    {"node": 11, "partition": 0, "rmse": 12.0, "rmse_last": 8.0, "phm_score": 300.0, "num-examples": 40.0},
    {"node": 12, "partition": 1, "rmse": 41.5, "rmse_last": 30.0, "phm_score": 5000.0, "num-examples": 10.0},
    {"node": 13, "partition": 2, "rmse": 20.0, "rmse_last": 11.0, "phm_score": 700.0, "num-examples": 30.0},
    {"node": 14, "partition": 3, "rmse": 30.0, "rmse_last": 21.0, "phm_score": 2100.0, "num-examples": 20.0},
]


# --- the spread ------------------------------------------------------------------------------------


def test_an_error_has_its_worst_plant_at_the_top_and_an_even_count_a_median_between_two():
    s = plant_spread(PER_GATEWAY, "rmse", higher_is_better=False)
    assert s == {"metric": "rmse", "higher_is_better": False, "gateways": 4,
                 "worst": {"value": 41.5, "partition": 1, "node": 12},
                 "median": {"value": 25.0, "partitions": [2, 3]},
                 "best": {"value": 12.0, "partition": 0, "node": 11}}


def test_a_score_has_its_worst_plant_at_the_bottom_and_an_odd_count_a_median_plant():
    per = [{"node": 1, "partition": 0, "pr_auc": 0.8}, {"node": 2, "partition": 1, "pr_auc": 0.3},
           {"node": 3, "partition": 2, "pr_auc": 0.55}]
    s = plant_spread(per, "pr_auc", higher_is_better=True)
    assert s is not None
    assert (s["worst"]["value"], s["worst"]["partition"]) == (0.3, 1)
    assert s["median"] == {"value": 0.55, "partitions": [2]}
    assert (s["best"]["value"], s["best"]["partition"], s["gateways"]) == (0.8, 0, 3)
    # the same figures read as errors: the other way round
    s = plant_spread(per, "pr_auc", higher_is_better=False)
    assert s is not None and (s["worst"]["partition"], s["best"]["partition"]) == (0, 1)


def test_ties_name_the_lower_partition_and_a_plant_without_the_metric_is_left_out():
    per = [{"node": 9, "partition": 2, "rmse": 30.0}, {"node": 8, "partition": 1, "rmse": 30.0},
           {"node": 7, "partition": 0, "rmse": 10.0}, {"node": 6, "partition": 3, "rmse": 10.0},
           {"node": 5, "partition": 4, "rmse": math.nan}, {"node": 4, "partition": 5, "f1": 0.3},
           {"node": 3, "partition": 6, "rmse": True}]
    s = plant_spread(per, "rmse", higher_is_better=False)
    assert s is not None and s["gateways"] == 4
    assert s["worst"]["partition"] == 1 and s["best"]["partition"] == 0
    # worst first, ties by partition: 1, 2 (30), 0, 3 (10); the middle two are 2 and 0
    assert s["median"] == {"value": 20.0, "partitions": [0, 2]}
    assert plant_spread(per[4:], "rmse", higher_is_better=False) is None
    assert plant_spread([], "rmse", higher_is_better=True) is None
    one = plant_spread(per[:1], "rmse", higher_is_better=False)
    assert one is not None and one["worst"] == one["best"] and one["median"] == {"value": 30.0, "partitions": [2]}


# --- report.md and the sweep table ------------------------------------------------------------------


def make_run(root: Path, name: str, gateway_evaluation: dict | None, *, evaluation: str = "server",
             final_metric: float | None = 20.0) -> Path:
    """A completed run directory whose rounds recorded each gateway's class (link/device) and whose metrics.json
    has the plants' evaluation of the final model."""
    run = root / name
    run.mkdir(parents=True)
    classes = {0: "lte_m/gateway", 1: "nb_iot/sensor", 2: "lte_m/gateway", 3: "satellite/gateway"}
    rows = [{"round": i, "time": 2.0 * i, "round_time": 2.0 if i else 0.0,
             "server": {"rmse": v, "num-examples": 50.0} if evaluation == "server" else {},
             "clients": [{"partition": g, "bytes-up": 1000, "bytes-down": 1000} for g in range(4)] if i else [],
             "gateways": [{"partition": g, "node": 11 + g, "class": classes[g], "status": "aggregated"}
                          for g in range(4)] if i else []}
            for i, v in enumerate([90.0, 40.0, 20.0])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"task": "predictive_maintenance", "primary_metric": "rmse", "higher_is_better": False, "rounds": rows,
             "privacy": {"mechanism": "none", "checks": []}, "evaluation": evaluation, "final_metric": final_metric}
    if gateway_evaluation is not None:
        final["gateway_evaluation"] = gateway_evaluation
    (run / "metrics.json").write_text(json.dumps(final))
    (run / "launch.json").write_text(json.dumps({"engine": "sim", "gateways": 4, "status": "completed",
                                                 "wall_s": 30.0}))
    return run


def gateway_evaluation(per_gateway: list[dict], failed: list[dict] | None = None, spread: bool = True) -> dict:
    g = {"round": 2, "asked": len(per_gateway) + len(failed or []), "gateways": len(per_gateway),
         "metrics": {"rmse": 22.0, "num-examples": 100.0}, "per_gateway": per_gateway, "failed": failed or []}
    if spread:
        g["spread"] = plant_spread(per_gateway, "rmse", False)
    return g


def section(report: str) -> list[str]:
    return report.split("## Per plant\n")[1].split("\n## ")[0].strip().splitlines()


def test_report_has_a_row_per_plant_and_names_the_worst_and_median_plant(tmp_path):
    failed = [{"node": 15, "partition": 4, "reason": "no reply within fleet.round_timeout (600 s)"}]
    run = make_run(tmp_path, "srv", gateway_evaluation(PER_GATEWAY, failed))
    report = write_report(run).read_text()
    lines = section(report)
    assert lines[0].startswith("The final global model (round 2) scored by each gateway on its own held-out data")
    assert "The run's metric above is the server's held-out test set; these are each plant's own figures." in lines[0]
    table = [x for x in lines if x.startswith("|")]
    assert table[0] == "| gateway | class | held-out examples | RMSE ↓ | RMSE last cycle | PHM08 score |"
    assert table[2:] == [
        "| 0 | lte_m/gateway | 40 | 12 | 8 | 300 |",
        "| 1 | nb_iot/sensor | 10 | **41.5** | 30 | 5,000 |",  # the worst plant
        "| 2 | lte_m/gateway | 30 | 20 | 11 | 700 |",
        "| 3 | satellite/gateway | 20 | 30 | 21 | 2,100 |",
    ]
    assert ("Across the plants: worst RMSE 41.5 (gateway 1), median 25 (the mean of gateways 2 and 3), best 12 "
            "(gateway 0), over 4 plants.") in lines
    assert "No figures from: gateway 4: no reply within fleet.round_timeout (600 s)." in lines
    # the headline: the run's metric is still the server's; the plants' spread beside it
    assert "- global RMSE (lower is better): 90 (initial) → 20 (final)" in report
    assert "- evaluation: the server's held-out test set, after every round" in report
    assert ("- per plant (the final model on each gateway's own held-out data): worst RMSE 41.5 (gateway 1), "
            "median 25 (the mean of gateways 2 and 3), best 12 (gateway 0), over 4 plants") in report
    assert report.index("## Per plant") < report.index("## Rounds")


def test_report_of_a_run_without_a_server_test_set_and_of_one_written_before_the_spread(tmp_path):
    run = make_run(tmp_path, "gw", gateway_evaluation(PER_GATEWAY[:3], spread=False), evaluation="gateways",
                   final_metric=22.0)
    lines = section(write_report(run).read_text())
    assert "The run's metric above is their mean weighted by held-out examples." in lines[0]
    assert ("Across the plants: worst RMSE 41.5 (gateway 1), median 20 (gateway 2), best 12 (gateway 0), over 3 "
            "plants.") in lines  # computed from per_gateway: metrics.json had no spread
    assert run_summary(run)["plant_worst"] == 41.5


def test_no_section_without_a_per_plant_evaluation(tmp_path):
    report = write_report(make_run(tmp_path, "off", None)).read_text()
    assert "## Per plant" not in report and "- per plant" not in report


def test_sweep_rows_carry_the_worst_and_median_plant(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "0", gateway_evaluation(PER_GATEWAY))
    make_run(root, "1", None)  # fleet.evaluate_plants=false: blank
    make_run(root, "2", gateway_evaluation(PER_GATEWAY[:3], spread=False), evaluation="gateways", final_metric=22.0)
    csv_path, md_path = write_summary(root)
    lines = [x for x in md_path.read_text().splitlines() if x.startswith("| ")]
    head, *rows = [[c.strip() for c in x.strip().strip("|").split(" | ")] for x in lines]
    worst, median = head.index("worst plant"), head.index("median plant")
    assert head[head.index("final") + 1: head.index("final") + 3] == ["worst plant", "median plant"]
    assert [(r[worst], r[median]) for r in rows] == [("41.5", "25"), ("-", "-"), ("41.5", "20")]
    assert "Worst / median plant: the same metric for the final model" in md_path.read_text()
    got = list(csv.DictReader(csv_path.open()))
    assert [(r["plant_worst"], r["plant_worst_partition"], r["plant_median"], r["plant_best"], r["plants"])
            for r in got] == [("41.5", "1", "25.0", "12.0", "4"), ("", "", "", "", ""), ("41.5", "1", "20.0", "12.0", "3")]


def test_fleet_evaluate_plants_is_a_flag_true_by_default():
    cfg = compose()
    assert cfg["fleet"]["evaluate_plants"] is True and evaluate_plants(cfg)
    validate(cfg)
    cfg["fleet"]["evaluate_plants"] = "false"  # a string is refused, never taken as set
    with pytest.raises(ConfigError, match="fleet.evaluate_plants"):
        validate(cfg)
    cfg["fleet"]["evaluate_plants"] = False
    validate(cfg)
    assert not evaluate_plants(cfg)
    del cfg["fleet"]["evaluate_plants"]  # a config written before the key existed
    validate(cfg)
    assert evaluate_plants(cfg)


# --- personalisation: fleet.personalise_epochs ------------------------------------------------------


def test_a_personalised_run_shows_each_plants_fine_tuned_figure_and_its_spread(tmp_path):
    per = [{**g, "personal-rmse": g["rmse"] * 0.5} for g in PER_GATEWAY]
    ev = gateway_evaluation(per)
    ev["spread_personal"] = plant_spread(per, "personal-rmse", False)
    lines = section(write_report(make_run(tmp_path, "p", ev)).read_text())
    table = [x for x in lines if x.startswith("|")]
    assert table[0].startswith("| gateway | class | held-out examples | RMSE ↓ | RMSE, fine-tuned | ")
    assert table[3].startswith("| 1 | nb_iot/sensor | 10 | **41.5** | 20.75 |")
    assert any(x.startswith("Each plant's model fine-tuned on its own data (`fleet.personalise_epochs`; it stays on "
                            "the gateway, only its figures left): worst RMSE, fine-tuned 20.75 (gateway 1)")
               for x in lines)


def test_the_ledger_says_what_personalisation_keeps_on_the_gateway(tmp_path):
    from iiotfl.privacy.ledger import Ledger

    ledger = Ledger(tmp_path / "privacy_ledger.jsonl", compose([]))
    ledger.record_evaluation([{"node": 1, "partition": 0, "rmse": 12.0, "personal-rmse": 9.0, "num-examples": 4},
                              {"node": 2, "partition": 1, "rmse": 14.0, "num-examples": 5}])
    rows = [json.loads(x) for x in (tmp_path / "privacy_ledger.jsonl").read_text().splitlines()]
    assert rows[0]["form"].endswith("1 of them score a model fine-tuned on the plant's data, which stays on the gateway")
    assert "fine-tuned" not in rows[1]["form"]


@pytest.mark.parametrize("overrides, message", [
    (["fleet.personalise_epochs=2", "privacy=sample"], r"fleet.personalise_epochs with privacy=sample: .*outside the "
                                                      r"DP accounting; set fleet.personalise_epochs=0 or privacy=none"),
    (["fleet.personalise_epochs=-1"], r"fleet.personalise_epochs=-1 is invalid"),
])
def test_personalisation_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))
