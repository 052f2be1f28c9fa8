"""iiotfl cleanup: remove what killed runs left behind.

Removes what crashed or killed runs left: orphan processes, network namespaces, links and cgroups
(iiotfl.server.launch.cleanup; nothing where link shaping is unavailable). Prints what it removed.
"""

from __future__ import annotations

import argparse

from iiotfl.server.cli.base import description, summary
from iiotfl.server.launch import cleanup


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("cleanup", help=summary(__doc__), description=description(__doc__))
    p.set_defaults(handler=main)
    return p


def main(args: argparse.Namespace) -> int:
    removed = cleanup()
    print(f"removed {len(removed)} leftovers" + (": " + ", ".join(removed) if removed else ""))
    return 0
