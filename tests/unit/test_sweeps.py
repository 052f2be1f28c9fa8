"""Researcher sweeps: failed points do not stop a sweep; one table and trade-off plots per sweep.

Fast: the sweep report on run directories written by hand (two tasks, DP and no DP, failed
runs), ``iiotfl report`` on a run and on a sweep, and a sweep through the real CLI and Hydra
with the launcher replaced (a crash, a refused config, Ctrl-C). Slow: a real 2x2 sweep on
Flower's simulation engine with one strategy the config refuses at this fleet size.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml

from iiotfl.server.report import find_runs, sweep_rows, write_report, write_summary

PNG = b"\x89PNG\r\n\x1a\n"

REFUSED_INT8 = ("config: privacy=client clips and averages full float32 weights (Flower's DP wrappers); "
                "use codec=none with it")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 300 and height > 200 and len(data) > 5000, (path, width, height, len(data))


def make_run(root: Path, name: str, *, task: str = "predictive_maintenance", metric: str = "rmse",
             higher: bool = False, values: list[float] | None = None, strategy: str = "fedavg",
             privacy: str = "none", codec: str = "none", link: str = "ethernet", epsilon: list[float] | None = None,
             status: str = "completed", error: str | None = None, bytes_up: int = 160_000, wall: float = 60.0,
             extra_overrides: list[str] | None = None, extra_server: dict | None = None) -> Path:
    """A run directory as ``iiotfl run -m`` leaves it: .hydra files, metrics, launch.json."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"task": {"name": task}, "strategy": {"name": strategy}, "privacy": {"name": privacy},
           "link": {"name": link}, "codec": {"name": codec}, "fleet": {"gateways": 2, "rounds": 2},
           "engine": {"name": "sim"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    overrides = ["engine=sim", "fleet.gateways=2", f"task={task}", f"strategy={strategy}", f"privacy={privacy}",
                 f"codec={codec}", *(extra_overrides or [])]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = []
    for i, v in enumerate(values or []):
        rows.append({
            "round": i, "time": 5.0 * i, "round_time": 5.0 if i else 0.0, "sim_round_s": 4.0 if i else None,
            "server": {metric: v, **(extra_server or {}), "num-examples": 100.0},
            "privacy": ({"epsilon": epsilon[i], "delta": 1e-3} if epsilon else {}),
            "clients": [{"partition": g, "bytes-up": bytes_up, "bytes-down": 166_932, "train_loss": 0.5 / (i or 1)}
                        for g in range(2)] if i else [],
        })
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status == "completed":
        (run / "metrics.json").write_text(json.dumps({
            "task": task, "primary_metric": metric, "higher_is_better": higher, "rounds": rows,
            "privacy": {"mechanism": privacy, "checks": []}}))
    launch = {"engine": "sim", "gateways": 2, "status": status, "wall_s": wall}
    if error:
        launch["error"] = error
    (run / "launch.json").write_text(json.dumps(launch))
    return run


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """Two tasks; DP and non-DP runs; a config refusal and a crash mid-run."""
    root = tmp_path / "sweep"
    make_run(root, "0", values=[120.0, 40.0, 20.0], extra_server={"rmse_last": 18.0, "phm_score": 900.0})
    make_run(root, "1", values=[120.0, 42.0, 22.0], codec="int8", bytes_up=42_000)
    make_run(root, "2", values=[120.0, 80.0, 35.0], privacy="client", epsilon=[0.0, 2.0, 3.4])
    make_run(root, "3", privacy="client", codec="int8", status="failed", error=REFUSED_INT8)
    make_run(root, "4", task="energy_anomaly", metric="pr_auc", higher=True, values=[0.2, 0.6, 0.8])
    make_run(root, "5", task="energy_anomaly", metric="pr_auc", higher=True, values=[0.2, 0.5, 0.6],
             privacy="sample", epsilon=[0.0, 0.7, 1.0], strategy="he")
    make_run(root, "6", task="energy_anomaly", metric="pr_auc", higher=True, values=[0.2, 0.55],
             strategy="secagg", status="failed", error="the ServerApp process died before the run finished")
    make_run(root, "10", values=[120.0, 30.0, 19.0], link="nb_iot", wall=200.0)  # natural order: after 6
    return root


def table(md: str) -> list[list[str]]:
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    return [[c.strip() for c in x.strip().strip("|").split(" | ")] for x in lines]


def test_sweep_table_has_every_run_its_task_metric_and_failures(sweep):
    csv_path, md_path = write_summary(sweep)
    md = md_path.read_text()
    assert md.count("\n| ") == 9, md  # the one table: a header and eight runs
    head, *rows = table(md)
    col = {name: i for i, name in enumerate(head)}
    for name in ("task", "strategy", "privacy", "link", "codec", "status", "metric", "final", "ε",
                 "bytes up / gw / round", "bytes down / gw / round", "wall [s]", "round [s]", "error"):
        assert name in col, name
    by_run = {r[col["run"]]: r for r in rows}
    assert [r[col["run"]] for r in rows] == ["0", "1", "2", "3", "4", "5", "6", "10"]
    # each task its own primary metric and direction, none hard-coded
    assert {by_run[n][col["metric"]] for n in ("0", "1", "2", "3", "10")} == {"RMSE ↓"}
    assert {by_run[n][col["metric"]] for n in ("4", "5", "6")} == {"PR-AUC ↑"}
    # best completed run per task in bold: lowest RMSE, highest PR-AUC
    assert by_run["10"][col["final"]] == "**19**" and by_run["0"][col["final"]] == "20"
    assert by_run["4"][col["final"]] == "**0.8**" and by_run["5"][col["final"]] == "0.6"
    # epsilon: infinity without DP, the spent value with it
    assert by_run["0"][col["ε"]] == "∞ (no DP)"
    assert by_run["2"][col["ε"]] == "3.4" and by_run["5"][col["ε"]] == "1"
    assert by_run["1"][col["bytes up / gw / round"]] == "42,000" and by_run["1"][col["codec"]] == "int8"
    assert by_run["10"][col["link"]] == "nb_iot" and by_run["10"][col["wall [s]"]] == "200"
    # failed runs: in the table, with their reason; a failed run's partial metric is kept
    assert by_run["3"][col["status"]] == "**failed**" and by_run["3"][col["error"]] == REFUSED_INT8
    assert by_run["3"][col["final"]] == "-" and by_run["3"][col["ε"]] == "-"
    assert by_run["6"][col["status"]] == "**failed**" and "ServerApp process died" in by_run["6"][col["error"]]
    assert by_run["6"][col["final"]] == "0.55"
    assert by_run["0"][col["status"]] == "completed"
    assert "8 runs, 6 completed, 2 failed" in md
    assert "Overrides of every run: `engine=sim` `fleet.gateways=2`" in md

    rows = list(csv.DictReader(csv_path.open()))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3", "4", "5", "6", "10"]
    assert rows[0]["metric"] == "rmse" and rows[0]["higher_is_better"] == "False" and rows[0]["epsilon"] == "inf"
    assert rows[4]["metric"] == "pr_auc" and float(rows[4]["final_metric"]) == 0.8
    assert rows[3]["status"] == "failed" and rows[3]["error"] == REFUSED_INT8


def test_sweep_writes_one_tradeoff_figure_per_task(sweep):
    md = write_summary(sweep)[1].read_text()
    for task in ("predictive_maintenance", "energy_anomaly"):
        assert_png(sweep / f"sweep-{task}.png")
        assert f"![{task}: trade-offs](sweep-{task}.png)" in md


def test_sweep_without_any_dp_run_and_only_failures_still_reports(tmp_path):
    root = tmp_path / "s"
    make_run(root, "0", values=[100.0, 30.0])
    make_run(root, "1", task="quality_control", metric="pr_auc", higher=True, status="failed",
             error="config: strategy=secagg needs fleet.gateways >= 3")
    md = write_summary(root)[1].read_text()
    assert_png(root / "sweep-predictive_maintenance.png")
    assert not (root / "sweep-quality_control.png").exists()
    assert "No completed run (nothing to plot) for: quality_control." in md
    assert "needs fleet.gateways >= 3" in md


def test_swept_overrides_that_are_not_groups_get_a_column(tmp_path):
    root = tmp_path / "s"
    make_run(root, "0", values=[100.0, 30.0], extra_overrides=["seed=0"])
    make_run(root, "1", values=[100.0, 28.0], extra_overrides=["seed=1"])
    head, *rows = table(write_summary(root)[1].read_text())
    assert [r[head.index("overrides")] for r in rows] == ["seed=0", "seed=1"]


def test_find_runs_skips_the_runs_own_folders_and_nests(tmp_path):
    a = make_run(tmp_path / "day" / "10-00-00", "0", values=[1.0])
    b = make_run(tmp_path / "day" / "11-00-00", "0", values=[1.0])
    (a / "flwr" / "apps").mkdir(parents=True)
    (a / "flwr" / "apps" / "launch.json").write_text("{}")
    assert find_runs(tmp_path / "day") == [a, b]
    assert [r["run"] for r in sweep_rows(tmp_path / "day")] == ["10-00-00/0", "11-00-00/0"]


def test_run_report_headlines_the_tasks_primary_metric(tmp_path):
    run = make_run(tmp_path, "ea", task="energy_anomaly", metric="pr_auc", higher=True, values=[0.2, 0.6, 0.8],
                   privacy="sample", epsilon=[0.0, 0.7, 1.0])
    report = write_report(run).read_text()
    assert "- global PR-AUC (higher is better): 0.2 (initial) → 0.8 (final)" in report
    assert "RMSE" not in report and "PHM08" not in report
    assert "sample-level DP, largest per-gateway epsilon 1" in report
    assert "| round | time [s] | simulated [s] | PR-AUC | gateways |" in report
    assert_png(run / "metrics.png")


def test_run_report_keeps_the_predictive_maintenance_figures(tmp_path):
    run = make_run(tmp_path, "pm", values=[120.0, 40.0, 20.0], extra_server={"rmse_last": 18.0, "phm_score": 900.0})
    report = write_report(run).read_text()
    assert "- global RMSE (lower is better): 120 (initial) → 20 (final); RMSE at last cycle 18, PHM08 score 900" in report
    assert "| RMSE | RMSE last cycle | PHM08 score |" in report
    assert "no differential privacy (epsilon = infinity)" in report


def test_report_command_on_a_run_a_sweep_and_nothing(sweep, tmp_path, capsys):
    from iiotfl.server.cli import main

    assert main(["report", str(sweep / "4")]) == 0
    assert capsys.readouterr().out.strip() == str(sweep / "4" / "report.md")
    assert "PR-AUC" in (sweep / "4" / "report.md").read_text()
    assert not (sweep / "summary.md").exists()
    assert main(["report", str(sweep)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep / "summary.md")
    assert (sweep / "summary.csv").exists() and (sweep / "sweep-energy_anomaly.png").exists()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no run directory" in capsys.readouterr().err


# --- the sweep machinery, in process, with the launcher replaced ------------------------------


@pytest.fixture()
def fake_launch(monkeypatch):
    """The launcher `iiotfl run` calls replaced: codec=int4 crashes the launcher, link=nb_iot is stopped by the
    user, anything else completes in no time with a plausible run directory."""
    from hydra.core.global_hydra import GlobalHydra

    import iiotfl.server.cli.run

    calls = []

    def launch(cfg, run_dir):
        run_dir = Path(run_dir)
        calls.append(run_dir.name)
        if cfg["codec"]["name"] == "int4":
            raise RuntimeError("simulated launcher bug")
        status = "interrupted" if cfg["link"]["name"] == "nb_iot" else "completed"
        rows = [{"round": i, "time": i, "round_time": 1.0, "server": {"rmse": 100.0 / (i + 1)}, "privacy": {},
                 "clients": [{"partition": 0, "bytes-up": 1000, "bytes-down": 2000}] if i else []} for i in range(3)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if status == "completed":
            (run_dir / "metrics.json").write_text(json.dumps(
                {"task": "predictive_maintenance", "primary_metric": "rmse", "higher_is_better": False, "rounds": rows}))
        info = {"engine": "sim", "gateways": 2, "status": status, "wall_s": 1.0}
        if status == "interrupted":
            info["error"] = "stopped by the user (Ctrl-C / SIGTERM); processes torn down"
        (run_dir / "launch.json").write_text(json.dumps(info))
        return info

    monkeypatch.setattr(iiotfl.server.cli.run, "launch", launch)
    GlobalHydra.instance().clear()
    yield calls
    GlobalHydra.instance().clear()


def test_failed_points_do_not_stop_the_sweep(fake_launch, tmp_path):
    from iiotfl.server.cli import main

    sweep = tmp_path / "sweep"
    rc = main(["run", "-m", "engine=sim", "codec=none,int8,int4,int9", "privacy=none,client",
               f"hydra.sweep.dir={sweep}"])
    assert rc == 1  # some points failed: said at the end, after every point ran
    # every point with codec != none under privacy=client is refused; int4/none crashes in the launcher
    assert fake_launch == ["0", "1", "2", "4"]
    launch = {p.name: json.loads((p / "launch.json").read_text()) for p in sweep.iterdir() if p.is_dir()}
    assert len(launch) == 8
    assert [launch[n]["status"] for n in "012"] == ["completed"] * 3
    for n in "35":
        assert launch[n] == {"status": "failed", "error": REFUSED_INT8, "stage": "config"}
        assert "**failed**" in (sweep / n / "report.md").read_text()
    assert launch["4"]["status"] == "failed" and launch["4"]["stage"] == "launch"
    assert "the launcher crashed: RuntimeError: simulated launcher bug" in launch["4"]["error"]
    assert "simulated launcher bug" in (sweep / "4" / "logs" / "launcher-traceback.txt").read_text()
    for n in "67":  # an option that does not exist: the point cannot be composed, the sweep goes on
        assert launch[n]["status"] == "failed" and "Could not find 'codec/int9'" in launch[n]["error"]
        assert "Config search path" not in launch[n]["error"]
    head, *rows = table((sweep / "summary.md").read_text())
    assert len(rows) == 8
    status, error, codec = head.index("status"), head.index("error"), head.index("codec")
    assert [r[status] for r in rows] == ["completed"] * 3 + ["**failed**"] * 5
    assert rows[3][error] == REFUSED_INT8 and rows[6][codec] == "int9"


def test_ctrl_c_stops_the_sweep_and_still_summarises(fake_launch, tmp_path):
    from iiotfl.server.cli import main

    sweep = tmp_path / "sweep"
    rc = main(["run", "-m", "engine=sim", "link=ethernet,nb_iot,wifi", f"hydra.sweep.dir={sweep}"])
    assert rc == 130
    assert fake_launch == ["0", "1"]  # wifi never started
    head, *rows = table((sweep / "summary.md").read_text())
    assert [r[head.index("status")] for r in rows] == ["completed", "**interrupted**"]


# --- the real thing ----------------------------------------------------------------------------


def test_a_run_never_starts_in_a_directory_that_holds_another_run(fake_launch, tmp_path, capsys):
    """A reused directory would let its old checkpoints pass for today's (a resume, an export): refused before
    anything is written there, for one run and for every point of a sweep; what was there stays as it was."""
    from iiotfl.server.cli import main

    run = tmp_path / "run"
    assert main(["run", "engine=sim", f"hydra.run.dir={run}"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "iiotfl.log"}
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "round-3.ckpt").write_bytes(b"yesterday")
    assert main(["run", "engine=sim", f"hydra.run.dir={run}"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert f"run directory {run} already holds another run (launch.json, metrics.jsonl, checkpoints/)" in line
    assert fake_launch == ["run"]  # the second run never reached the launcher
    assert {n: (run / n).read_bytes() for n in before} == before
    assert (run / "checkpoints" / "round-3.ckpt").read_bytes() == b"yesterday"

    sweep = tmp_path / "sweep"
    assert main(["run", "-m", "engine=sim", "codec=none,int8", f"hydra.sweep.dir={sweep}"]) == 0
    first = {p: p.read_bytes() for p in sweep.glob("*/launch.json")}
    assert len(first) == 2
    assert main(["run", "-m", "engine=sim", "codec=none,int8", f"hydra.sweep.dir={sweep}"]) == 1
    assert {p: p.read_bytes() for p in sweep.glob("*/launch.json")} == first
    assert fake_launch == ["run", "0", "1"]
