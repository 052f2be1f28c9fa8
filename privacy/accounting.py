"""Privacy accounting: the budget on a device, and an independent check of every ε reported.

On a gateway (sample-level DP) :class:`DeviceAccountant` keeps the DP-SGD history
``[(noise multiplier, sample rate, steps), ...]`` of every round this device trained in
(Opacus' own RDP accountant computes ε from it), so ε composes over the whole run.

:func:`check` recomputes an ε from recorded parameters with Google's ``dp-accounting``,
by RDP (the same orders as Opacus) and by PLD (privacy loss distributions, tighter),
and says whether the reported ε agrees with the RDP figure within ``tolerance``.
"""

from __future__ import annotations

# Opacus and dp-accounting are imported where they are used: every ClientApp process imports this
# module, and they would add seconds to its start.
from dataclasses import dataclass, field
from typing import Iterable

from iiotfl.privacy.ledger import device_histories
from iiotfl.strategies.client_dp import noise_multiplier

# Opacus' default RDP orders, so the recomputation differs only in implementation.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@dataclass
class DeviceAccountant:
    """Sample-level ε of one device across rounds (Opacus RDP)."""

    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, extra: Iterable[tuple[float, float, int]] = ()) -> float:
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(float(s), float(q), int(n)) for s, q, n in [*self.history, *extra]]
        return float(acc.get_epsilon(self.delta)) if acc.history else 0.0

    def would_exceed(self, budget: float, sigma: float, q: float, steps: int) -> bool:
        return self.epsilon([(sigma, q, steps)]) > budget * (1 + 1e-9)


def steps_per_round(records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(Poisson sample rate, steps) of one round of DP-SGD, as Opacus' DPDataLoader runs it."""
    batches = max(1, -(-records // batch_size))
    return 1.0 / batches, batches * epochs


def noise_for_target(epsilon: float, delta: float, q: float, steps: int) -> float:
    """DP-SGD noise multiplier that spends exactly ``epsilon`` over ``steps`` (Opacus, RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.005))


def _events(history: Iterable[tuple[float, float, int]]):
    import dp_accounting

    for sigma, q, steps in history:
        gauss = dp_accounting.GaussianDpEvent(float(sigma))
        event = gauss if float(q) >= 1.0 else dp_accounting.PoissonSampledDpEvent(float(q), gauss)
        yield dp_accounting.SelfComposedDpEvent(event, int(steps))


def recompute(history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
    """ε of a history of sampled Gaussian mechanisms, by RDP and by PLD (dp-accounting)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if not history:
        return {"rdp": 0.0, "pld": 0.0}
    composed = dp_accounting.ComposedDpEvent(list(_events(history)))
    rdp = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    rdp.compose(composed)
    eps_rdp = float(rdp.get_epsilon(delta))
    # PLD's grid spans the privacy-loss range (about 1/(2 sigma^2)): a fixed 1e-3 step needs
    # gigabytes at tiny noise, so the step grows with epsilon (relative error stays ~1e-4)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=max(1e-3, 1e-4 * eps_rdp))
    pld.compose(composed)
    return {"rdp": eps_rdp, "pld": float(pld.get_epsilon(delta))}


def check(reported: float, history: list[tuple[float, float, int]], delta: float,
          tolerance: float = 0.02) -> dict[str, float | bool]:
    """Reported ε against dp-accounting's RDP (and PLD for reference)."""
    again = recompute(history, delta)
    ok = abs(reported - again["rdp"]) <= tolerance * max(again["rdp"], 1e-12)
    return {"reported": reported, "rdp": again["rdp"], "pld": again["pld"], "ok": bool(ok)}


def accounting_check(cfg, ledger_rows: list[dict], rounds: list[dict], tolerance: float = 0.02) -> dict:
    """Every ε the run reported, recomputed from its recorded parameters (see :func:`check`)."""
    name = (cfg.get("privacy") or {}).get("name", "none")
    out: dict = {"mechanism": name, "checks": []}
    if name == "sample":
        for gateway, d in sorted(device_histories(ledger_rows).items()):
            if d["history"]:
                out["checks"].append({"scope": f"gateway {gateway}", "delta": d["delta"],
                                      **check(float(d["epsilon"]), d["history"], float(d["delta"]), tolerance)})
    elif name == "client":
        done = [r for r in rounds if r.get("round") and r.get("privacy", {}).get("epsilon") is not None]
        if done:
            last = done[-1]["privacy"]
            if all("noise_multiplier" in r["privacy"] for r in done):  # per-round noise (distributed DP)
                history = [(float(r["privacy"]["noise_multiplier"]), 1.0, 1) for r in done]
            else:
                history = [(noise_multiplier(cfg), 1.0, len(done))]  # no amplification: q = 1
            out["checks"].append({"scope": "fleet", "delta": last["delta"],
                                  **check(float(last["epsilon"]), history, float(last["delta"]), tolerance)})
    return out
