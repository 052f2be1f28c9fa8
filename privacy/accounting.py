"""Privacy accounting: the budget on a device, and an independent check of every ε reported.

On a gateway (sample-level DP) :class:`DeviceAccountant` keeps the DP-SGD history
``[(noise multiplier, sample rate, steps), ...]`` of every round this device trained in
(Opacus' own RDP accountant computes ε from it), so ε composes over the whole run. Every
reply carries that history, steps summed per (noise multiplier, sample rate): a reply that
came late, or beyond the first K, is covered by the device's next one.

:func:`check` recomputes an ε from recorded parameters with Google's ``dp-accounting``,
by RDP (the same orders as Opacus) and by PLD (privacy loss distributions, tighter),
and says whether the reported ε agrees with the RDP figure within ``tolerance``.
:func:`accounting_check` does so for every ε a run reported: each device's reports
(sample-level), the fleet's ε after every round (client-level; a round that released no
aggregate spends nothing, one that did spends it at the noise in it).
"""

from __future__ import annotations

# Opacus and dp-accounting are imported where they are used: every ClientApp process imports this
# module, and they would add seconds to its start.
from dataclasses import dataclass, field
from typing import Iterable

from iiotfl.privacy.ledger import device_reports, released_noise

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
        acc.history = merged([*self.history, *extra])  # one RDP curve per (sigma, q), not per round
        return float(acc.get_epsilon(self.delta)) if acc.history else 0.0

    def would_exceed(self, budget: float, sigma: float, q: float, steps: int) -> bool:
        return self.epsilon([(sigma, q, steps)]) > budget * (1 + 1e-9)

    def totals(self) -> list[tuple[float, float, int]]:
        """The history with the steps of each (sigma, q) summed: what a reply reports (see :func:`merged`)."""
        return merged(self.history)


def merged(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Steps summed per (sigma, q), in order of first use: the same ε, as RDP composes by adding."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


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


def recompute_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of a history of sampled Gaussian mechanisms by RDP (dp-accounting, Opacus' orders)."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    if not history:
        return 0.0
    rdp = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    rdp.compose(dp_accounting.ComposedDpEvent(list(_events(history))))
    return float(rdp.get_epsilon(delta))


def recompute(history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
    """ε of a history of sampled Gaussian mechanisms, by RDP and by PLD (dp-accounting)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    if not history:
        return {"rdp": 0.0, "pld": 0.0}
    composed = dp_accounting.ComposedDpEvent(list(_events(history)))
    eps_rdp = recompute_rdp(history, delta)
    # PLD's grid spans the privacy-loss range (about 1/(2 sigma^2)): a fixed 1e-3 step needs
    # gigabytes at tiny noise, so the step grows with epsilon (relative error stays ~1e-4)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=max(1e-3, 1e-4 * eps_rdp))
    pld.compose(composed)
    return {"rdp": eps_rdp, "pld": float(pld.get_epsilon(delta))}


def agrees(reported: float, recomputed: float, tolerance: float = 0.02) -> bool:
    """Whether a reported ε is the recomputed one within ``tolerance`` (relative)."""
    return abs(reported - recomputed) <= tolerance * max(recomputed, 1e-12)


def check(reported: float, history: list[tuple[float, float, int]], delta: float,
          tolerance: float = 0.02) -> dict[str, float | bool]:
    """Reported ε against dp-accounting's RDP (and PLD for reference)."""
    again = recompute(history, delta)
    ok = agrees(reported, again["rdp"], tolerance)
    return {"reported": reported, "rdp": again["rdp"], "pld": again["pld"], "ok": bool(ok)}


def _checked(scope: str, reports: list[tuple[int, float, list, float]], tolerance: float) -> dict:
    """Every report ``(round, ε, history, δ)`` of one scope recomputed (RDP), the last one also by PLD."""
    seen: dict[tuple, float] = {}  # a device that stopped reports the same history round after round
    mismatched = []
    for rnd, eps, history, delta in reports[:-1]:
        key = (tuple(history), delta)
        if key not in seen:
            seen[key] = recompute_rdp(history, delta)
        if not agrees(eps, seen[key], tolerance):
            mismatched.append(rnd)
    rnd, eps, history, delta = reports[-1]
    last = check(eps, history, delta, tolerance)
    mismatched += [] if last["ok"] else [rnd]
    return {"scope": scope, "delta": delta, **last, "ok": not mismatched, "rounds_checked": len(reports),
            "mismatched_rounds": mismatched}


def _sample_checks(ledger_rows: list[dict], tolerance: float) -> list[dict]:
    """Per device: every ε it reported against the DP-SGD history it reported with it."""
    out = []
    for gateway, d in sorted(device_reports(ledger_rows).items(), key=lambda kv: (kv[0] is None, kv[0])):
        reports = [(r["round"], float(r["epsilon"]), merged(r["history"]), float(r["delta"])) for r in d["reports"]]
        if not reports:  # late every time it was asked: it reported nothing to check
            continue
        out.append({**_checked(f"gateway {gateway}", reports, tolerance), "unreported_rounds": d["unreported"]})
    return out


def _client_checks(rounds: list[dict], tolerance: float) -> list[dict]:
    """The fleet's ε after every round against the releases so far, each at the noise in it."""
    done = [r for r in rounds if r.get("round") and (r.get("privacy") or {}).get("epsilon") is not None]
    history: list[tuple[float, float, int]] = []
    reports = []
    for r in done:
        noise = released_noise(r)
        if noise is not None:  # no amplification: q = 1
            history = merged([*history, (noise, 1.0, 1)])
        reports.append((r["round"], float(r["privacy"]["epsilon"]), history, float(r["privacy"]["delta"])))
    return [{**_checked("fleet", reports, tolerance), "releases": sum(n for _, _, n in history)}] if reports else []


def accounting_check(cfg, ledger_rows: list[dict], rounds: list[dict], tolerance: float = 0.02) -> dict:
    """Every ε the run reported, recomputed from its recorded parameters (see :func:`check`); a
    scope fails when any of its reports is off by more than ``tolerance``."""
    name = (cfg.get("privacy") or {}).get("name", "none")
    checks = (_sample_checks(ledger_rows, tolerance) if name == "sample"
              else _client_checks(rounds, tolerance) if name == "client" else [])
    return {"mechanism": name, "checks": checks}
