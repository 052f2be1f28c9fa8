"""Compose benchmark: docker-compose.yml under a real Docker engine against engine=fleet.

Prints one JSON line:
  build_cold_s / build_warm_s   docker/build-images with nothing cached (wheelhouse, base image and
                                layers removed) and right after, unchanged (all cached)
  image_mb                      the size of each image (server, gateway, the local base)
  up_s                          `docker-compose up -d` returning (SuperLink healthy, register done)
  up_to_first_round_s           `up -d` called to round 1 in metrics.jsonl
  compose_mean_round_s / fleet_mean_round_s   mean round time, same config (3 gateways, 3 rounds,
                                the compose file's links: NB-IoT, LTE-M, Wi-Fi) in containers and on the
                                local fleet; the fleet also shapes the downlink and adds the links' delay
  compose_final_rmse / fleet_final_rmse
  with --restarts, the compose restart scenario of tests/e2e/test_compose_e2e.py (all gateways on LTE-M):
  round_without_gateway_s       gateway-2's container killed after round 1, to a round completed without it
  gateway_rejoin_s              `docker start` of that container, to a round that aggregated it again
  superlink_crash_to_end_s      the SuperLink's process killed (restart policy), to the resumed run's end

Needs root, Debian's docker.io and docker-compose (docker/engine install) and debootstrap.
Usage: python bench/compose.py [--warm-only] [--restarts]   (--warm-only: no cold build)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iiotfl.server.report import run_summary  # noqa: E402
from tests.e2e.compose import ComposeFleet, build_images, docker, engine, restart_scenario, stop_engine  # noqa: E402

ROUNDS = 3
LINKS = ["+fleet.link_overrides.0=nb_iot", "+fleet.link_overrides.1=lte_m", "+fleet.link_overrides.2=wifi"]


def forget_cache(env: dict[str, str]) -> None:
    """Remove what makes a build warm: images, base image, build cache, wheelhouse."""
    names = docker(env, "images", "--format", "{{.Repository}}:{{.Tag}}").split()
    ours = [n for n in names if n.startswith(("iiotfl-server:", "iiotfl-gateway:", "iiotfl-base:"))]
    if ours:
        docker(env, "rmi", "-f", *ours)
    docker(env, "image", "prune", "-f")
    for f in (ROOT / "docker" / "wheels").iterdir():
        if f.name != "README.md":
            f.unlink()


def image_mb(env: dict[str, str]) -> dict[str, float]:
    out = {}
    for line in docker(env, "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").splitlines():
        name, image = line.split()
        if name.startswith(("iiotfl-server:", "iiotfl-gateway:", "iiotfl-base:")):
            size = int(docker(env, "image", "inspect", "-f", "{{.Size}}", image).strip())
            out[name.split(":")[0]] = round(size / 2**20, 1)
    return out


def compose_run(env: dict[str, str], work: Path) -> dict:
    fleet = ComposeFleet(env, work, overrides=f"fleet.rounds={ROUNDS}")
    try:
        fleet.provision()
        started = time.perf_counter()
        up_s = fleet.up()
        fleet.wait_rows(lambda rows: rows[-1]["round"] >= 1, timeout=900, poll=0.5)
        first = time.perf_counter() - started
        if fleet.wait_server(timeout=1200) != 0:
            raise SystemExit(f"compose run failed: {fleet.logs('server')[-2000:]}")
        summary = run_summary(fleet.results())
    finally:
        fleet.down()
    return {"up_s": round(up_s, 1), "first_round_s": round(first, 1), **summary}


def fleet_run(work: Path) -> dict:
    run_dir = work / "fleet"
    proc = subprocess.run([str(Path(sys.executable).parent / "iiotfl"), "run", "fleet.gateways=3",
                           f"fleet.rounds={ROUNDS}", *LINKS, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fleet run failed: {proc.stderr[-2000:]}")
    return run_summary(run_dir)


def main() -> None:
    env, started = engine()
    result: dict = {"bench": "compose", "gateways": 3, "rounds": ROUNDS}
    if "--warm-only" not in sys.argv:
        forget_cache(env)
        result["build_cold_s"] = round(build_images(env), 1)
        print(f"cold build: {result['build_cold_s']} s", file=sys.stderr)
    result["build_warm_s"] = round(build_images(env), 1)
    result["image_mb"] = image_mb(env)
    with tempfile.TemporaryDirectory() as tmp:
        c = compose_run(env, Path(tmp))
        f = fleet_run(Path(tmp))
        result.update({
            "up_s": c["up_s"], "up_to_first_round_s": c["first_round_s"],
            "compose_mean_round_s": round(c["mean_round_s"], 2), "fleet_mean_round_s": round(f["mean_round_s"], 2),
            "compose_final_rmse": round(c["final_rmse"], 3), "fleet_final_rmse": round(f["final_rmse"], 3),
        })
        if "--restarts" in sys.argv:
            seen = restart_scenario(env, Path(tmp) / "restarts")
            result.update({"round_without_gateway_s": round(seen["round_without_s"], 1),
                           "gateway_rejoin_s": round(seen["rejoin_s"], 1),
                           "superlink_crash_to_end_s": round(seen["crash_to_end_s"], 1),
                           "restart_scenario_exit": seen["exit"]})
    print(json.dumps(result))
    if started:
        stop_engine()


if __name__ == "__main__":
    main()
