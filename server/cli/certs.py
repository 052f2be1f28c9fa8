"""iiotfl certs DIR [OPTIONS]: TLS CA, SuperLink certificate and gateway node keys; register the keys.

iiotfl certs DIR [--san NAME ...] [--gateways N] [--force] writes a CA, the SuperLink's TLS certificate
and one node key pair per gateway into DIR (private keys 0600, never overwritten without --force;
layout: security/certs.py). iiotfl certs DIR --register HOST:PORT registers every gateway's public key
with a running SuperLink.
"""

from __future__ import annotations

import argparse

from iiotfl.security import certs
from iiotfl.server.cli.base import description, summary


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("certs", help=summary(__doc__), description=description(__doc__))
    certs.add_arguments(p)  # the certificate tool's own argument definitions (security/certs.py)
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    return certs.run(args)
