"""A poisoning scenario: chosen gateways send a scaled or sign-flipped update (``fleet.poison``)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Context

from iiotfl.configs import ConfigError, choice, number, require

POISON_KINDS = ("none", "scale", "sign_flip")


def validate_poison(cfg: Mapping[str, Any]) -> None:
    """fleet.poison: which gateways send a scaled or sign-flipped update (a poisoning scenario)."""
    if cfg["fleet"].get("poison") is None:
        return
    kind = choice(cfg, "fleet.poison.kind", POISON_KINDS)
    number(cfg, "fleet.poison.factor", 0.0, 1e6, low_open=True)
    gateways = int(cfg["fleet"]["gateways"])
    chosen = require(cfg, "fleet.poison.gateways")
    if not isinstance(chosen, list) or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < gateways
                                               for g in chosen):
        raise ConfigError(f"config: fleet.poison.gateways={chosen!r} must be a list of gateway indices in "
                          f"0-{gateways - 1}, e.g. fleet.poison.gateways=[1]")
    if kind != "none" and not chosen:
        raise ConfigError(f"config: fleet.poison.kind={kind} poisons no gateway; name them, e.g. "
                          "fleet.poison.gateways=[1]")


def poison(model: torch.nn.Module, view: dict, cfg, context: Context, partition: int) -> dict:
    """``fleet.poison``: replace this gateway's update u by factor x u (``scale``) or -factor x u
    (``sign_flip``) before it is encoded, by moving the trained model to view + that. Settings: the
    node config's ``poison`` / ``poison-factor`` (engine=fleet sets them, as ``crash-round``), else
    the run config's ``fleet.poison`` for this partition (Flower's simulation engine gives virtual
    nodes only partition-id and num-partitions). Returns the reply's metrics: "poisoned" 1 or 0 (every
    gateway reports it: Flower's strategies refuse replies whose metric keys differ)."""
    poison = cfg["fleet"].get("poison") or {}
    if "poison" in context.node_config:
        kind, factor = str(context.node_config["poison"]), float(context.node_config.get("poison-factor", 10.0))
    elif partition in (poison.get("gateways") or []):
        kind, factor = str(poison.get("kind", "none")), float(poison.get("factor", 10.0))
    else:
        kind, factor = "none", 1.0
    if kind == "none":
        return {"poisoned": 0}
    if kind not in POISON_KINDS[1:]:
        raise ValueError(f"poison={kind!r} is unknown; use none, scale or sign_flip")
    scale = -factor if kind == "sign_flip" else factor
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                start = torch.from_numpy(np.asarray(view[name], dtype=np.float32)).to(tensor.dtype)
                tensor.copy_(start + scale * (tensor - start))
    return {"poisoned": 1}
