"""Membership-inference audit of a run's final global model.

Members are the windows the gateways trained on (each gateway's training split);
non-members are windows of the units each gateway held out of training (its local
validation split: whole run-to-failure units of the same plant), so both come from the
same distribution. Two attacks score every audited window; a higher score
means "more likely a member":

* **loss threshold** (Yeom et al. 2018): the negative squared error of the model;
* **LiRA, offline** (Carlini et al. 2022): reference models are trained the same way
  on fresh draws of the generator (so no audited window is in them); the score is how
  far below its reference losses a window's loss falls, in units of their spread.

Reported: ROC AUC, TPR at 1% and 0.1% FPR, and beside them what (ε, δ)-DP allows:
``TPR <= e^ε · FPR + δ`` (Kairouz et al. 2015). ``within_bound`` compares the lower
95% confidence limit of the measured TPR with that bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from iiotfl.security.artefacts import FINAL_CHECKPOINT, load_model_state
from iiotfl.tasks import get_task
from iiotfl.tasks.moments import combine


def roc_curve(member: np.ndarray, non: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([member, non])
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(non))])
    order = np.argsort(-scores, kind="stable")
    labels = labels[order]
    tpr = np.concatenate([[0.0], np.cumsum(labels) / max(len(member), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(1 - labels) / max(len(non), 1)])
    return fpr, tpr


def attack_figures(member: np.ndarray, non: np.ndarray, epsilon: float | None, delta: float | None) -> dict[str, Any]:
    fpr, tpr = roc_curve(member, non)
    auc = float(np.trapezoid(tpr, fpr))
    out: dict[str, Any] = {"auc": auc, "members": len(member), "non_members": len(non)}
    for target, name in ((0.01, "1%"), (0.001, "0.1%")):
        t = float(tpr[np.searchsorted(fpr, target, side="right") - 1])
        n = max(len(member), 1)
        lower = max(0.0, t - 1.96 * math.sqrt(max(t * (1 - t), 1.0 / n) / n))
        row = {"tpr": t, "tpr_lower95": lower}
        if epsilon is not None and math.isfinite(epsilon):
            bound = min(1.0, math.exp(epsilon) * target + (delta or 0.0))
            row.update(bound=bound, within_bound=bool(lower <= bound))
        out[f"at_fpr_{name}"] = row
    return out


def _losses(model: torch.nn.Module, task, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-record loss under the task's own criterion (squared error for RUL, BCE for failures)."""
    model.eval()
    criterion = task.loss()
    criterion.reduction = "none"
    with torch.no_grad():
        out = criterion(model(torch.from_numpy(x)), torch.from_numpy(np.asarray(task.target(y), dtype=np.float32)))
    return out.reshape(len(x), -1).mean(1).numpy()


def _audit_data(task, gateways: int, per_side: int, seed: int):
    splits = [task.gateway_data(i) for i in range(gateways)]
    normaliser = task.normaliser(combine([task.feature_sums(t) for t, _ in splits]))
    members = [task.windows(t, normaliser) for t, _ in splits]
    held_out = [task.windows(v, normaliser) for _, v in splits]
    xm, ym = np.concatenate([m[0] for m in members]), np.concatenate([m[1] for m in members])
    xn, yn = np.concatenate([m[0] for m in held_out]), np.concatenate([m[1] for m in held_out])
    rng = np.random.default_rng(seed)
    im = rng.choice(len(xm), min(per_side, len(xm)), replace=False)
    inn = rng.choice(len(xn), min(per_side, len(xn)), replace=False)
    return normaliser, (xm[im], ym[im]), (xn[inn], yn[inn])


Trainer = Callable[..., Any]  # train_local(model, x, y, *, epochs, batch_size, lr, seed, loss_fn)


def membership_audit(cfg: Mapping[str, Any], model_state: Mapping[str, torch.Tensor], epsilon: float | None = None,
                     delta: float | None = None, reference_models: int = 4, per_side: int = 2000, *,
                     train: Trainer) -> dict[str, Any]:
    """Loss-threshold and LiRA membership inference against the final model. ``train``: the gateways'
    own local training (``clients.training.train_local``), used to train the reference models."""
    torch.set_num_threads(max(1, int(cfg["train"]["torch_threads"])))
    gateways = int(cfg["fleet"]["gateways"])
    task = get_task(cfg["task"], cfg["seed"])
    normaliser, (xm, ym), (xn, yn) = _audit_data(task, gateways, per_side, cfg["seed"])
    model = task.build_model()
    model.load_state_dict(model_state)
    lm, ln = _losses(model, task, xm, ym), _losses(model, task, xn, yn)
    result: dict[str, Any] = {"loss_threshold": attack_figures(-lm, -ln, epsilon, delta)}
    # LiRA (offline): reference models trained like the fleet, centrally, on fresh generator draws
    epochs = int(cfg["fleet"]["rounds"]) * int(cfg["train"]["local_epochs"])
    ref_m, ref_n = [], []
    for k in range(reference_models):
        fresh = get_task(cfg["task"], int(cfg["seed"]) + 10_007 * (k + 1))
        xs, ys = zip(*(fresh.windows(fresh.gateway_data(i)[0], normaliser) for i in range(gateways)))
        ref = fresh.build_model()
        torch.manual_seed(k)
        train(ref, np.concatenate(xs), fresh.target(np.concatenate(ys)), epochs=epochs,
                    batch_size=int(cfg["train"]["batch_size"]), lr=float(cfg["train"]["lr"]), seed=k,
                    loss_fn=fresh.loss())
        ref_m.append(_losses(ref, task, xm, ym))
        ref_n.append(_losses(ref, task, xn, yn))
    if reference_models:
        rm, rn = np.log(np.stack(ref_m) + 1e-9), np.log(np.stack(ref_n) + 1e-9)
        spread = float(np.concatenate([rm, rn], axis=1).std(axis=0).mean()) or 1.0  # LiRA's global variance
        score_m = (rm.mean(axis=0) - np.log(lm + 1e-9)) / spread
        score_n = (rn.mean(axis=0) - np.log(ln + 1e-9)) / spread
        result["lira"] = {**attack_figures(score_m, score_n, epsilon, delta), "reference_models": reference_models}
    result.update(epsilon=epsilon, delta=delta)
    return result


def audit_run(run_dir: str | Path, reference_models: int = 4, per_side: int = 2000, *,
              train: Trainer) -> dict[str, Any]:
    """Audit a finished run directory; writes ``audit.json`` and returns it."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml" if (run_dir / "config.yaml").exists() else run_dir / ".hydra" / "config.yaml"
    if not cfg_path.exists() or not (run_dir / FINAL_CHECKPOINT).exists():
        raise FileNotFoundError(f"{run_dir} is not a finished run (needs config.yaml and {FINAL_CHECKPOINT})")
    cfg = yaml.safe_load(cfg_path.read_text())
    summary = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    epsilon, delta = None, None
    rows = [r for r in summary.get("rounds", []) if r.get("round")]
    if rows:
        last = rows[-1].get("privacy") or {}
        if "epsilon" in last:
            epsilon, delta = float(last["epsilon"]), float(last["delta"])
        elif "device_epsilon_max" in last:
            checks = (summary.get("privacy") or {}).get("checks") or []
            epsilon = float(last["device_epsilon_max"])
            delta = max((float(c["delta"]) for c in checks), default=None)
    state = load_model_state(run_dir)  # signature checked, then decrypted
    result = membership_audit(cfg, state, epsilon, delta, reference_models, per_side, train=train)
    (run_dir / "audit.json").write_text(json.dumps(result, indent=2))
    return result
