"""Links benchmark: codec sizes and metric loss, shaped round time against the link bound.

Prints one JSON line per configuration:

  {"config": "codec=<name>", ...}  on engine=sim (the same ServerApp/ClientApp maths as
      the fleet, faster): bytes per client per round up and down relative to float32,
      final RMSE and its loss relative to the float32 run (same seed, same rounds).
  {"config": "shaped <link>", ...}  on a shaped fleet (engine=fleet) and on engine=sim
      with the same profiles:
      round_over_bound       measured round time of a gateway / (compute + bytes/rate + RTTs)
      of the rest (seconds per gateway and round): before_process_s (SuperNode pull interval
      and downlink before the ClientApp process exists), startup_s (ClientApp process start
      and imports), after_reply_s (uplink, push, the server's poll)
      sim_over_measured      the simulated clock on engine=sim / measured round time on the fleet

Usage: python bench/links.py [--quick] [--codecs-only | --shaped-only]
(--quick: fewer rounds, two codecs, one link)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IIOTFL = Path(sys.executable).parent / "iiotfl"
GATEWAYS = 2


def run(run_dir: Path, *overrides: str) -> list[dict]:
    proc = subprocess.run([str(IIOTFL), "run", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"run {overrides} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.fmean(vals), 4) if vals else None


def gateways(rows: list[dict]) -> list[dict]:
    return [g for r in rows[1:] for g in r["gateways"] if g.get("status") == "aggregated"]


def main() -> None:
    quick = "--quick" in sys.argv
    do_codecs, do_shaped = "--shaped-only" not in sys.argv, "--codecs-only" not in sys.argv
    rounds = "3" if quick else "8"
    codecs = ["none", "int8"] if quick else ["none", "fp16", "int8", "int4", "topk"]
    links = [("lte_m", [])] if quick else [("lte_m", []), ("lte_m+nb_iot", ["fleet.link_mix={lte_m:0.5,nb_iot:0.5}"])]
    with tempfile.TemporaryDirectory(prefix="bench-iiotfl-") as tmp:
        tmp = Path(tmp)
        base = None
        for codec in codecs if do_codecs else []:
            rows = run(tmp / f"codec-{codec}", "engine=sim", f"fleet.rounds={rounds}", f"codec={codec}")
            gws = gateways(rows)
            up, down = mean(g["bytes_up"] for g in gws), mean(g["bytes_down"] for g in gws)
            rmse = rows[-1]["server"]["rmse"]
            if base is None:
                base = (up, down, rmse)
            print(json.dumps({
                "config": f"codec={codec}", "rounds": int(rounds),
                "bytes_up_per_client_round": up, "up_vs_float32": round(up / base[0], 4),
                "bytes_down_per_client_round": down, "down_vs_float32": round(down / base[1], 4),
                "final_rmse": round(rmse, 4), "rmse_loss_vs_float32": round(rmse / base[2] - 1, 4),
            }), flush=True)
        shaped_rounds = "3" if quick else "4"
        for name, extra in links if do_shaped else []:
            link = name.split("+")[0]
            # two gateways: each emulated device gets one of this machine's two cores, so the
            # measurement is not a contest for the host's CPU
            common = [f"fleet.gateways={GATEWAYS}", f"fleet.rounds={shaped_rounds}", "codec=int8", f"link={link}", *extra]
            fleet = run(tmp / f"fleet-{name}", *common)
            sim = run(tmp / f"sim-{name}", "engine=sim", *common)
            gws = gateways(fleet)
            measured_round = mean(r["train_s"] for r in fleet[1:])
            sim_round = mean(r["sim_round_s"] for r in sim[1:])
            print(json.dumps({
                "config": f"shaped {name}", "codec": "int8", "gateways": GATEWAYS, "rounds": int(shaped_rounds),
                "measured_round_s": measured_round,
                "link_bound_round_s": mean(r["bound_round_s"] for r in fleet[1:]),
                "round_over_bound": mean(g["round_s"] / g["bound_s"] for g in gws),
                "compute_s": mean(g["compute_s"] for g in gws),
                "transfer_s": mean(g["transfer_s"] for g in gws),
                "before_process_s": mean(g.get("before_process_s") for g in gws),
                "startup_s": mean(g.get("startup_s") for g in gws),
                "after_reply_s": mean(g.get("after_reply_s") for g in gws),
                "wire_over_app_bytes": mean((g["wire_up"] + g["wire_down"]) / (g["bytes_up"] + g["bytes_down"])
                                            for g in gws if "wire_up" in g),
                "fleet_sim_clock_round_s": mean(r["sim_round_s"] for r in fleet[1:]),
                "sim_engine_round_s": sim_round,
                "sim_over_measured": round(sim_round / measured_round, 4) if sim_round and measured_round else None,
                "fleet_rmse": round(fleet[-1]["server"]["rmse"], 4), "sim_rmse": round(sim[-1]["server"]["rmse"], 4),
            }), flush=True)


if __name__ == "__main__":
    main()
