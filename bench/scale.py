"""Scale-out benchmark: engine=sim with many virtual gateways on this machine.

Prints one JSON line:
  gateways, rounds, sampled_per_round   the fleet and how many gateways train each round
  wall_s                 `iiotfl run` from process start to exit (start-up, the fleet-wide
                         statistics query of every gateway, the rounds, the report)
  outside_rounds_s       wall_s minus the rounds: start-up (SuperLink, Ray), the fleet-wide
                         statistics query every gateway answers, the final report, teardown
  mean_round_s           mean wall time of a federated round
  train_s_per_gateway    mean local training time of a sampled gateway
  peak_memory_gib        peak proportional set size (PSS) summed over the run's whole process
                         tree (SuperLink, Ray workers, ServerApp), sampled every 0.5 s
  target_memory_gib      8

Usage: python bench/scale.py [--gateways 1000] [--rounds 2] [--fraction 0.01] [extra Hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def tree_pss(root: int) -> int:
    """Bytes of PSS of ``root`` and all its descendants (shared pages counted once overall)."""
    kids, stack, total = _children(), [root], 0
    while stack:
        pid = stack.pop()
        stack += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(x.split()[1]) * 1024 for x in fh if x.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.01)
    args, extra = ap.parse_known_args()
    run_dir = Path(tempfile.mkdtemp(prefix="iiotfl-scale-")) / "run"
    argv = [str(Path(sys.executable).parent / "iiotfl"), "run", "engine=sim", f"fleet.gateways={args.gateways}",
            f"fleet.rounds={args.rounds}", f"fleet.fraction_train={args.fraction}", *extra, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({run_dir}): {proc.stderr.read()[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [c.get("train_time") for r in rows[1:] for c in r.get("clients", []) if c.get("train_time")]
    print(json.dumps({
        "bench": "scale", "engine": "sim", "gateways": args.gateways, "rounds": args.rounds,
        "sampled_per_round": round(sum(r.get("aggregated") or 0 for r in rows[1:]) / max(len(rows) - 1, 1), 1),
        "wall_s": round(wall, 1),
        "outside_rounds_s": round(wall - sum(r["round_time"] for r in rows[1:]), 1),
        "mean_round_s": round(sum(r["round_time"] for r in rows[1:]) / max(len(rows) - 1, 1), 1),
        "train_s_per_gateway": round(sum(trained) / max(len(trained), 1), 2),
        "peak_memory_gib": round(peak / 2**30, 2), "target_memory_gib": 8,
        "final_metric": rows[-1]["server"], "run_dir": str(run_dir),
    }), flush=True)


if __name__ == "__main__":
    main()
