"""The privacy ledger: one row per device per round of what left it, in what form, at what cost.

``privacy_ledger.jsonl`` in the run directory. Each row: round, gateway, class, status
(sent / budget-spent / late), bytes sent (application payload) and on the wire, the form
of what was sent, clipping norm, noise multiplier, ε spent so far (sample-level: that
device's; client-level: the fleet's), δ and the budget left. The rows of the DP history
(sample rate, steps) let :mod:`privacy.accounting` recompute every ε.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from iiotfl.strategies import strategy_spec, wire
from iiotfl.strategies.codecs import CODECS

NOISE_SHARE = "clipped and noised on the device (its share of the fleet's Gaussian noise), "


def form_of(cfg: Mapping[str, Any]) -> str:
    """What an update looks like when it leaves a device under this config."""
    privacy = (cfg.get("privacy") or {}).get("name", "none")
    codec = (cfg.get("codec") or {}).get("name", "none")
    spec = strategy_spec({"strategy": {"name": (cfg.get("strategy") or {}).get("name", "fedavg")}})
    if not spec.server_sees_updates:  # encrypted or masked: the strategy says what leaves the device
        return spec.describe.format(noise=NOISE_SHARE if privacy == "client" else "")
    if privacy == "client":
        clip = cfg["privacy"]["clipping"]
        where = "clipped on the device" if clip == "client" else "clipped at the server"
        return f"model weights, float32, {where}; Gaussian noise added to the fleet sum at the server"
    kind = "model update (new weights - received)"
    if privacy == "sample":
        return f"{kind}, DP-SGD noised on the device, {CODECS[codec].form if codec in CODECS else codec}"
    return f"{kind}, plaintext {CODECS[codec].form if codec in CODECS else codec}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line; a line cut short by a crash is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def keep_rounds(path: Path, upto: int | None) -> list[dict[str, Any]]:
    """Rows of the JSONL file ``path`` with ``round <= upto`` (rewritten atomically); ``upto=None``
    starts the file empty."""
    rows: list[dict[str, Any]] = []
    if upto is not None:
        rows = [r for r in read_jsonl(path) if int(r.get("round", 0)) <= upto]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


class Ledger:
    def __init__(self, path: Path, cfg: Mapping[str, Any], keep_upto: int | None = None) -> None:
        """A new ledger, or with ``keep_upto`` the rows of rounds up to it (a resumed run)."""
        self.path = path
        self.cfg = cfg
        self.form = form_of(cfg)
        self.privacy = (cfg.get("privacy") or {}).get("name", "none")
        keep_rounds(path, keep_upto)

    def record_statistics(self, partitions: Mapping[int, int], nbytes: Mapping[int, int],
                          encrypted: bool = False) -> None:
        """Round 0: the per-condition feature statistics each gateway sent for normalisation."""
        how = ("encrypted (BFV, exact fixed-point limbs); the server learns only the fleet's sum" if encrypted
               else "plaintext")
        with self.path.open("a") as fh:
            for node, part in sorted(partitions.items(), key=lambda kv: kv[1]):
                fh.write(json.dumps({
                    "round": 0, "gateway": part, "class": None, "status": "sent", "bytes_sent": nbytes.get(node, 0),
                    "wire_bytes_up": None, "form": "feature statistics: count, sum and sum of squares per feature "
                    f"(per operating condition where the task has them) over the plant (no record), {how}",
                    "clip_norm": None, "noise_multiplier": None, "epsilon": None, "delta": None, "budget_left": None,
                }) + "\n")

    def record(self, round_row: Mapping[str, Any], fleet_epsilon: float | None, fleet_delta: float | None) -> None:
        rows = []
        priv = self.cfg.get("privacy") or {}
        for g in round_row.get("gateways") or []:
            c = g.get("metrics") or {}
            status = {"aggregated": "sent", "budget-spent": "budget-spent"}.get(g.get("status"), g.get("status"))
            row: dict[str, Any] = {
                "round": round_row["round"], "gateway": g.get("partition"), "class": g.get("class"),
                "status": status, "bytes_sent": g.get("bytes_up", 0) if status == "sent" else 0,
                "wire_bytes_up": g.get("wire_up"), "form": self.form if status == "sent" else "nothing",
            }
            if self.privacy == "sample":
                row.update(clip_norm=c.get(wire.DP_CLIP), noise_multiplier=c.get(wire.DP_SIGMA),
                           sample_rate=c.get(wire.DP_Q), steps=c.get(wire.DP_STEPS) if status == "sent" else 0,
                           epsilon=c.get(wire.DP_EPSILON), delta=c.get(wire.DP_DELTA),
                           budget_left=c.get(wire.DP_BUDGET_LEFT))
            elif self.privacy == "client":
                row.update(clip_norm=priv.get("clipping_norm"),
                           noise_multiplier=(round_row.get("privacy") or {}).get("noise_multiplier",
                                                                                 priv.get("noise_multiplier")),
                           epsilon=fleet_epsilon, delta=fleet_delta,
                           budget_left=(priv["budget"] - fleet_epsilon) if priv.get("budget") and fleet_epsilon
                           is not None else None)
            else:
                row.update(clip_norm=None, noise_multiplier=None, epsilon=float("inf"), delta=None, budget_left=None)
            rows.append(row)
        with self.path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def device_histories(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per device: its DP-SGD history, last reported ε and δ (sample-level rows)."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("round") == 0 or r.get("noise_multiplier") is None or r.get("sample_rate") is None:
            continue
        d = out.setdefault(r["gateway"], {"history": [], "epsilon": 0.0, "delta": r.get("delta")})
        if r["status"] == "sent" and r.get("steps"):
            d["history"].append((r["noise_multiplier"], r["sample_rate"], r["steps"]))
            d["epsilon"] = r["epsilon"]
    return out
