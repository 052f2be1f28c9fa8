"""Asynchronous rounds: strategy=fedbuff against synchronous FedAvg on a mixed fleet, same seed.

Prints one JSON line per run and one comparison line: for FedAvg its final metric and wall time
(simulated on engine=sim, measured on engine=fleet); for FedBuff the time its global model
first reached FedAvg's final metric, its final and best metric, and the ratio of those times
(the target: <= 0.5). ``--engine fleet`` runs the same on a shaped local fleet.

Usage: python bench/asynchronous.py [--engine sim|fleet] [--gateways N] [--versions V] [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from links import run  # bench/links.py: one `iiotfl run`, its metrics.jsonl rows


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> None:
    quick = "--quick" in sys.argv
    engine = arg("--engine", "sim")
    gateways = int(arg("--gateways", "4" if quick else "10"))
    rounds = "3" if quick else "8"
    versions = arg("--versions", "8" if quick else "30")
    fleet = [f"engine={engine}", f"fleet.gateways={gateways}", "seed=0",
             "fleet.link_mix={lte_m:0.6,nb_iot:0.3,satellite:0.1}", "fleet.outage.mode=random",
             "fleet.round_timeout=150",  # the round deadline: about 3 NB-IoT rounds
             "fleet.resend_after_s=90"]  # a message lost as its link went down goes again after 90 s of silence
    with tempfile.TemporaryDirectory(prefix="bench-iiotfl-") as tmp:
        sync = run(Path(tmp) / "fedavg", *fleet, f"fleet.rounds={rounds}")
        fb = run(Path(tmp) / "fedbuff", *fleet, "strategy=fedbuff", f"fleet.rounds={versions}")

    def times(rows: list[dict]) -> list[float]:
        """Cumulative time of each row: FedAvg's rounds add up their round time, FedBuff's versions carry it."""
        if rows[1].get("time_s") is not None:
            return [float(r["time_s"]) for r in rows[1:]]
        total, out = 0.0, []
        for r in rows[1:]:
            total += float(r["sim_round_s"] if engine == "sim" else r["train_s"])
            out.append(total)
        return out

    metric = "rmse"
    target = sync[-1]["server"][metric]
    t_sync = times(sync)
    t_fb = times(fb)
    reached = next((t for t, r in zip(t_fb, fb[1:]) if r["server"][metric] <= target), None)
    for name, rows, t in (("fedavg", sync, t_sync), ("fedbuff", fb, t_fb)):
        print(json.dumps({"run": name, "engine": engine, "gateways": gateways, "steps": len(rows) - 1,
                          "final": round(rows[-1]["server"][metric], 4),
                          "best": round(min(r["server"][metric] for r in rows[1:]), 4),
                          "end_s": round(t[-1], 1), "metric": metric}), flush=True)
    print(json.dumps({"comparison": "fedbuff time to fedavg's final metric / fedavg's time", "engine": engine,
                      "target_metric": round(target, 4), "fedavg_s": round(t_sync[-1], 1),
                      "fedbuff_s": None if reached is None else round(reached, 1),
                      "ratio": None if reached is None else round(reached / t_sync[-1], 3)}), flush=True)


if __name__ == "__main__":
    main()
