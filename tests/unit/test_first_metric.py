"""A first run always shows a metric: without a server-side test set the gateways' own held-out
evaluation of the final model is reported, and the report says which evaluation it shows.

Fast: the weighted mean of the gateways' replies, the choice of evaluation, the final evaluation
round against a scripted grid (a gateway that raises, one that never replies), and the wording of
``report.md``, ``iiotfl run``'s last line and the sweep table, on run directories written by hand.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from iiotfl.privacy.ledger import Ledger
from iiotfl.privacy.ledger import load as load_ledger
from iiotfl.server import app, events
from iiotfl.server.cli import run as cli_run
from iiotfl.server.report import metric_line, run_summary, write_report, write_summary
from iiotfl.server.rounds import DeadlineGrid
from iiotfl.strategies import wire

# --- the gateways' replies, averaged ------------------------------------------------------------


def test_gateway_mean_is_weighted_by_held_out_examples():
    means, counted, left_out = app.gateway_mean({
        1: {"rmse": 10.0, "rmse_last": 4.0, "num-examples": 100.0},
        2: {"rmse": 30.0, "rmse_last": 8.0, "num-examples": 300.0},
    })
    assert means["rmse"] == pytest.approx(25.0)  # not the plain mean, 20
    assert means["rmse_last"] == pytest.approx(7.0)
    assert means["num-examples"] == 400.0
    assert counted == [1, 2] and left_out == {}


def test_gateway_mean_leaves_out_a_reply_without_examples_and_non_finite_values():
    means, counted, left_out = app.gateway_mean({
        1: {"pr_auc": 0.5, "f1": math.nan, "num-examples": 50},
        2: {"pr_auc": 0.8, "f1": 0.6, "num-examples": 150},
        3: {"pr_auc": 0.0},                             # no count: cannot be weighted
        4: {"pr_auc": 0.1, "num-examples": 0},          # nothing held out
    })
    assert counted == [1, 2] and set(left_out) == {3, 4}
    assert "num-examples" in left_out[3] and "num-examples" in left_out[4]
    assert means["pr_auc"] == pytest.approx((0.5 * 50 + 0.8 * 150) / 200)
    assert means["f1"] == pytest.approx(0.6)  # gateway 1's NaN is left out of this metric only
    assert means["num-examples"] == 200


def test_gateway_mean_of_nothing_is_empty():
    assert app.gateway_mean({}) == ({}, [], {})
    means, counted, _ = app.gateway_mean({5: {"rmse": 3.0}})
    assert means == {} and counted == []


# --- which evaluation the run's metric comes from -------------------------------------------------

ROWS = [{"round": 0, "server": {"rmse": 90.0}}, {"round": 1, "server": {"rmse": 40.0}},
        {"round": 2, "server": {"rmse": 20.0, "num-examples": 8.0}}]
UNSCORED = [{"round": 0, "server": {}}, {"round": 1, "server": {}}, {"round": 2, "server": {}}]


def _gateway_eval(metrics: dict, failed: list | None = None, asked: int = 3, counted: int = 2) -> dict:
    return {"round": 2, "asked": asked, "gateways": counted, "metrics": metrics, "per_gateway": [],
            "failed": failed or []}


def test_headline_prefers_the_servers_test_set():
    fields = app.headline("rmse", ROWS, True, _gateway_eval({"rmse": 5.0}))
    assert fields["evaluation"] == "server" and fields["final_metric"] == 20.0
    assert fields["final_metrics"] == {"rmse": 20.0, "num-examples": 8.0}
    assert "evaluation_note" not in fields


def test_headline_without_a_test_set_is_the_gateways_weighted_mean():
    fields = app.headline("rmse", UNSCORED, False, _gateway_eval({"rmse": 33.0, "num-examples": 400.0}))
    assert fields["evaluation"] == "gateways" and fields["final_metric"] == 33.0
    assert fields["final_metrics"]["num-examples"] == 400.0


def test_headline_with_no_evaluation_says_why():
    failed = [{"node": 7, "partition": 1, "reason": "ValueError: no column 'T30'"},
              {"node": 9, "partition": None, "reason": "no reply within fleet.round_timeout (5 s)"}]
    fields = app.headline("rmse", UNSCORED, False, _gateway_eval({}, failed, asked=2, counted=0))
    assert fields["evaluation"] == "none" and fields["final_metric"] is None
    note = fields["evaluation_note"]
    assert "no server-side test set" in note and "task.data.test_path" in note
    assert "none of the 2 gateway(s)" in note
    assert "gateway 1: ValueError: no column 'T30'" in note and "gateway (node 9): no reply" in note
    assert "no gateway was connected" in app.headline("rmse", UNSCORED, False,
                                                      _gateway_eval({}, asked=0, counted=0))["evaluation_note"]


# --- the final evaluation round, against a scripted grid ------------------------------------------


class EvalGrid:
    """Gateways answer an evaluate message with fixed metrics, an error (str) or never (None)."""

    def __init__(self, answers: dict[int, dict | str | None]) -> None:
        self.answers = answers
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            node = self.pushed[mid].metadata.dst_node_id
            answer = self.answers[node]
            if answer is None:
                continue
            md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=node, dst_node_id=0, reply_to_message_id=mid,
                          group_id="", created_at=time.time(), ttl=60, message_type=MessageType.EVALUATE)
            if isinstance(answer, str):
                out.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, answer), metadata=md))
            else:
                out.append(Message(RecordDict({"metrics": MetricRecord(answer)}), metadata=md))
        return out


def _run(tmp_path: Path, grid: EvalGrid, server_test: bool = False, aggregated: bool = True,
         metric: str = "rmse", higher: bool = False, evaluate_plants: bool | None = None) -> Any:
    rows = [{"round": 0, "server": {}}, {"round": 1, "server": {}, "aggregated": 4 if aggregated else 0}]
    fleet: dict[str, Any] = {"round_timeout": 0.3}
    if evaluate_plants is not None:
        fleet["evaluate_plants"] = evaluate_plants
    return SimpleNamespace(
        rounds=DeadlineGrid(grid, deadline_s=0.3, poll_s=0.01),  # type: ignore[arg-type]
        log=SimpleNamespace(node_partition={11: 0, 12: 1, 13: 2, 14: 3}, rows=rows),
        cfg={"fleet": fleet}, sums=np.arange(6.0).reshape(2, 3), nodes=[11, 12, 13, 14],
        out=tmp_path, server_test=server_test, task=SimpleNamespace(primary_metric=metric, higher_is_better=higher),
        ledger=Ledger(tmp_path / "privacy_ledger.jsonl", {"privacy": {"name": "none"}, "strategy": {"name": "fedavg"},
                                                          "codec": {"name": "none"}}))


def test_every_gateway_scores_the_final_model_and_the_failed_ones_are_named(tmp_path, serverapp_identity):
    grid = EvalGrid({11: {"rmse": 10.0, "num-examples": 100.0}, 12: {"rmse": 30.0, "num-examples": 300.0},
                     13: "<class 'ValueError'>:<'no column \"T30\"'>", 14: None})
    final = ArrayRecord([np.ones(3, dtype=np.float32)])
    fields = app._evaluation(_run(tmp_path, grid), final, 5)

    # one evaluate message per connected gateway: the final model and the fleet's normalisation
    sent = list(grid.pushed.values())
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12, 13, 14]
    for m in sent:
        assert m.metadata.message_type == MessageType.EVALUATE
        assert m.content["arrays"] is final
        config = m.content["config"]
        assert list(config[wire.NORM_SUMS]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and config[wire.NORM_COLS] == 3
        assert config[wire.SERVER_ROUND] == 5

    assert fields["evaluation"] == "gateways" and fields["final_metric"] == pytest.approx(25.0)
    g = fields["gateway_evaluation"]
    assert (g["round"], g["asked"], g["gateways"]) == (5, 4, 2)
    assert g["metrics"] == {"rmse": pytest.approx(25.0), "num-examples": 400.0}
    assert [p["partition"] for p in g["per_gateway"]] == [0, 1]
    assert {f["partition"]: f["reason"] for f in g["failed"]} == {
        2: 'ValueError: no column "T30"', 3: "no reply within fleet.round_timeout (0.3 s)"}
    shown = [e["message"] for e in events.read(tmp_path)]
    assert 'gateway 2: final evaluation: ValueError: no column "T30"' in shown
    assert "gateway 3: final evaluation: no reply within fleet.round_timeout (0.3 s)" in shown
    # what left each plant for it is in the privacy ledger: the two that answered, nothing of the others
    rows = load_ledger(tmp_path / "privacy_ledger.jsonl")
    assert [(r["round"], r["gateway"], r["status"]) for r in rows] == [(0, 0, "sent"), (0, 1, "sent")]
    assert all("final evaluation" in r["form"] and r["bytes_sent"] > 0 for r in rows)


def test_when_every_gateway_fails_the_run_still_finishes_and_says_why(tmp_path, serverapp_identity):
    grid = EvalGrid({11: "<class 'RuntimeError'>:<'disk full'>", 12: None, 13: {"rmse": 5.0}, 14: None})
    fields = app._evaluation(_run(tmp_path, grid), ArrayRecord([np.ones(1, dtype=np.float32)]), 2)
    assert fields["evaluation"] == "none" and fields["final_metric"] is None
    assert "gateway 0: RuntimeError: disk full" in fields["evaluation_note"]
    assert "gateway 2: its evaluation reply has no positive num-examples" in fields["evaluation_note"]
    assert len(fields["gateway_evaluation"]["failed"]) == 4


def test_a_grid_that_breaks_does_not_break_the_run(tmp_path, serverapp_identity):
    class Broken(EvalGrid):
        def push_messages(self, messages):
            raise ConnectionError("SuperLink gone")

    fields = app._evaluation(_run(tmp_path, Broken({11: None, 12: None, 13: None, 14: None})),
                             ArrayRecord([np.ones(1, dtype=np.float32)]), 2)
    assert fields["evaluation"] == "none" and "ConnectionError: SuperLink gone" in fields["evaluation_note"]


def test_with_a_server_test_set_every_plant_still_scores_the_final_model(tmp_path, serverapp_identity):
    """The run's metric stays the server's; each plant's own figures and their spread come beside it (RMSE: the
    worst plant is the highest; four plants: the median is the mean of the middle two)."""
    grid = EvalGrid({11: {"rmse": 12.0, "num-examples": 40.0}, 12: {"rmse": 41.5, "num-examples": 10.0},
                     13: {"rmse": 20.0, "num-examples": 30.0}, 14: {"rmse": 30.0, "num-examples": 20.0}})
    run = _run(tmp_path, grid, server_test=True)
    run.log.rows = [*ROWS[:2], {**ROWS[2], "aggregated": 4}]
    fields = app._evaluation(run, ArrayRecord([np.ones(1, dtype=np.float32)]), 2)
    assert sorted(m.metadata.dst_node_id for m in grid.pushed.values()) == [11, 12, 13, 14]
    # the headline is untouched: the server's test set, after every round
    assert fields["evaluation"] == "server" and fields["final_metric"] == 20.0
    assert fields["final_metrics"] == {"rmse": 20.0, "num-examples": 8.0} and "evaluation_note" not in fields
    g = fields["gateway_evaluation"]
    assert [(p["partition"], p["rmse"], p["num-examples"]) for p in g["per_gateway"]] == [
        (0, 12.0, 40.0), (1, 41.5, 10.0), (2, 20.0, 30.0), (3, 30.0, 20.0)]
    assert g["metrics"]["rmse"] == pytest.approx((12 * 40 + 41.5 * 10 + 20 * 30 + 30 * 20) / 100)
    assert g["spread"] == {"metric": "rmse", "higher_is_better": False, "gateways": 4,
                           "worst": {"value": 41.5, "partition": 1, "node": 12},
                           "median": {"value": 25.0, "partitions": [2, 3]},
                           "best": {"value": 12.0, "partition": 0, "node": 11}}
    assert g["failed"] == []
    rows = load_ledger(tmp_path / "privacy_ledger.jsonl")  # what left each plant for it
    assert [(r["gateway"], r["status"]) for r in rows] == [(0, "sent"), (1, "sent"), (2, "sent"), (3, "sent")]
    assert all("final evaluation" in r["form"] for r in rows)


def test_a_score_the_higher_the_better_has_its_worst_plant_at_the_bottom(tmp_path, serverapp_identity):
    """PR-AUC: the worst plant is the lowest; a plant that fails is named and left out of the spread; three plants:
    the median is the middle one."""
    grid = EvalGrid({11: {"pr_auc": 0.9, "f1": 0.7, "num-examples": 50.0}, 12: "<class 'OSError'>:<'disk'>",
                     13: {"pr_auc": 0.35, "f1": 0.2, "num-examples": 50.0},
                     14: {"pr_auc": 0.6, "f1": 0.5, "num-examples": 100.0}})
    run = _run(tmp_path, grid, server_test=True, metric="pr_auc", higher=True)
    run.log.rows = [{"round": 0, "server": {"pr_auc": 0.2}}, {"round": 1, "server": {"pr_auc": 0.7}, "aggregated": 3}]
    fields = app._evaluation(run, ArrayRecord([np.ones(1, dtype=np.float32)]), 1)
    assert fields["evaluation"] == "server" and fields["final_metric"] == 0.7
    spread = fields["gateway_evaluation"]["spread"]
    assert (spread["worst"]["value"], spread["worst"]["partition"]) == (0.35, 2)
    assert spread["median"] == {"value": 0.6, "partitions": [3]}
    assert (spread["best"]["value"], spread["best"]["partition"], spread["gateways"]) == (0.9, 0, 3)
    assert fields["gateway_evaluation"]["failed"] == [{"node": 12, "partition": 1, "reason": "OSError: disk"}]
    assert "gateway 1: final evaluation: OSError: disk" in [e["message"] for e in events.read(tmp_path)]


@pytest.mark.parametrize("server_test", [True, False])
def test_evaluate_plants_false_asks_no_gateway(tmp_path, server_test):
    grid = EvalGrid({11: {"rmse": 1.0, "num-examples": 1.0}})
    run = _run(tmp_path, grid, server_test=server_test, evaluate_plants=False)
    if server_test:
        run.log.rows = [*ROWS[:2], {**ROWS[2], "aggregated": 4}]
    fields = app._evaluation(run, ArrayRecord([np.ones(1, dtype=np.float32)]), 2)
    assert grid.pushed == {} and "gateway_evaluation" not in fields
    assert load_ledger(tmp_path / "privacy_ledger.jsonl") == []  # nothing left the plants for it
    if server_test:
        assert fields["evaluation"] == "server" and fields["final_metric"] == 20.0
    else:  # no metric at all, and the report says why
        assert fields["evaluation"] == "none" and "fleet.evaluate_plants=false" in fields["evaluation_note"]


def test_a_run_that_aggregated_nothing_is_not_evaluated_and_says_so(tmp_path):
    grid = EvalGrid({11: {"rmse": 1.0, "num-examples": 1.0}})
    fields = app._evaluation(_run(tmp_path, grid, aggregated=False), ArrayRecord([np.ones(1, dtype=np.float32)]),
                             2)
    assert grid.pushed == {} and fields["evaluation"] == "none"
    assert "no gateway update was aggregated" in fields["evaluation_note"]


# --- what the report and `iiotfl run` say ------------------------------------------------------------


def make_run(root: Path, name: str, evaluation: dict | None, *, scored: bool, status: str = "completed",
             task: str = "predictive_maintenance", metric: str = "rmse") -> Path:
    """A run directory as the ServerApp and the launcher leave it (``evaluation``: metrics.json's fields)."""
    run = root / name
    run.mkdir(parents=True)
    rows = [{"round": i, "time": 2.0 * i, "round_time": 2.0 if i else 0.0,
             "server": ({metric: v, "num-examples": 50.0} if scored else {}),
             "clients": [{"partition": g, "bytes-up": 1000, "bytes-down": 1000, "train_loss": 0.5}
                         for g in range(3)] if i else []}
            for i, v in enumerate([90.0, 40.0, 20.0])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status == "completed":
        (run / "metrics.json").write_text(json.dumps({
            "task": task, "primary_metric": metric, "higher_is_better": False, "rounds": rows,
            "privacy": {"mechanism": "none", "checks": []}, **(evaluation or {})}))
    (run / "launch.json").write_text(json.dumps({"engine": "sim", "gateways": 3, "status": status, "wall_s": 30.0}))
    return run


GATEWAYS = {"evaluation": "gateways", "final_metric": 33.5, "final_metrics": {"rmse": 33.5, "num-examples": 412.0},
            "gateway_evaluation": {"round": 2, "asked": 3, "gateways": 2,
                                   "metrics": {"rmse": 33.5, "num-examples": 412.0}, "per_gateway": [],
                                   "failed": [{"node": 7, "partition": 2, "reason": "ValueError: bad row"}]}}
NONE = {"evaluation": "none", "final_metric": None, "final_metrics": {},
        "evaluation_note": "no server-side test set (task.data.test_path is not set), and none of the 3 gateway(s) "
                           "asked returned a rmse for the final model (gateway 0: RuntimeError: disk full)"}


def headline_lines(report: str) -> list[str]:
    return [x for x in report.splitlines() if x.startswith(("- global", "- evaluation"))]


def test_report_names_the_gateways_evaluation(tmp_path):
    run = make_run(tmp_path, "gw", GATEWAYS, scored=False)
    report = write_report(run).read_text()
    assert headline_lines(report) == [
        "- global RMSE (lower is better): 33.5 (final)",
        "- evaluation: the gateways' own held-out data (no server-side test set): the final model scored by 2 of 3 "
        "gateways, their mean weighted by held-out examples (412 in all); none from gateway 2: ValueError: bad row",
    ]
    assert "(initial)" not in report
    assert "The rounds were not scored: the run had no server-side test set (its final model was scored by the " \
           "gateways, above)." in report


def test_report_names_the_servers_test_set(tmp_path):
    run = make_run(tmp_path, "srv", {"evaluation": "server", "final_metric": 20.0}, scored=True)
    assert headline_lines(write_report(run).read_text()) == [
        "- global RMSE (lower is better): 90 (initial) → 20 (final)",
        "- evaluation: the server's held-out test set, after every round",
    ]
    legacy = make_run(tmp_path, "legacy", None, scored=True)  # metrics.json before the "evaluation" field
    assert "- evaluation: the server's held-out test set, after every round" in write_report(legacy).read_text()


def test_report_without_any_evaluation_says_why(tmp_path):
    run = make_run(tmp_path, "none", NONE, scored=False)
    assert headline_lines(write_report(run).read_text()) == [
        "- global RMSE (lower is better): - (not evaluated)",
        "- evaluation: none — " + NONE["evaluation_note"],
    ]
    failed = make_run(tmp_path, "failed", None, scored=False, status="failed")
    assert "- evaluation: none — the run ended before the model was evaluated" in write_report(failed).read_text()


def test_iiotfl_run_ends_with_the_metric_and_its_evaluation(tmp_path, capsys):
    gw = make_run(tmp_path, "gw", GATEWAYS, scored=False)
    assert metric_line(run_summary(gw)) == (
        "final RMSE (lower is better): 33.5, on the gateways' own held-out data (no server-side test set; "
        "the mean of 2 of 3 gateways, weighted by held-out examples)")
    srv = make_run(tmp_path, "srv", {"evaluation": "server", "final_metric": 20.0}, scored=True)
    assert metric_line(run_summary(srv)) == "final RMSE (lower is better): 20, on the server's held-out test set"
    none = make_run(tmp_path, "none", NONE, scored=False)
    assert metric_line(run_summary(none)) == "no RMSE: " + NONE["evaluation_note"]
    cli_run._print_metric(gw)
    assert capsys.readouterr().out == "  " + metric_line(run_summary(gw)) + "\n"


def test_sweep_marks_runs_scored_by_the_gateways_and_ranks_them_apart(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "0", {"evaluation": "server", "final_metric": 20.0}, scored=True)
    make_run(root, "1", {**GATEWAYS, "final_metric": 10.0}, scored=False)  # lower, but on other data
    make_run(root, "2", GATEWAYS, scored=False)
    csv_path, md_path = write_summary(root)
    rows = [x for x in md_path.read_text().splitlines() if x.startswith("| ")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    final = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")][head.index("final")]
             for r in rows[1:]}
    assert final == {"0": "**20**", "1": "**10 (gateways)**", "2": "33.5 (gateways)"}
    assert "(gateways)" in md_path.read_text().split("| run")[0]  # the text above the table explains the mark
    csv_rows = csv_path.read_text().splitlines()
    assert "evaluation" in csv_rows[0].split(",") and ",gateways," in csv_rows[2]
