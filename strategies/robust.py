"""Robust aggregation against poisoned gateways: Flower's own rules behind the update codecs.

``strategy=krum | median | trimmed_mean`` is Flower's ``Krum`` / ``MultiKrum``,
``FedMedian`` or ``FedTrimmedAvg`` (``flwr.serverapp.strategy``) with
:class:`~strategies.codec_fedavg.CodecFedAvg` in front: sampling, over-selection and the
delta downlink are CodecFedAvg's, and its ``aggregate_train`` decodes every gateway's
update into full weights (the view it started from + the decoded update) before handing
the replies to the Flower rule. Nothing here re-implements a rule:

* ``krum``: Flower's Krum (``num_nodes_to_keep: 1``) keeps the one update with the smallest
  sum of squared distances to its n - f - 2 nearest neighbours (f = ``num_malicious_nodes``);
  Multi-Krum (``num_nodes_to_keep: m > 1``) averages the m best, weighted by ``num-examples``.
  Tolerates f poisoned gateways when a round has n >= 2f + 3 updates.
* ``median``: Flower's FedMedian, the coordinate-wise median (unweighted); a minority of
  poisoned updates cannot move any coordinate beyond the honest updates' range.
* ``trimmed_mean``: Flower's FedTrimmedAvg, per coordinate the mean after dropping the
  ``floor(beta x n)`` largest and smallest values (unweighted).

Every rule needs each update in plaintext, so what cannot go with them (checked in
by :func:`validate`; docs: "Robust aggregation and poisoned gateways"):

* ``strategy=he`` / ``secagg``: the server only ever learns the sum; they are alternative
  strategy choices, not combinable with these.
* ``privacy=client``: Flower's DP wrappers add noise calibrated to a mean of n clipped
  updates (sensitivity C/n); Krum's selection or a median changes by up to ~C when one
  gateway changes, so the reported epsilon would be false. ``privacy=sample`` (DP-SGD on
  the gateways) composes: the server-side rule is post-processing.
* ``codec=topk`` and ``codec=sparse``: each gateway sends its own largest changes
  (codec.k_fraction), on mostly different coordinates. Distances between such sparse
  vectors measure their norms, not whether they agree (Krum then keeps the smallest
  update, not the typical one), and a coordinate-wise median or trimmed mean is zero
  wherever fewer than half the gateways sent that coordinate, discarding what error
  feedback promised to deliver later. ``fp16`` and ``int8``/``int4`` (unbiased, per-gateway
  independent rounding) keep every coordinate and only add small noise, so the rules still
  see the updates.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any, Iterable, Mapping

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from iiotfl.configs import ConfigError, integer, number
from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.codecs import CODECS
from iiotfl.strategies.spec import BuildContext, StrategySpec, refuse_client_dp


def updates_needed(cfg: Mapping[str, Any]) -> int:
    """Updates a round needs for the configured rule to neutralise what it is set to tolerate."""
    st = cfg["strategy"]
    if st["name"] == "krum":
        return 2 * int(st["num_malicious_nodes"]) + 3
    if st["name"] == "trimmed_mean":  # Flower trims int(beta x n) from each end
        beta, n = float(st["beta"]), 1
        while int(beta * n) < 1:
            n += 1
        return n
    return 3  # the median of two updates is their mean


class _Robust(CodecFedAvg):
    """CodecFedAvg's decoding in front of the Flower rule that follows it in the class order
    (CodecFedAvg.aggregate_train hands the decoded replies to ``super()``)."""

    min_updates = 1

    def decode_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        decoded = super().decode_replies(server_round, replies)
        if 0 < len(decoded) < self.min_updates:
            log(WARNING, "round %d: %d updates; %s needs %d to neutralise what it is set to tolerate",
                server_round, len(decoded), type(self).__name__, self.min_updates)
        return decoded


class CodecKrum(_Robust, Krum):
    """Flower's Krum on decoded updates."""


class CodecMultiKrum(_Robust, MultiKrum):
    """Flower's Multi-Krum on decoded updates."""


class CodecMedian(_Robust, FedMedian):
    """Flower's FedMedian on decoded updates."""


class CodecTrimmedAvg(_Robust, FedTrimmedAvg):
    """Flower's FedTrimmedAvg on decoded updates."""


