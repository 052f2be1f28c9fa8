"""Client-level differential privacy: Flower's own DP wrappers and RDP accountant.

``privacy=client`` wraps Flower's ``FedAvg`` in ``DifferentialPrivacyServerSideFixedClipping``
(the server clips every gateway's update to ``clipping_norm``) or
``DifferentialPrivacyClientSideFixedClipping`` (each gateway clips, with Flower's
``fixedclipping_mod``), which add Gaussian noise of ``noise_multiplier x clipping_norm``
to the sum. Flower's ``RdpAccountant`` (``flwr[dp]``, backed by dp-accounting) composes one
release per round: every gateway takes part every round with equal weight
(``dp-weight``), no amplification by sampling is claimed. Nothing here re-implements
clipping, noise or accounting; this file only wires them and tells how many rounds the
budget allows, so the run can stop cleanly at the budget instead of failing mid-round.

Flower composes a round into the accountant only when it releases a noised aggregate (a round
skipped for too few replies releases nothing and spends nothing). :class:`ServerSideClipping`
and :class:`ClientSideClipping` are Flower's wrappers that also say, in ``privacy_spent``,
the noise multiplier of this round's release (None for a round without one): what the round
log records and :func:`privacy.accounting.accounting_check` recomputes ε from.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, Mapping

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from iiotfl.compat.flower import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from iiotfl.strategies import wire


def client_level(cfg: Mapping[str, Any]) -> bool:
    """Whether the run asks for client-level DP (``privacy=client``)."""
    return (cfg.get("privacy") or {}).get("name") == "client"


def fleet_delta(cfg: Mapping[str, Any]) -> float:
    return float(cfg["privacy"].get("delta") or 1.0 / (10 * int(cfg["fleet"]["gateways"])))


def privacy_config(cfg: Mapping[str, Any]) -> PrivacyConfig:
    budget = cfg["privacy"].get("budget")
    return PrivacyConfig(
        target_delta=fleet_delta(cfg), population_size=int(cfg["fleet"]["gateways"]),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=float(budget) if budget else None,
    )


def _epsilon(cfg: Mapping[str, Any], sigma: float, rounds: int) -> float:
    pc = privacy_config(cfg)
    acc = RdpAccountant(PrivacyConfig(pc.target_delta, pc.population_size, pc.neighboring_relation, pc.sampling_method))
    n = pc.population_size
    acc.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=n, population_size=n), rounds)
    return acc.get_epsilon(pc.target_delta)


def noise_multiplier(cfg: Mapping[str, Any]) -> float:
    """``privacy.noise_multiplier``, or the one that spends ``privacy.epsilon`` over all rounds."""
    priv = cfg["privacy"]
    if not priv.get("epsilon"):
        return float(priv["noise_multiplier"])
    target, rounds = float(priv["epsilon"]), int(cfg["fleet"]["rounds"])
    low, high = 1e-2, 1e4
    for _ in range(60):  # bisection on a decreasing function of sigma
        mid = (low * high) ** 0.5
        low, high = (low, mid) if _epsilon(cfg, mid, rounds) <= target else (mid, high)
    return high


def rounds_within_budget(cfg: Mapping[str, Any]) -> int:
    """How many of ``fleet.rounds`` the budget allows (all of them without a budget)."""
    rounds = int(cfg["fleet"]["rounds"])
    pc = privacy_config(cfg)
    if pc.max_epsilon is None:
        return rounds
    acc = RdpAccountant(pc)
    n = pc.population_size
    event = GaussianPrivacyEvent(noise_multiplier=noise_multiplier(cfg), sample_size=n,
                                 population_size=n)
    done = 0
    while done < rounds and not acc.would_exceed(event):
        acc.compose(event)
        done += 1
    return done


class _ReleaseNoise:
    """Mixed into Flower's DP wrappers: ``privacy_spent`` also names this round's release noise."""

    released: float | None = None  # noise multiplier of the last round's release, None if it released none
    noise_multiplier: float

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        before = _releases(self)
        out = super().aggregate_train(server_round, replies)  # type: ignore[misc]  # the Flower wrapper's
        self.released = self.noise_multiplier if _releases(self) > before else None
        return out

    def privacy_spent(self) -> SimpleNamespace | None:  # PrivacySpent, and the noise
        return _spent(self)


class ServerSideClipping(_ReleaseNoise, DifferentialPrivacyServerSideFixedClipping):  # type: ignore[misc]
    """Flower's server-side clipping wrapper; ``privacy_spent`` also names this round's release noise."""


class ClientSideClipping(_ReleaseNoise, DifferentialPrivacyClientSideFixedClipping):  # type: ignore[misc]
    """Flower's client-side clipping wrapper; ``privacy_spent`` also names this round's release noise."""


def _releases(wrapper: Any) -> int:  # a ServerSideClipping or ClientSideClipping
    return wrapper.accountant.get_privacy_spent().num_releases if wrapper.accountant is not None else 0


def _spent(wrapper: Any) -> SimpleNamespace | None:  # a ServerSideClipping or ClientSideClipping
    """ε and δ so far (Flower's accountant), and the noise multiplier of the last round's release."""
    if wrapper.accountant is None:
        return None
    spent = wrapper.accountant.get_privacy_spent()
    return SimpleNamespace(epsilon=spent.epsilon, delta=spent.delta, num_releases=spent.num_releases,
                           noise_multiplier=wrapper.released)


def build_client_dp(cfg: Mapping[str, Any]) -> Strategy:
    fleet, priv = cfg["fleet"], cfg["privacy"]
    n = int(fleet["gateways"])
    base = FedAvg(
        fraction_train=1.0, fraction_evaluate=float(fleet["fraction_evaluate"]), min_train_nodes=n,
        min_evaluate_nodes=1, min_available_nodes=n, weighted_by_key=wire.DP_WEIGHT,
    )
    wrapper = ClientSideClipping if priv.get("clipping") == "client" else ServerSideClipping
    return wrapper(base, noise_multiplier=noise_multiplier(cfg), clipping_norm=float(priv["clipping_norm"]),
                   num_sampled_clients=n, accountant=RdpAccountant(privacy_config(cfg)))
