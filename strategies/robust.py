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
``configs.validate``, README "Robust aggregation and poisoned gateways"):

* ``strategy=he`` / ``secagg``: the server only ever learns the sum; they are alternative
  strategy choices, not combinable with these.
* ``privacy=client``: Flower's DP wrappers add noise calibrated to a mean of n clipped
  updates (sensitivity C/n); Krum's selection or a median changes by up to ~C when one
  gateway changes, so the reported epsilon would be false. ``privacy=sample`` (DP-SGD on
  the gateways) composes: the server-side rule is post-processing.
* ``codec=topk``: each gateway sends its own 2% largest changes, on mostly different
  coordinates. Distances between such sparse vectors measure their norms, not whether they
  agree (Krum then keeps the smallest update, not the typical one), and a coordinate-wise
  median or trimmed mean is zero wherever fewer than half the gateways sent that
  coordinate, discarding what error feedback promised to deliver later. ``fp16`` and
  ``int8``/``int4`` (unbiased, per-gateway independent rounding) keep every coordinate
  and only add small noise, so the rules still see the updates.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any, Iterable, Mapping

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from iiotfl.configs import ROBUST  # noqa: F401  (the strategy names, one list for configs and here)
from iiotfl.strategies.codec_fedavg import CodecFedAvg


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


def build_robust(cfg: Mapping[str, Any], common: dict[str, Any]) -> CodecFedAvg:
    """The Flower rule of ``strategy=krum | median | trimmed_mean`` with CodecFedAvg's ``common`` settings."""
    st = cfg["strategy"]
    name = st["name"]
    if name == "krum":
        f, keep = int(st["num_malicious_nodes"]), int(st["num_nodes_to_keep"])
        strategy = (CodecKrum(num_malicious_nodes=f, **common) if keep == 1 else
                    CodecMultiKrum(num_malicious_nodes=f, num_nodes_to_select=keep, **common))
    elif name == "median":
        strategy = CodecMedian(**common)
    elif name == "trimmed_mean":
        strategy = CodecTrimmedAvg(beta=float(st["beta"]), **common)
    else:
        raise ValueError(f"unknown robust strategy {name!r}; choose one of {list(ROBUST)}")
    strategy.min_updates = updates_needed(cfg)
    return strategy
