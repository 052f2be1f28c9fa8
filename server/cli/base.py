"""What the command modules share: the parser class every subcommand gets, and the usage error.

Every subcommand's parser is a :class:`CommandParser`. It records in the namespace the arguments it
was given (``argv``, untouched) and itself (``parser``, for usage errors). One built with
``passthrough=True`` parses nothing: every argument, ``--help`` included, goes to the command, which
hands them on (``iiotfl run`` to Hydra, ``iiotfl certs`` to the certificate tool).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TypeVar, overload

_N = TypeVar("_N")


class CommandParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, passthrough: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.passthrough = passthrough

    # argparse's own overloads: the namespace returned is the one given, else a new Namespace
    @overload
    def parse_known_args(self, args: Iterable[str] | None = None,
                         namespace: None = None) -> tuple[argparse.Namespace, list[str]]: ...
    @overload
    def parse_known_args(self, args: Iterable[str] | None, namespace: _N) -> tuple[_N, list[str]]: ...
    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        # passthrough: nothing parsed, only the defaults (the command's handler) set
        namespace, extras = super().parse_known_args([] if self.passthrough else argv, namespace)
        if extras:  # as parse_args says it, but naming this command
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        namespace.argv, namespace.parser = argv, self
        return namespace, []


def usage_error(args: argparse.Namespace, message: str) -> int:
    """``error: MESSAGE`` and the command's usage on stderr; exit code 2 (bad usage)."""
    print(f"error: {message}\n{args.parser.format_usage().rstrip()}", file=sys.stderr)
    return 2


def description(doc: str | None) -> str:
    """A command module's docstring as its ``--help`` text (reST double backquotes dropped)."""
    return (doc or "").replace("``", "").strip()


def summary(doc: str | None) -> str:
    """A command's line in ``iiotfl --help``: what its docstring's first line (``iiotfl CMD ARGS: what it
    does.``) says after the usage."""
    return description(doc).split("\n")[0].split(": ", 1)[-1]
