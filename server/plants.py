"""Each plant's figure for the final global model, and their spread: is the global model good for every plant?

After the last round every connected gateway scores the final model on its own held-out data
(``server/app.py``; metrics.json ``gateway_evaluation.per_gateway``). :func:`plant_spread` sums
those figures up for the task's primary metric: the worst plant (the highest error, or the lowest
score, by ``higher_is_better``), the median and the best, and how many plants gave the metric.
The ServerApp writes it as ``gateway_evaluation.spread``; the report and the sweep table read it,
or compute it here for a run written before it existed. Nothing here reads a file.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _order(g: Mapping[str, Any]) -> tuple[bool, Any, Any]:
    part = g.get("partition")
    return part is None, part if part is not None else 0, g.get("node") or 0


def plant_spread(per_gateway: Sequence[Mapping[str, Any]], metric: str,
                 higher_is_better: bool) -> dict[str, Any] | None:
    """The spread of ``metric`` over the plants (``per_gateway``: one gateway's ``partition``, ``node`` and
    metrics each): ``worst`` and ``best`` (value, partition, node; ties: the lower partition), ``median`` (its
    value, and the partition(s) in the middle: two for an even count, the median their mean), ``gateways`` (the
    plants that gave a finite ``metric``). None when none did."""
    scored = sorted(((float(g[metric]), g) for g in per_gateway if _finite(g.get(metric))),
                    key=lambda vg: (vg[0] if higher_is_better else -vg[0], _order(vg[1])))  # worst first
    if not scored:
        return None
    n = len(scored)
    middle = scored[(n - 1) // 2: n // 2 + 1]

    def plant(vg: tuple[float, Mapping[str, Any]]) -> dict[str, Any]:
        return {"value": vg[0], "partition": vg[1].get("partition"), "node": vg[1].get("node")}

    return {
        "metric": metric, "higher_is_better": bool(higher_is_better), "gateways": n,
        "worst": plant(scored[0]),
        "median": {"value": statistics.median(v for v, _ in scored),
                   "partitions": [g.get("partition") for _, g in sorted(middle, key=lambda vg: _order(vg[1]))]},
        "best": plant(min(scored, key=lambda vg: (-vg[0] if higher_is_better else vg[0], _order(vg[1])))),
    }
