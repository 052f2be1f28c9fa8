"""The ``iiotfl`` command line: one app, one module per command.

=========  =========================================================================================
run        the federated job, a Hydra app: overrides, ``-m`` sweeps (run.py)
report     re-render a run's report.md, or summarise a sweep (report.py)
audit      membership-inference audit of a run's final model (audit.py)
export     the run's final model as signed int8 TorchScript (export.py)
keys       an HE key set for strategy=he (keys.py)
certs      TLS CA, SuperLink certificate and gateway node keys; registration (certs.py)
gateway    a plant's gateway joining a remote SuperLink (gateway.py)
collect    a gateway's live data source into its local store, beside a plain SuperNode (collect.py)
simulate   a simulated machine publishing over MQTT or serving OPC UA, to try a gateway (simulate.py)
front      the gateway-facing front of a SuperLink: Fleet API only, mutual TLS (front.py)
cleanup    remove what killed runs left (cleanup.py)
=========  =========================================================================================

Each command module has ``add_parser(commands)``, which registers its subparser (a
:class:`~iiotfl.server.cli.base.CommandParser`) with ``handler`` set to its ``main(args) -> int``.
Every command answers ``--help`` with its usage, exits 0 and does nothing else. Exit codes: 0 done,
1 the job or some sweep points failed, 2 bad usage or input (one line saying why), 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from iiotfl.server.cli import (
    audit,
    certs,
    cleanup,
    collect,
    export,
    front,
    gateway,
    keys,
    report,
    run,
    simulate,
)
from iiotfl.server.cli.base import CommandParser

# in the order `iiotfl --help` lists them
COMMANDS = (run, report, audit, export, keys, certs, gateway, collect, simulate, front, cleanup)
NAMES = tuple(command.__name__.rsplit(".", 1)[-1] for command in COMMANDS)  # a command's module bears its name

DESCRIPTION = "Privacy-preserving federated learning for Industrial IoT on Flower."
EPILOG = """iiotfl COMMAND --help prints that command's usage. For example:
  iiotfl run engine=sim fleet.rounds=5               one run on the simulation engine
  iiotfl run -m codec=none,int8 link=lte_m,nb_iot    a sweep over every combination
  iiotfl report multirun/2025-01-31/12-00-00         the sweep's table and trade-off plots
Exit codes: 0 done, 1 the run or some sweep points failed, 2 bad usage or input, 130 stopped by Ctrl-C."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iiotfl", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                     parser_class=CommandParser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"error: {message}\n{parser.format_usage().rstrip()}", file=sys.stderr)
    return 2


def _exit_code(err: SystemExit) -> int:
    if err.code is None or isinstance(err.code, int):
        return err.code or 0
    print(err.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if not argv[0].startswith("-") and argv[0] not in NAMES:
        return _usage_error(parser, f"unknown command {argv[0]!r}")
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "handler"):  # options but no command
            return _usage_error(parser, "no command given")
        return args.handler(args)
    except SystemExit as err:  # argparse (--help, bad usage), Hydra, a command's sys.exit
        return _exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
