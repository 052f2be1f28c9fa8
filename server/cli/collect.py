"""iiotfl collect gateway.yaml: run a gateway's live data source into its local store, on its own.

For a gateway that runs a plain ``flower-supernode`` with the project's ClientApp (node config
``data-spec="/path/gateway.yaml"``): this command reads the OPC UA server or MQTT broker the
description names into the store the ClientApp trains on, until Ctrl-C or SIGTERM. ``--check``
only checks the description; ``--status`` prints the store's last status (JSON) and exits.
(``iiotfl gateway --source gateway.yaml`` runs the same collector itself.)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from iiotfl.clients import sources
from iiotfl.server.cli.base import description, summary


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("collect", help=summary(__doc__), description=description(__doc__))
    p.add_argument("source", help="the gateway's data description (YAML; source kind opcua or mqtt)")
    p.add_argument("--check", action="store_true", help="only check the description, its files and its store")
    p.add_argument("--status", action="store_true", help="print the store's last status (JSON) and exit")
    p.set_defaults(handler=main)
    return p


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    try:
        spec = sources.load(args.source)
        if spec.kind not in sources.LIVE:
            raise sources.SpecError(f"{spec.path}: source kind {spec.kind} is read by the ClientApp itself every "
                                    "round; iiotfl collect runs opcua and mqtt sources")
        if args.status:
            path = spec.store_path.with_name(spec.store_path.stem + ".status.json") if spec.store_path else None
            if path is None or not path.is_file():
                raise sources.SpecError(f"no status at {path}; is a collector running for {spec.path}?")
            print(path.read_text())
            return 0
        for line in sources.check(spec, sources.spec.default_task(spec.task)):
            _say(f"iiotfl collect: {line}")
        if args.check:
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        thread = sources.collect(spec, stop, _say)
        try:
            while thread.is_alive():
                thread.join(timeout=0.5)
        except KeyboardInterrupt:
            stop.set()
            thread.join(timeout=10)
            return 130
        return 0 if stop.is_set() else 1
    except (ValueError, sources.StoreError) as err:
        _say(f"error: {err}")
        return 2
