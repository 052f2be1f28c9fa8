"""iiotfl front CERTS --listen HOST:PORT --superlink HOST:PORT: the gateway-facing front (nginx).

Runs nginx in the foreground in front of a SuperLink: mutual TLS with the gateways (client
certificates of the fleet's CA, from ``iiotfl certs``), ``/v1/fleet`` forwarded to the SuperLink over
TLS, every other path (registering nodes, submitting runs) answered 403. CERTS holds ca.crt,
superlink.crt and superlink.key; the certificate must name the SuperLink's host and the address the
gateways dial (``iiotfl certs --san``). The config is written to --dir (default ./front) first;
--check only tests it. For compose's front service and a pilot's server (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from iiotfl.security import certs
from iiotfl.server.cli.base import description, summary, usage_error
from iiotfl.server.launch import front


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("front", help=summary(__doc__), description=description(__doc__))
    p.add_argument("certs", type=Path, help="the `iiotfl certs` directory (ca.crt, superlink.crt, superlink.key)")
    p.add_argument("--listen", required=True, help="where the gateways connect, HOST:PORT (e.g. 0.0.0.0:9443)")
    p.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:PORT (e.g. 127.0.0.1:9093)")
    p.add_argument("--dir", type=Path, default=Path("front"), help="where nginx.conf and nginx's files go")
    p.add_argument("--console", action="store_true", help="log to stderr/stdout (a container) instead of --dir")
    p.add_argument("--check", action="store_true", help="write and test the config (nginx -t), do not serve")
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    for name in (certs.CA_CRT, certs.SERVER_CRT, certs.SERVER_KEY):
        if not (args.certs / name).is_file():
            return usage_error(args, f"{args.certs / name} not found; create the directory with `iiotfl certs "
                                     f"{args.certs} --san <the front's name>`")
    try:
        argv = front.prepare(args.dir.resolve(), args.listen, args.superlink, args.certs.resolve(), {},
                             console=args.console)
    except (ValueError, FileNotFoundError) as err:
        return usage_error(args, str(err))
    tested = subprocess.run([*argv[:5], "-t", "-q"], capture_output=True, text=True)
    if tested.returncode != 0:
        lines = [line for line in tested.stderr.splitlines() if "[emerg]" in line] or tested.stderr.splitlines()
        print(f"error: the front's config does not load: {lines[-1] if lines else 'nginx -t failed'}", file=sys.stderr)
        return 2
    if args.check:
        print(f"front: {args.dir / 'nginx.conf'} loads; gateways dial {args.listen}, {front.FLEET_PATH} goes to "
              f"{args.superlink}")
        return 0
    print(f"front: listening on {args.listen} (mutual TLS), forwarding {front.FLEET_PATH} to {args.superlink}",
          flush=True)
    os.execv(argv[0], argv)
    return 1  # not reached
