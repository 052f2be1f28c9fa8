"""iiotfl gateway --superlink HOST:PORT [OPTIONS]: run this plant's gateway against a (remote) SuperLink.

Checks the CA, the node key and the data (each problem one line, exit 2), applies the link profile
(--link, root), waits for the SuperLink and runs flower-supernode, restarting it with backoff
(clients/gateway.py; the gateway container's entrypoint).
"""

from __future__ import annotations

import argparse

from iiotfl.clients import gateway
from iiotfl.server.cli.base import description, summary


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("gateway", help=summary(__doc__), description=description(__doc__))
    gateway.add_arguments(p)  # the gateway's own argument definitions (clients/gateway.py)
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    return gateway.run(args)
