"""iiotfl simulate {mqtt,opcua,csv}: a simulated machine for trying a gateway's data sources.

The machine's records come from the project's generators (``--task``, ``--plant``), named as a
plant would name them. ``mqtt`` publishes one JSON message per record to ``--topic`` on
``--broker``; ``opcua`` serves an OPC UA server on ``--listen`` with one variable per signal under
``Objects/<--machine>``; ``csv`` writes them as a plant's CSV export (``--out``, ``--sep``).
``--rate`` records per second (0: as fast as possible). It runs until every record is out
(``--limit``; ``--repeat`` goes on), or Ctrl-C. ``--describe FILE`` only writes the gateway's data
description that reads this machine, and exits (``clients/sources/simulate.py``).
"""

from __future__ import annotations

import argparse
import sys

from iiotfl.clients.sources import simulate
from iiotfl.server.cli.base import description, summary


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("simulate", help=summary(__doc__), description=description(__doc__))
    p.add_argument("kind", choices=("mqtt", "opcua", "csv"),
                   help="publish over MQTT, serve over OPC UA, or write a CSV export (--out)")
    p.add_argument("--task", choices=sorted(simulate.PLANT_NAMES), default="predictive_maintenance")
    p.add_argument("--plant", type=int, default=0, help="which plant of the generator (its partition id)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=50.0, help="records per second (0: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many records")
    p.add_argument("--repeat", action="store_true", help="go on after the generator's records (fresh units, process "
                   "ids, times), until --limit or Ctrl-C")
    p.add_argument("--out", help="csv: the file to write")
    p.add_argument("--sep", default=",", help="csv: the separator")
    p.add_argument("--broker", default="127.0.0.1:1883", help="mqtt: the broker as host:port")
    p.add_argument("--topic", default="plant/line1/m0", help="mqtt: the topic records are published to")
    p.add_argument("--listen", default="127.0.0.1:4840", help="opcua: the address the server listens on")
    p.add_argument("--machine", default="Machine0", help="opcua: the object the variables sit under")
    p.add_argument("--describe", metavar="FILE",
                   help="only write the gateway's data description for this machine to FILE, and exit")
    p.add_argument("--store", help="with --describe: the local store's path in it (default beside FILE)")
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.describe:
        simulate.describe(args.task, args.kind, args.describe, broker=args.broker, topic=args.topic,
                          endpoint=f"opc.tcp://{args.listen}", machine=args.machine, store=args.store,
                          export=args.out or "export", sep=args.sep)
        print(f"iiotfl simulate: wrote {args.describe}", file=sys.stderr, flush=True)
        return 0
    rows = simulate.records(args.task, args.seed, args.plant, args.limit, args.repeat)
    try:
        if args.kind == "csv":
            if not args.out or args.repeat and args.limit is None:
                print("error: csv needs --out FILE (and --limit with --repeat)", file=sys.stderr)
                return 2
            sent = simulate.write_csv(rows, args.out, args.sep)
        elif args.kind == "mqtt":
            sent = simulate.publish_mqtt(args.broker, args.topic, rows, args.rate,
                                         say=lambda m: print(m, file=sys.stderr, flush=True))
        else:
            sent = simulate.serve_opcua(args.listen, args.machine, args.task, rows, args.rate)
    except KeyboardInterrupt:
        return 130
    print(f"iiotfl simulate: {sent} records sent", file=sys.stderr, flush=True)
    return 0
