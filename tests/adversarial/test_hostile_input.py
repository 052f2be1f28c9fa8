"""Hostile or broken input reaches the user as one line, before anything starts or within seconds."""

from __future__ import annotations

import pytest


@pytest.fixture
def launches(monkeypatch):
    """The launcher `iiotfl run` calls, replaced by a recorder: a refused run never reaches it."""
    from hydra.core.global_hydra import GlobalHydra

    import iiotfl.server.cli.run

    calls = []
    monkeypatch.setattr(iiotfl.server.cli.run, "launch", lambda cfg, run_dir: calls.append(run_dir) or {})
    GlobalHydra.instance().clear()
    yield calls
    GlobalHydra.instance().clear()


def test_a_missing_plant_file_is_refused_before_any_process_starts(launches, tmp_path, capfd):
    from iiotfl.server.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for p in (0, 1):
        (data / f"plant_{p}.csv").write_text("unit,cycle,s1,rul\n1,1,0.5,3\n")
    run = tmp_path / "run"
    args = ["run", "fleet.gateways=3", "task.data.source=csv", f"task.data.path='{data}/plant_{{partition}}.csv'",
            f"hydra.run.dir={run}"]
    assert main(args) == 2
    (line,) = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error:")]
    assert f"task.data.path (gateway 2): {data}/plant_2.csv does not exist" in line
    assert launches == [] and not (run / "config.yaml").exists()
    (data / "plant_2.csv").mkdir()
    assert main(args) == 2 and "plant_2.csv is a directory" in capfd.readouterr().err
    # engine=remote: each gateway reads its own files on its own machine; only the server's are checked here
    assert main([*args[:-1], "engine=remote", "engine.insecure=true", f"hydra.run.dir={tmp_path / 'remote'}",
                 f"task.data.test_path={data}/held_out.csv"]) == 2
    assert f"task.data.test_path: {data}/held_out.csv does not exist" in capfd.readouterr().err