def _krum(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecFedAvg:
    st = cfg["strategy"]
    f, keep = int(st["num_malicious_nodes"]), int(st["num_nodes_to_keep"])
    strategy = (CodecKrum(num_malicious_nodes=f, **ctx.common) if keep == 1 else
                CodecMultiKrum(num_malicious_nodes=f, num_nodes_to_select=keep, **ctx.common))
    strategy.min_updates = updates_needed(cfg)
    return strategy


def _median(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecFedAvg:
    strategy = CodecMedian(**ctx.common)
    strategy.min_updates = updates_needed(cfg)
    return strategy


def _trimmed_mean(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecFedAvg:
    strategy = CodecTrimmedAvg(beta=float(cfg["strategy"]["beta"]), **ctx.common)
    strategy.min_updates = updates_needed(cfg)
    return strategy


_FIX = "raise fleet.gateways (or fleet.clients_per_round / fleet.fraction_train)"


def _updates_per_round(cfg: Mapping[str, Any]) -> int:
    fleet = cfg["fleet"]
    return fleet.get("clients_per_round") or max(1, int(int(fleet["gateways"]) * float(fleet["fraction_train"])))


def _refuse_unsuitable(cfg: Mapping[str, Any]) -> None:
    """What a rule that needs each update in plaintext cannot go with."""
    name = cfg["strategy"]["name"]
    refuse_client_dp(cfg, f"Flower's DP wrappers calibrate the noise to a mean of clipped updates, which {name} is "
                          "not, so the reported epsilon would be false")
    codec = cfg["codec"]["name"]
    if CODECS[codec].sparsifies:
        raise ConfigError(f"config: strategy={name} with codec={codec}: every gateway sends its own largest "
                          f"changes, so {name} would judge sparsity patterns, not outliers (and drop what error "
                          "feedback holds back); use codec=int8, int4, fp16 or none with it")


def validate_krum(cfg: Mapping[str, Any]) -> None:
    _refuse_unsuitable(cfg)
    per_round = _updates_per_round(cfg)
    f = integer(cfg, "strategy.num_malicious_nodes", 0)
    keep = integer(cfg, "strategy.num_nodes_to_keep", 1)
    if per_round < (need := updates_needed(cfg)):
        raise ConfigError(f"config: strategy=krum with strategy.num_malicious_nodes={f} needs >= 2f+3 = "
                          f"{need} updates per round, the fleet gives {per_round}; {_FIX} or lower "
                          "strategy.num_malicious_nodes")
    if keep > per_round - f:
        raise ConfigError(f"config: strategy.num_nodes_to_keep={keep} would keep poisoned updates: with "
                          f"{per_round} updates per round and num_malicious_nodes={f}, keep at most "
                          f"{per_round - f}")


def validate_median(cfg: Mapping[str, Any]) -> None:
    _refuse_unsuitable(cfg)
    per_round = _updates_per_round(cfg)
    if per_round < (need := updates_needed(cfg)):
        raise ConfigError(f"config: strategy=median needs >= {need} updates per round (the median of two is their "
                          f"mean), the fleet gives {per_round}; {_FIX}")


def validate_trimmed_mean(cfg: Mapping[str, Any]) -> None:
    _refuse_unsuitable(cfg)
    per_round = _updates_per_round(cfg)
    beta = number(cfg, "strategy.beta", 0.0, 0.5, low_open=True)
    if beta >= 0.5:
        raise ConfigError(f"config: strategy.beta={beta} would trim everything; it must be in (0, 0.5)")
    if per_round < (need := updates_needed(cfg)):
        raise ConfigError(f"config: strategy=trimmed_mean with strategy.beta={beta} trims int(beta x "
                          f"{per_round}) = 0 updates per end, which is plain FedAvg; raise strategy.beta to "
                          f">= {1 / per_round:.2g} or the updates per round to >= {need}")


_PLAIN = "the codec's encoding of the update; the server sees each gateway's update"
KRUM = StrategySpec(name="krum", build=_krum, validate=validate_krum, uplink="plaintext", describe=_PLAIN,
                    client_dp=None)
MEDIAN = StrategySpec(name="median", build=_median, validate=validate_median, uplink="plaintext", describe=_PLAIN,
                      client_dp=None)
TRIMMED_MEAN = StrategySpec(name="trimmed_mean", build=_trimmed_mean, validate=validate_trimmed_mean,
                            uplink="plaintext", describe=_PLAIN, client_dp=None)
