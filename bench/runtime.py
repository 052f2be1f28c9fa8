"""Runtime benchmark: a shaped round against its link bound, with the warm ClientApp runtime on and off.

Prints one JSON line per link profile and runtime (engine=fleet, two gateways: one core each on this
two-core machine, so the figures are not a contest for the host's CPU):

  measured_round_s       the round as the ServerApp saw it (push to the last reply)
  link_bound_round_s     compute + bytes over the link rates + the exchange's round trips
  round_over_bound       a gateway's measured round / its link bound, averaged
  the time split, seconds per gateway and round:
    compute_s            the ClientApp's handler
    transfer_s           bytes over the rates + round trips (the link bound's share)
    pull_wait_s          from the ServerApp's push until the task's process exists (the SuperNode's
                         pull interval, the ServerApp's own push)
    process_start_s      from the process's start to the handler, less message_in_s (a fork or an
                         interpreter and its imports; the FAB, the app)
    message_in_s         warm runtime: the process waiting for the message's objects (over the link,
                         through the SuperNode); with Flower's own runtime that is part of the start
    push_wait_s          from the handler's end until the ServerApp has the reply
    server_s             the ServerApp's own work per round (evaluation, checkpoint, reports, pushing)
  sim_over_measured      engine=sim's simulated clock / the measured round (warm runtime only)

and the idle polling traffic of an nb_iot gateway that waits for a run, in bytes per hour on its
shaped link, with a pull ceiling of 3 s (Flower's own, every profile's idle_poll_s) and of 10 s.

Usage: python bench/runtime.py [--quick]    (--quick: ethernet only, 3 rounds, 60 s idle)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GATEWAYS = 2

from bench.links import mean, run  # noqa: E402  # one way to run `iiotfl run` and average for both benches


def shaped(tmp: Path, link: str, runtime: str, rounds: int) -> dict:
    common = [f"fleet.gateways={GATEWAYS}", f"fleet.rounds={rounds}", f"link={link}"]
    rows = run(tmp / f"fleet-{link}-{runtime}", *common, f"engine.clientapp_runtime={runtime}")[1:]
    gws = [g for r in rows for g in r["gateways"] if g.get("status") == "aggregated"]
    measured = mean(r["train_s"] for r in rows)
    out = {
        "config": f"shaped {link}", "runtime": runtime, "gateways": GATEWAYS, "rounds": rounds,
        "measured_round_s": measured,
        "link_bound_round_s": mean(r["bound_round_s"] for r in rows),
        "round_over_bound": mean(g["round_s"] / g["bound_s"] for g in gws),
        "compute_s": mean(g["compute_s"] for g in gws),
        "transfer_s": mean(g["transfer_s"] for g in gws),
        "pull_wait_s": mean(g.get("before_process_s") for g in gws),
        "process_start_s": mean(g.get("startup_s") for g in gws),
        "message_in_s": mean(g.get("message_s") for g in gws),
        "push_wait_s": mean(g.get("after_reply_s") for g in gws),
        "server_s": mean(r["round_time"] - r["train_s"] + r.get("push_s", 0.0) for r in rows),
        "rmse": round(rows[-1]["server"]["rmse"], 4),
    }
    if runtime == "warm" and link != "none":
        sim = run(tmp / f"sim-{link}", "engine=sim", *common)[1:]
        sim_round = mean(r["sim_round_s"] for r in sim)
        out["sim_round_s"] = sim_round
        out["sim_over_measured"] = round(sim_round / measured, 3) if sim_round and measured else None
    return out


def idle_bytes_per_hour(tmp: Path, link: str, seconds: float, idle_poll: float | None) -> dict:
    """A shaped fleet of one gateway with no run: its link's wire bytes over ``seconds``."""
    from iiotfl.configs import compose
    from iiotfl.server.launch import Deployment

    cfg = compose(["fleet.gateways=1", f"link={link}"])
    name = f"poll-{idle_poll or 'profile'}"
    with Deployment(cfg, tmp / f"idle-{link}-{name}") as dep:
        if idle_poll is not None:  # the fleet passes the profile's idle_poll_s; override it
            argv = dep.gateway_argv
            dep.gateway_argv = lambda i, sl: [*argv(i, sl), "--idle-poll", str(idle_poll)]  # type: ignore[method-assign]
        dep.start()
        time.sleep(20)  # joined and settled
        before = dep.wire_counters()
        time.sleep(seconds)
        after = dep.wire_counters()
    if not before or not after:
        return {"config": f"idle {link}", "error": "links not shaped here (needs root, tc, namespaces)"}
    up, down = after[0]["up"] - before[0]["up"], after[0]["down"] - before[0]["down"]
    return {"config": f"idle {link}", "idle_poll_s": idle_poll or cfg["link"]["idle_poll_s"], "seconds": seconds,
            "bytes_up_per_hour": round(up * 3600 / seconds), "bytes_down_per_hour": round(down * 3600 / seconds),
            "bytes_per_hour": round((up + down) * 3600 / seconds)}


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 3 if quick else 5
    # none: loopback, nothing shaped, so process_start_s is the start of a task's process alone
    links = ["ethernet"] if quick else ["none", "ethernet", "lte_m"]
    idle_s = 60.0 if quick else 300.0
    with tempfile.TemporaryDirectory(prefix="bench-iiotfl-") as tmp:
        tmp_path = Path(tmp)
        for link in links:
            for runtime in ("warm", "cold"):
                print(json.dumps(shaped(tmp_path, link, runtime, rounds)), flush=True)
        for idle_poll in (3.0, 10.0):
            print(json.dumps(idle_bytes_per_hour(tmp_path, "nb_iot", idle_s, idle_poll)), flush=True)


if __name__ == "__main__":
    main()
