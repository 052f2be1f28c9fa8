"""The privacy and compliance part of a report: what left each plant, in what form, at what cost.

Read from what the run recorded: ``privacy_ledger.jsonl`` (one row per gateway and round,
:mod:`privacy.ledger`), ``metrics.json`` (``privacy.mechanism`` and the accounting checks of
:func:`privacy.accounting.accounting_check`, the ServerApp's notes) and ``audit.json``
(``iiotfl audit``). A run without a ledger has no privacy section. :data:`MECHANISMS` is the
one place that words each mechanism.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iiotfl.privacy.ledger import LATE, SENT, read_jsonl
from iiotfl.privacy.modes import PRIVACY_MODES
from iiotfl.server.report.runs import read_json
from iiotfl.server.report.text import fmt

MECHANISMS = {  # metrics.json privacy.mechanism -> (what its epsilon is, what it protects)
    name: (mode.epsilon_scope, mode.protects) for name, mode in PRIVACY_MODES.items()
}


def epsilon_text(s: dict[str, Any]) -> str:
    """The privacy line of a run report, from :func:`run_summary`'s ``dp``, ``epsilon``, ``delta``."""
    if s["dp"] == "none":
        return "no differential privacy (epsilon = infinity)"
    kind = MECHANISMS[s["dp"]][0] if s["dp"] in MECHANISMS else s["dp"]
    eps = fmt(s["epsilon"]) if s["epsilon"] is not None else "not reported"
    return f"{kind} {eps}" + (f" at delta {fmt(s['delta'])}" if s["delta"] is not None else "")


def epsilon_cell(r: dict[str, Any]) -> str:
    """The ε cell of a sweep row."""
    if not r.get("rounds_done") and r.get("status") != "completed":
        return "-"  # nothing was trained, nothing spent
    if r.get("dp") == "none":
        return "∞ (no DP)"
    return fmt(r.get("epsilon"))


def privacy_section(run_dir: Path, final: dict[str, Any]) -> list[str]:
    """What left each plant, in what form, at what privacy cost (from privacy_ledger.jsonl)."""
    rows = read_jsonl(Path(run_dir) / "privacy_ledger.jsonl")
    if not rows:
        return []
    info = final.get("privacy") or {}
    mechanism = info.get("mechanism") or "none"
    lines = ["", "## Privacy: what left each plant", ""]
    lines.append(MECHANISMS[mechanism][1] if mechanism in MECHANISMS else mechanism)
    lines += _ledger_table(rows)
    lines += _checks_table(info.get("checks") or [])
    lines += _audit_table(read_json(Path(run_dir) / "audit.json"))
    for note in final.get("notes") or []:
        lines += ["", f"Note: {note}."]
    return lines


def _ledger_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per gateway: rounds and bytes sent, in what form, its last DP figures."""
    lines = ["", "| gateway | rounds sent | not aggregated | late | bytes sent | form | clip norm | noise multiplier "
             "| epsilon spent | delta | budget left | stopped |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    by_gw: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_gw.setdefault(r["gateway"], []).append(r)
    for gw, rs in sorted(by_gw.items(), key=lambda kv: (kv[0] is None, kv[0])):
        # what left the device: aggregated, or sent but left out (extra, skipped round, rejected)
        sent = [r for r in rs if r["status"] in SENT and r["round"] > 0]
        unused = [r for r in sent if r["status"] != "sent"]
        late = [r for r in rs if r["status"] == LATE]
        last = next((r for r in reversed(rs) if r.get("epsilon") is not None), (sent or rs)[-1])
        stopped = next((f"round {r['round']}: budget spent" for r in rs if r["status"] == "budget-spent"), "")
        forms = sorted({r["form"] for r in rs if r["status"] in SENT}) or ["nothing"]
        lines.append(f"| {gw} | {len(sent)} | {len(unused)} | {len(late)} "
                     f"| {fmt(sum(r['bytes_sent'] or 0 for r in rs))} | {'; '.join(forms)} "
                     f"| {fmt(last.get('clip_norm'))} | {fmt(last.get('noise_multiplier'))} "
                     f"| {fmt(last.get('epsilon'))} | {fmt(last.get('delta'))} | {fmt(last.get('budget_left'))} "
                     f"| {stopped} |")
    return lines


def _checks_table(checks: list[dict[str, Any]]) -> list[str]:
    """Every reported epsilon beside dp-accounting's recomputation (metrics.json privacy.checks)."""
    if not checks:
        return []
    lines = ["", "Accounting check (every reported epsilon recomputed with Google's dp-accounting; it must "
             "agree with the RDP figure within 2%):", "",
             "| scope | delta | reported | dp-accounting RDP | dp-accounting PLD | agrees |",
             "|---|---:|---:|---:|---:|---|"]
    for c in checks:
        verdict = "yes" if c["ok"] else "**NO — CHECK FAILED**" + (
            f" (rounds {c['mismatched_rounds']})" if c.get("mismatched_rounds") else "")
        lines.append(f"| {c['scope']} | {fmt(c['delta'])} | {fmt(c['reported'])} | {fmt(c['rdp'])} "
                     f"| {fmt(c['pld'])} | {verdict} |")
    unreported = [f"{c['scope']}: rounds {c['unreported_rounds']}" for c in checks if c.get("unreported_rounds")]
    if unreported:
        lines += ["", "Late replies no later reply has covered (what the device spent then is not in its "
                  f"reported epsilon yet): {'; '.join(unreported)}."]
    return lines


def _audit_table(audit: dict[str, Any]) -> list[str]:
    """The membership-inference audit of ``iiotfl audit`` (audit.json), each attack beside its bound."""
    if not audit:
        return []
    eps = audit.get("epsilon")
    lines = ["", f"Membership-inference audit of the final model (`iiotfl audit`; epsilon "
                 f"{fmt(eps) if eps is not None else 'infinity'}, delta {fmt(audit.get('delta'))}; the bound is "
                 "e^epsilon x FPR + delta):", "",
             "| attack | ROC AUC | TPR at 1% FPR | bound | TPR at 0.1% FPR | bound |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("loss_threshold", "lira"):
        if name in audit:
            a = audit[name]
            lines.append(f"| {name} | {fmt(a['auc'])} | {fmt(a['at_fpr_1%']['tpr'])} "
                         f"| {fmt(a['at_fpr_1%'].get('bound'))} | {fmt(a['at_fpr_0.1%']['tpr'])} "
                         f"| {fmt(a['at_fpr_0.1%'].get('bound'))} |")
    return lines
