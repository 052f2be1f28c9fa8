"""iiotfl keys DIR [--force]: provision an HE key set for strategy=he.

Writes DIR/device.he (parameters, public and secret key; 0600; copy it to every gateway) and
DIR/server.he (parameters and public key: the only HE file the server is given). Never overwrites
an existing key set without --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iiotfl.server.cli.base import description, summary
from iiotfl.strategies.he import HEError, KeySet


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("keys", help=summary(__doc__), description=description(__doc__))
    p.add_argument("dir", metavar="DIR", help="directory for device.he and server.he")
    p.add_argument("--force", action="store_true", help="replace an existing key set")
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        device, server = KeySet.generate().write(args.dir, force=args.force)
    except (HEError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"device key set (secret, 0600; copy to each gateway): {device}\n"
          f"server key set (public; the server's only HE material): {server}\n"
          f"run with: iiotfl run strategy=he strategy.keys={Path(args.dir).resolve()}")
    return 0
