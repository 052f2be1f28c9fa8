"""iiotfl audit DIR [--refs K]: membership-inference audit of a run's final model.

Scores the gateways' training windows (members) against their held-out windows with a loss-threshold
attack and offline LiRA (K reference models, trained like the gateways train: clients.training.train_local);
writes DIR/audit.json (beside each figure what the run's (epsilon, delta) allows), adds the audit to
DIR/report.md and prints each attack's AUC and its true-positive rate at 1% and 0.1% false positives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iiotfl.clients.training import train_local
from iiotfl.privacy.audit import audit_run
from iiotfl.security.artefacts import ArtefactError
from iiotfl.server.cli.base import description, summary, usage_error
from iiotfl.server.report import write_report

ATTACKS = ("loss_threshold", "lira")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("audit", help=summary(__doc__), description=description(__doc__))
    p.add_argument("dir", metavar="DIR", help="a finished run directory")
    p.add_argument("--refs", type=int, default=4, metavar="K", help="reference models for LiRA (default 4)")
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    if not Path(args.dir).is_dir():
        return usage_error(args, "iiotfl audit needs one run directory")
    try:
        result = audit_run(args.dir, reference_models=args.refs, train=train_local)
    except (FileNotFoundError, ArtefactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_report(args.dir)
    for name in ATTACKS:
        if name in result:
            r = result[name]
            print(f"{name}: AUC {r['auc']:.3f}, TPR at 1% FPR {r['at_fpr_1%']['tpr']:.3f}, "
                  f"at 0.1% FPR {r['at_fpr_0.1%']['tpr']:.4f}")
    return 0
