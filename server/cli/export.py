"""iiotfl export DIR: the run's final model as signed int8 TorchScript for devices.

Writes DIR/export/ (the signed model file and export.json; server/export.py, keys: security/artefacts.py),
adds its size, latency and metric change against float32 to DIR/report.md and prints them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iiotfl.security.artefacts import ArtefactError
from iiotfl.server.cli.base import description, summary, usage_error
from iiotfl.server.export import export_run
from iiotfl.server.report import write_report


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("export", help=summary(__doc__), description=description(__doc__))
    p.add_argument("dir", metavar="DIR", help="a finished run directory")
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    if not Path(args.dir).is_dir():
        return usage_error(args, "iiotfl export needs one run directory")
    try:
        ex = export_run(args.dir)
    except (FileNotFoundError, ArtefactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_report(args.dir)
    f32, i8 = ex["metrics"].get("float32", {}), ex["metrics"].get("int8", {})
    print(f"{Path(args.dir) / ex['file']}: int8 TorchScript {ex['int8_bytes']} B (float32 {ex['float32_bytes']} B), "
          f"{ex['latency_us']['int8']:.0f} us per sample (float32 {ex['latency_us']['float32']:.0f} us)"
          + (f", {key} {i8[key]:.3f} (float32 {f32[key]:.3f})" if (key := ex.get("primary_metric")) in i8 else ""))
    return 0
