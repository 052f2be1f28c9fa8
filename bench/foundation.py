"""Foundation benchmark: the default job on the local fleet versus centralised training.

Prints one JSON line:
  default_job_wall_s      `iiotfl run` with the built-in defaults, process start to exit
  mean_round_s            mean wall time of a federated round (train + server evaluation)
  bytes_up_per_client_round / bytes_down_per_client_round   model payload per gateway and round
  superlink_bytes_per_client_round   all traffic the SuperLink counted, per gateway and round
  federated_rmse          final global RMSE on the held-out units
  centralised_rmse        the same model trained on the pooled training data of all plants
                          for the same number of epochs (rounds x local epochs), same test set
  federated_over_centralised   ratio (target <= 1.15)

Usage: python bench/foundation.py [extra Hydra overrides for both runs]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iiotfl.configs import compose
from iiotfl.server.report import run_summary

ROOT = Path(__file__).resolve().parent.parent


def federated(overrides: list[str], run_dir: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "iiotfl"), "run", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"default job failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return {"wall": wall, **run_summary(run_dir)}


def centralised(cfg: dict) -> float:
    from use_cases import centralised as pooled  # bench/use_cases.py: the same for every task

    return pooled(cfg)[0]["rmse"]


def main() -> None:
    overrides = sys.argv[1:]
    cfg = compose(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        fed = federated(overrides, Path(tmp) / "run")
    central = centralised(cfg)
    clients_rounds = int(cfg["fleet"]["gateways"]) * fed["rounds_done"]
    print(
        json.dumps(
            {
                "bench": "foundation",
                "engine": fed["engine"],
                "gateways": cfg["fleet"]["gateways"],
                "rounds": fed["rounds_done"],
                "default_job_wall_s": round(fed["wall"], 1),
                "mean_round_s": round(fed["mean_round_s"], 2),
                "bytes_up_per_client_round": fed["bytes_up_per_client_round"],
                "bytes_down_per_client_round": fed["bytes_down_per_client_round"],
                "superlink_bytes_per_client_round": (
                    round(fed["superlink_bytes"] / clients_rounds) if fed["superlink_bytes"] else None
                ),
                "federated_rmse": round(fed["final_rmse"], 3),
                "centralised_rmse": round(central, 3),
                "federated_over_centralised": round(fed["final_rmse"] / central, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
