"""Security benchmark: every attack of the security model tried, and how many were refused.

Reads the table in docs/security.md (one row per attack, with the tests that try it), runs
those tests in one pytest process and prints one JSON line: attacks tried, attacks refused
(every test of the row passed), the rows that were not, and the time it took. A row whose
tests do not exist counts as not refused.

``--front``: also the cost of the local fleet's front (nginx, Fleet API only, mutual TLS) on
round time and bytes: the same shaped 3-gateway run with ``engine.front=nginx`` and with
``engine.front=none``, alternated ``--pairs`` times (wall time between two runs of one config
varies by a few percent; the median of each side is compared). Bytes are what crossed the
gateways' links (``wire.json``: TLS, HTTP and the client certificate included) and the model
payload per gateway and round. Targets: ≤ 3 % round time, ≤ 2 % bytes.

Usage: python bench/security.py [--front] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\d+) \| (.+?) \| .+ \| (.+) \|$")


def attacks(doc: Path = ROOT / "docs" / "security.md") -> list[dict]:
    """The rows of the security model's table: number, attack, the test node ids that try it."""
    rows = []
    for line in doc.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows.append({"row": int(m[1]), "attack": m[2], "tests": re.findall(r"`(tests/[^`]+)`", m[3])})
    return rows


def _outcomes(ids: list[str]) -> dict[str, bool]:
    """pytest's verdict per test (a parametrised test: all its cases), by node id as written."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *ids], cwd=ROOT, capture_output=True, text=True)
        if not report.exists():
            return {}
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            path = case.get("classname", "").replace(".", "/") + ".py"
            ok = not any(child.tag in ("failure", "error", "skipped") for child in case)
            cases.append((path, case.get("name", "").split("[")[0], ok))
    verdict = {}
    for node in ids:
        path, _, name = node.partition("::")
        mine = [ok for p, n, ok in cases if p == path and (not name or n == name)]
        verdict[node] = bool(mine) and all(mine)
    return verdict


def _fleet_run(front: str, run_dir: Path) -> dict:
    """One shaped 3-gateway run; its mean round time and bytes."""
    proc = subprocess.run([str(Path(sys.executable).parent / "iiotfl"), "run", "fleet.gateways=3", "fleet.rounds=4",
                           f"engine.front={front}", f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"engine.front={front} run failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()][1:]
    wire = json.loads((run_dir / "wire.json").read_text())["gateways"]
    gateways = [g for r in rows for g in r["gateways"]]
    return {"round_s": statistics.mean(r["round_time"] for r in rows),
            "wire_bytes": sum(g["up"] + g["down"] for g in wire.values()),
            "payload_bytes": sum(g["bytes_up"] + g["bytes_down"] for g in gateways) / len(gateways)}


def front_cost(pairs: int) -> dict:
    """The front against no front, alternated ``pairs`` times; medians of each side."""
    runs: dict[str, list[dict]] = {"nginx": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for front in ("none", "nginx") if i % 2 == 0 else ("nginx", "none"):
                runs[front].append(_fleet_run(front, Path(tmp) / f"{front}-{i}"))
    med = {f: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for f, rs in runs.items()}
    return {
        "runs_per_side": pairs,
        "mean_round_s": {f: round(m["round_s"], 2) for f, m in med.items()},
        "round_time_change": round(med["nginx"]["round_s"] / med["none"]["round_s"] - 1, 4),
        "wire_bytes": {f: int(m["wire_bytes"]) for f, m in med.items()},
        "wire_bytes_change": round(med["nginx"]["wire_bytes"] / med["none"]["wire_bytes"] - 1, 4),
        "payload_bytes_per_gateway_round": {f: int(m["payload_bytes"]) for f, m in med.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--front", action="store_true", help="also measure the front's cost on a shaped fleet")
    parser.add_argument("--pairs", type=int, default=2, help="runs per side for --front")
    args = parser.parse_args()
    rows = attacks()
    started = time.time()
    verdict = _outcomes(sorted({t for r in rows for t in r["tests"]}))
    refused = [r for r in rows if r["tests"] and all(verdict.get(t) for t in r["tests"])]
    print(json.dumps({
        "bench": "security",
        "attacks_tried": len(rows),
        "attacks_refused": len(refused),
        "not_refused": [f"{r['row']}: {r['attack']}" for r in rows if r not in refused],
        "tests": len(verdict),
        "seconds": round(time.time() - started, 1),
        "front": front_cost(args.pairs) if args.front else None,
    }))


if __name__ == "__main__":
    main()
