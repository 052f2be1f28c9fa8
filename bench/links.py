"""Links benchmark: bytes against metric per codec and task, shaped round time against the link bound.

Prints one JSON line per configuration:

  {"config": "codec=<name> ...", "task": ...}  on engine=sim (the same ServerApp/ClientApp maths
      as the fleet, faster), per task: bytes per gateway and round up and down relative to float32
      (Adam, the default), the final metric and its loss relative to that float32 run
      ("metric_loss": positive = worse, whichever way the task's metric points), and the same
      against float32 with the codec's own local optimiser ("loss_vs_float32_same_optimiser").
      Same seed, same rounds; the rows of one task are its bytes <-> metric curve.
  {"config": "shaped <link>", ...}  on a shaped fleet (engine=fleet) and on engine=sim
      with the same profiles:
      round_over_bound       measured round time of a gateway / (compute + bytes/rate + RTTs)
      of the rest (seconds per gateway and round): before_process_s (SuperNode pull interval
      and downlink before the ClientApp process exists), startup_s (ClientApp process start
      and imports), after_reply_s (uplink, push, the server's poll)
      sim_over_measured      the simulated clock on engine=sim / measured round time on the fleet

Usage: python bench/links.py [--quick] [--codecs-only | --shaped-only] [--task NAME]
(--quick: fewer rounds, fewer codecs, one task, one link)
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
TASKS = ("predictive_maintenance", "energy_anomaly", "quality_control")
# The local SGD learning rate each task trains well with (train.optimizer=sgd, momentum 0.9), picked on
# float32 runs of the default fleet; Adam's train.lr=0.001 is the default of every task.
SGD_LR = {"predictive_maintenance": 0.01, "energy_anomaly": 0.02, "quality_control": 0.05}
# (name, overrides, local optimiser): the float32 reference first, then the curve
CODECS = [
    ("codec=none", [], "adam"),
    ("codec=none", [], "sgd"),
    ("codec=int8", ["codec=int8"], "adam"),
    ("codec=int4", ["codec=int4"], "adam"),
    ("codec=topk", ["codec=topk"], "adam"),
    ("codec=sparse k=0.08", ["codec=sparse", "codec.k_fraction=0.08"], "sgd"),
    ("codec=sparse k=0.04", ["codec=sparse"], "sgd"),
    ("codec=sparse k=0.02", ["codec=sparse", "codec.k_fraction=0.02"], "sgd"),
    ("codec=sparse k=0.04 bits=1", ["codec=sparse", "codec.bits=1"], "sgd"),
    ("codec=sparse k=0.04 adam", ["codec=sparse"], "adam"),
]


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


def optimiser(task: str, name: str) -> list[str]:
    return [] if name == "adam" else ["train.optimizer=sgd", "train.momentum=0.9", f"train.lr={SGD_LR[task]}"]


def codec_rows(tmp: Path, task: str, rounds: str, codecs: list) -> None:
    """One task's curve: every codec against float32 with Adam and with the codec's own optimiser."""
    from iiotfl.tasks import task_class

    cls = task_class(task)
    metric, higher = cls.primary_metric, cls.higher_is_better
    ref: dict[str, tuple[float, float, float]] = {}  # optimiser -> float32's (up, down, metric)

    def loss(value: float, against: float) -> float:
        return round((against - value) / against if higher else (value - against) / against, 4)

    for name, overrides, opt in codecs:
        rows = run(tmp / f"{task}-{name}-{opt}".replace(" ", "_").replace("=", "-"), "engine=sim", f"task={task}",
                   f"fleet.rounds={rounds}", *overrides, *optimiser(task, opt))
        gws = gateways(rows)
        up, down = mean(g["bytes_up"] for g in gws), mean(g["bytes_down"] for g in gws)
        value = rows[-1]["server"][metric]
        if name == "codec=none":
            ref[opt] = (up, down, value)
        base = ref["adam"]
        same = ref.get(opt)
        print(json.dumps({
            "config": name, "task": task, "optimiser": opt, "rounds": int(rounds), "metric": metric,
            "bytes_up_per_client_round": up, "up_vs_float32": round(up / base[0], 4),
            "bytes_down_per_client_round": down, "down_vs_float32": round(down / base[1], 4),
            "up_smaller_x": round(base[0] / up, 1), "down_smaller_x": round(base[1] / max(down, 1e-9), 1),
            "final": round(value, 4), "float32": round(base[2], 4), "metric_loss": loss(value, base[2]),
            "loss_vs_float32_same_optimiser": loss(value, same[2]) if same else None,
        }), flush=True)


def main() -> None:
    quick = "--quick" in sys.argv
    do_codecs, do_shaped = "--shaped-only" not in sys.argv, "--codecs-only" not in sys.argv
    rounds = "3" if quick else "8"
    codecs = [c for c in CODECS if c[0] in ("codec=none", "codec=sparse k=0.04")] if quick else CODECS
    tasks = [sys.argv[sys.argv.index("--task") + 1]] if "--task" in sys.argv else (
        TASKS[:1] if quick else TASKS)
    links = [("lte_m", [])] if quick else [("lte_m", []), ("lte_m+nb_iot", ["fleet.link_mix={lte_m:0.5,nb_iot:0.5}"])]
    with tempfile.TemporaryDirectory(prefix="bench-iiotfl-") as tmp:
        tmp = Path(tmp)
        for task in tasks if do_codecs else []:
            codec_rows(tmp, task, rounds, codecs)
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
