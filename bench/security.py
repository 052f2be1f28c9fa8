"""Security benchmark: every attack of the security model tried, and how many were refused.

Reads the table in docs/security.md (one row per attack, with the tests that try it), runs
those tests in one pytest process and prints one JSON line: attacks tried, attacks refused
(every test of the row passed), the rows that were not, and the time it took. A row whose
tests do not exist counts as not refused.

The cost of a front with mutual TLS on round time and bytes is measured once the front
exists (docs/security.md, "What is still open"); until then ``front`` is null.

Usage: python bench/security.py
"""

from __future__ import annotations

import json
import re
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


def main() -> None:
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
        "front": None,
        "front_note": "the Fleet-API-only front with mutual TLS is not built yet; its cost on round time and bytes "
                      "is measured when it is (docs/security.md)",
    }))


if __name__ == "__main__":
    main()
