"""docker-compose.yml under a real Docker engine: images built here (docker/build-images), the
operator's steps (certs, up, report, down -v), a gateway container killed and started again, the
SuperLink container crashing mid-run. Skipped where no engine can be had, except in CI
(``.ci/run`` installs and starts one), where that is a failure."""

from __future__ import annotations

import json
import os

import pytest

from iiotfl.server.report import run_summary
from tests.e2e.compose import (
    ComposeFleet,
    EngineMissing,
    aggregated,
    build_images,
    engine,
    probe_from_gateway,
    restart_scenario,
    stop_engine,
)

GATEWAYS = [0, 1, 2]


@pytest.fixture(scope="session")
def docker_env():
    """A running engine and the images, built once per session (cached by content)."""
    try:
        env, started = engine()
    except EngineMissing as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the compose tests under a real engine: {err}")
        pytest.skip(f"no Docker engine: {err}")
    try:
        build_images(env)
        yield env
    finally:
        if started:
            stop_engine()


def _down_and_check(fleet: ComposeFleet) -> None:
    fleet.down()
    assert fleet.leftovers() == {"containers": [], "networks": [], "volumes": []}


def test_compose_up_trains_every_gateway_every_round_over_tls_like_the_local_fleet(docker_env, fleet_run,
                                                                                   tmp_path):
    """3 gateways on the shipped links (NB-IoT, LTE-M, Wi-Fi), TLS and node authentication, 3 rounds;
    the same config as the shared engine=fleet run (3 gateways, 3 rounds)."""
    fleet = ComposeFleet(docker_env, tmp_path, overrides="fleet.rounds=3")
    try:
        fleet.provision()
        fleet.up()
        code = fleet.wait_server(timeout=900)
        assert code == 0, fleet.logs("server")[-3000:]
        run = fleet.results()
        probe = probe_from_gateway(fleet)  # a rogue gateway, the fleet still up
        front_log = fleet.logs("front")
    finally:
        _down_and_check(fleet)  # down -v leaves nothing of the project, also after a failure
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert aggregated(r) == GATEWAYS, f"round {r['round']}: {r['gateways']}"
    # the gateways reach the Fleet API through the front and nothing else of the SuperLink
    assert probe["superlink_name"].startswith("unresolved"), probe
    assert probe["superlink_port"].startswith("refused"), probe
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/pull-messages",
                 "/v1/fleet/../control/start-run"):
        assert probe[path] == 403, (path, probe)
    assert probe["no client certificate"] in (400, 403) or str(probe["no client certificate"]).startswith("refused")
    assert "/v1/fleet/" in front_log and " 403 " in front_log  # the gateways' traffic went through it
    report = (run / "report.md").read_text()
    assert "TLS (CA /certs/ca.crt)" in report and "INSECURE" not in report
    launch = json.loads((run / "launch.json").read_text())
    assert launch["status"] == "completed"
    fleet_dir, proc = fleet_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = run_summary(run), run_summary(fleet_dir)
    assert ours["metric"] == theirs["metric"] == "rmse"
    assert abs(ours["final_metric"] - theirs["final_metric"]) <= 0.05 * theirs["final_metric"], (ours, theirs)


@pytest.fixture(scope="module")
def restarts(docker_env, tmp_path_factory):
    """One compose run (all gateways on LTE-M, 6 rounds) that goes through a gateway container killed
    and started again, then the SuperLink container crashing; what happened, for the tests below."""
    return restart_scenario(docker_env, tmp_path_factory.mktemp("compose-restarts"))


def test_a_killed_gateway_container_is_left_out_and_rejoins_when_started(restarts):
    without = next(r for r in restarts["without"] if r["round"] > restarts["killed_after"]
                   and 2 not in aggregated(r))
    assert aggregated(without) == [0, 1]  # the round completed with the others
    # started again, it joined with the same node key: its state directory says it joined before,
    # so it waits for the SuperLink to drop its old session instead of taking [code: 2004] for an
    # unregistered key (Flower: 2 missed heartbeats of 30 s)
    assert 2 in aggregated(restarts["back"][-1])
    assert "error:" not in restarts["gateway_log"]
    assert restarts["rejoin_s"] < 300, restarts["rejoin_s"]


def test_a_crashed_superlink_container_restarts_on_its_state_and_the_run_resumes(restarts):
    assert restarts["exit"] == 0, restarts["server_log"][-3000:]
    assert restarts["superlink_restarts"] >= 1  # the restart policy brought it back
    run = restarts["run"]
    launch = json.loads((run / "launch.json").read_text())
    assert launch["status"] == "completed"
    [event] = launch["resumed"]
    done = event["after_round"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(7))
    before = {r["round"]: r for r in restarts["before_crash"]}
    assert done >= 1 and all(rows[i] == before[i] for i in range(done + 1))  # completed rounds kept
    assert all(r["aggregated"] >= 1 for r in rows[done + 1:])


def test_down_leaves_nothing_of_the_project(restarts):
    assert restarts["leftovers"] == {"containers": [], "networks": [], "volumes": []}
