"""Privacy benchmark: utility and measured leakage against ε, and the cost of DP-SGD.

Prints JSON lines:

  {"config": "step_time", ...}      DP-SGD step time / plain step time (same model, batch 64, medians)
  {"config": "sample eps=<e>", ...} sample-level DP (DP-SGD on every gateway), engine=sim,
                                    default fleet: final RMSE, ε reported, accounting check,
                                    membership AUC (loss threshold, LiRA) of the final model
  {"config": "client eps=<e>", ...} client-level DP (Flower's wrappers), same fleet
  {"config": "information_loss", ...} utility cost of on-device data minimisation: RMSE with the
                                    7 sensors of MINIMAL against all 14 informative ones (pseudonyms
                                    and cycle positions are lossless by construction)

ε = inf is the non-private run. Usage: python bench/privacy.py [--quick] [--refs K]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
IIOTFL = Path(sys.executable).parent / "iiotfl"


def step_time_ratio(batches: int = 40) -> dict:
    """Median time of one optimiser step: plain Adam, and DP-SGD as the gateways run it (Opacus
    ghost clipping) and with Opacus' per-sample-gradient hooks."""
    import statistics

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from iiotfl.tasks.predictive_maintenance.model import RulCNN

    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(64 * batches, 30, 14), torch.rand(64 * batches))

    def median_step(model, opt, loss_fn, loader):
        times = []
        for xb, yb in loader:
            start = time.perf_counter()
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:])

    plain = RulCNN()
    t_plain = median_step(plain, torch.optim.Adam(plain.parameters()), torch.nn.MSELoss(),
                          DataLoader(data, batch_size=64))
    out = {"config": "step_time", "plain_step_s": round(t_plain, 5)}
    for mode in ("ghost", "hooks"):
        m = RulCNN()
        extra = {"criterion": torch.nn.MSELoss()} if mode == "ghost" else {}
        made = PrivacyEngine().make_private(
            module=m, optimizer=torch.optim.Adam(m.parameters()), data_loader=DataLoader(data, batch_size=64),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode, **extra)
        model, opt, loader = made[0], made[1], made[-1]
        loss_fn = made[2] if mode == "ghost" else torch.nn.MSELoss()
        t = median_step(model, opt, loss_fn, loader)
        out[f"dp_sgd_{mode}_step_s"] = round(t, 5)
        out[f"dp_{mode}_over_plain"] = round(t / t_plain, 3)
    return out


def run(run_dir: Path, refs: int, *overrides: str) -> dict:
    proc = subprocess.run([str(IIOTFL), "run", "engine=sim", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-500:]}
    summary = json.loads((run_dir / "metrics.json").read_text())
    last = [r for r in summary["rounds"] if r["round"]][-1]
    out = {"final_rmse": round(last["server"]["rmse"], 4), "rounds": len(summary["rounds"]) - 1}
    priv = last.get("privacy") or {}
    out["epsilon_reported"] = priv.get("epsilon", priv.get("device_epsilon_max"))
    checks = (summary.get("privacy") or {}).get("checks") or []
    out["accounting_check_ok"] = all(c["ok"] for c in checks) if checks else None
    if checks:
        out["epsilon_pld"] = round(max(c["pld"] for c in checks), 4)
    if not refs:
        return out
    audit = subprocess.run([str(IIOTFL), "audit", str(run_dir), "--refs", str(refs)], cwd=ROOT,
                           capture_output=True, text=True, timeout=3600)
    if audit.returncode == 0:
        a = json.loads((run_dir / "audit.json").read_text())
        out.update(mia_auc_loss=round(a["loss_threshold"]["auc"], 4), mia_auc_lira=round(a["lira"]["auc"], 4),
                   tpr_at_1pct_fpr_lira=round(a["lira"]["at_fpr_1%"]["tpr"], 4))
    return out


MINIMAL = "[T30,T50,P30,Ps30,phi,BPR,W31]"


def main() -> None:
    quick = "--quick" in sys.argv
    refs = int(sys.argv[sys.argv.index("--refs") + 1]) if "--refs" in sys.argv else 2
    print(json.dumps(step_time_ratio()), flush=True)
    epsilons = [1.0, float("inf")] if quick else [0.5, 1.0, 3.0, 8.0, float("inf")]
    with tempfile.TemporaryDirectory(prefix="bench-iiotfl-") as tmp:
        tmp = Path(tmp)
        for level in ("sample", "client"):
            for eps in epsilons:
                if eps == float("inf"):
                    if level == "client":
                        continue  # the same non-private run as for sample level
                    overrides = ["privacy=none"]
                else:
                    overrides = [f"privacy={level}", f"privacy.epsilon={eps}"]
                res = run(tmp / f"{level}-{eps}", refs, *overrides)
                print(json.dumps({"config": f"{level} eps={eps}", **res}), flush=True)
                if level == "sample" and eps == float("inf"):
                    full = res
        small = run(tmp / "minimal", 0, f"task.features={MINIMAL}")
        print(json.dumps({"config": "information_loss", "features": MINIMAL, "rmse_minimal": small.get("final_rmse"),
                          "rmse_all_14": full.get("final_rmse"),
                          "rmse_increase": round(small["final_rmse"] / full["final_rmse"] - 1, 4)
                          if "final_rmse" in small and "final_rmse" in full else None}), flush=True)


if __name__ == "__main__":
    main()
