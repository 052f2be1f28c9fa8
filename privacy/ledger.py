"""The privacy ledger: one row per device per round of what left it, in what form, at what cost.

``privacy_ledger.jsonl`` in the run directory. Each row: round, gateway, class, status
(:data:`STATUS`: sent, sent but not aggregated, late, budget-spent, error), bytes sent
(application payload) and on the wire, the form of what was sent, clipping norm, noise
multiplier, ε spent so far (sample-level: that device's, as it reported it; client-level:
the fleet's), δ and the budget left. Sample-level rows carry the DP-SGD history the device
reported (``dp_history``: [noise multiplier, sample rate, steps so far]); a late row has
none, the device's next reply covers that round. Client-level rows say whether the round
released an aggregate (:func:`released_noise`). :mod:`privacy.accounting` recomputes every ε
from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from iiotfl.strategies import strategy_spec, wire
from iiotfl.strategies.codecs import CODECS

NOISE_SHARE = "clipped and noised on the device (its share of the fleet's Gaussian noise), "
LATE = "late: unknown until the device reports again"
# server/roundlog.py's gateway status -> the ledger's: what left the device
STATUS = {"aggregated": "sent", "extra": "sent, not aggregated (extra)",
          "skipped": "sent, not aggregated (round skipped)", "rejected": "sent, not aggregated (rejected)",
          "late": LATE, "budget-spent": "budget-spent"}
SENT = ("sent", STATUS["extra"], STATUS["skipped"], STATUS["rejected"])  # the update left the device


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
    also = f"; with it {spec.also_sent}" if spec.also_sent else ""
    if privacy == "sample":
        return f"{kind}, DP-SGD noised on the device, {CODECS[codec].form if codec in CODECS else codec}{also}"
    return f"{kind}, plaintext {CODECS[codec].form if codec in CODECS else codec}{also}"


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

    def record_evaluation(self, per_gateway: list[Mapping[str, Any]]) -> None:
        """After the last round: the metrics each gateway computed on its own held-out data for the final model
        (round 0 rows, as the statistics: not a training round), and with ``fleet.personalise_epochs`` those of
        its fine-tuned model, which stays on the gateway."""
        with self.path.open("a") as fh:
            for g in per_gateway:
                metrics = {k: v for k, v in g.items() if k not in ("node", "partition")}
                personal = sum(1 for k in metrics if k.startswith("personal-"))
                kept = (f"; {personal} of them score a model fine-tuned on the plant's data, which stays on the gateway"
                        if personal else "")
                fh.write(json.dumps({
                    "round": 0, "gateway": g.get("partition"), "class": None, "status": "sent",
                    "bytes_sent": len(json.dumps(metrics)), "wire_bytes_up": None,
                    "form": f"final evaluation: {len(metrics)} plaintext metrics of the final model on the plant's "
                    f"held-out data (no record; not covered by the DP accounting){kept}",
                    "clip_norm": None, "noise_multiplier": None, "epsilon": None, "delta": None, "budget_left": None,
                }) + "\n")

    def record(self, round_row: Mapping[str, Any], fleet_epsilon: float | None, fleet_delta: float | None) -> None:
        """One row per gateway sampled in the round (``round_row``: a row of ``metrics.jsonl``)."""
        rows = []
        for g in round_row.get("gateways") or []:
            status = STATUS.get(g.get("status"), g.get("status"))
            sent, late = status in SENT, status == LATE
            row: dict[str, Any] = {
                "round": round_row["round"], "gateway": g.get("partition"), "class": g.get("class"),
                "status": status, "bytes_sent": g.get("bytes_up", 0) if sent else None if late else 0,
                "wire_bytes_up": g.get("wire_up"), "form": self.form if sent else "unknown" if late else "nothing",
            }
            if self.privacy == "sample":
                row.update(self._sample(g.get("metrics") or {}, status))
            elif self.privacy == "client":
                row.update(self._client(round_row, fleet_epsilon, fleet_delta))
            else:
                row.update(clip_norm=None, noise_multiplier=None, epsilon=float("inf"), delta=None, budget_left=None)
            rows.append(row)
        with self.path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    @staticmethod
    def _sample(c: Mapping[str, Any], status: str) -> dict[str, Any]:
        """A device's DP-SGD figures as its reply reported them (none for a late one)."""
        c, history = unpadded(c), None
        if wire.DP_HISTORY_STEPS in c:
            history = [[float(s), float(q), int(n)] for s, q, n in
                       zip(c[wire.DP_HISTORY_SIGMA], c[wire.DP_HISTORY_Q], c[wire.DP_HISTORY_STEPS])]
        return dict(clip_norm=c.get(wire.DP_CLIP), noise_multiplier=c.get(wire.DP_SIGMA), sample_rate=c.get(wire.DP_Q),
                    steps=c.get(wire.DP_STEPS) if status in SENT else None if status == LATE else 0,
                    epsilon=c.get(wire.DP_EPSILON), delta=c.get(wire.DP_DELTA), budget_left=c.get(wire.DP_BUDGET_LEFT),
                    dp_history=history)

    def _client(self, round_row: Mapping[str, Any], epsilon: float | None, delta: float | None) -> dict[str, Any]:
        """The fleet's figures: the round's release (if any) and ε so far."""
        priv = self.cfg.get("privacy") or {}
        noise = released_noise(round_row)
        return dict(clip_norm=priv.get("clipping_norm"), noise_multiplier=noise, released=noise is not None,
                    epsilon=epsilon, delta=delta,
                    budget_left=(priv["budget"] - epsilon) if priv.get("budget") and epsilon is not None else None)


def unpadded(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A reply's metrics with its DP-SGD history cut to the entries with steps (the gateway pads it)."""
    keys = (wire.DP_HISTORY_SIGMA, wire.DP_HISTORY_Q, wire.DP_HISTORY_STEPS)
    if not all(k in metrics for k in keys):
        return dict(metrics)
    keep = [i for i, n in enumerate(metrics[wire.DP_HISTORY_STEPS]) if n]
    return {**metrics, **{k: [metrics[k][i] for i in keep] for k in keys}}


def released_noise(round_row: Mapping[str, Any]) -> float | None:
    """Client-level DP: the noise multiplier of the aggregate a round released, None if it released none.

    A skipped round, or one that aggregated nothing, released nothing; nor did a round for which the
    strategy accounted no noise (Flower's DP wrappers compose only on a release). The ledger and
    :func:`privacy.accounting.accounting_check` both count releases by this rule."""
    noise = (round_row.get("privacy") or {}).get("noise_multiplier")
    if round_row.get("skipped") or not round_row.get("aggregated") or noise is None:
        return None
    return float(noise)


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def device_reports(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Per device (sample-level rows): every ε it reported, with the DP-SGD history it reported with it
    (``reports``: round, epsilon, delta, history; a row with an ε but no history has history []), and
    the rounds it was late in after its last report (``unreported``: not yet covered by any reply)."""
    out: dict[Any, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: int(r.get("round") or 0)):
        if not r.get("round") or "sample_rate" not in r:
            continue
        d = out.setdefault(r["gateway"], {"reports": [], "unreported": []})
        if r.get("epsilon") is not None:
            d["reports"].append({"round": r["round"], "epsilon": r["epsilon"], "delta": r["delta"],
                                 "history": [tuple(h) for h in r.get("dp_history") or []]})
            d["unreported"] = []
        elif r.get("status") == LATE:
            d["unreported"].append(r["round"])
    return out
