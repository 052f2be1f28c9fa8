"""``flower-supernode`` that shows a TLS client certificate: mutual TLS to the fleet's front.

flwr 1.42's SuperNode verifies the server (``--root-certificates``) but cannot present a
client certificate. Run as ``python -m iiotfl.compat.supernode ARGS`` (the arguments of
``flower-supernode``) with ``IIOTFL_CLIENT_CERT`` and ``IIOTFL_CLIENT_KEY`` naming the
gateway's certificate and key, it starts Flower's own SuperNode with its Fleet API client's
TLS context also holding that certificate (``ssl.SSLContext.load_cert_chain``); nothing else
changes. ``tests/unit/test_compat.py`` fails with the moved name if the pinned Flower no
longer builds its HTTP client this way.
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any

from flwr.supercore.protobuf.client import ProtobufClient
from flwr.supernode.cli import flower_supernode
from flwr.supernode.fleet_http_client import FleetHttpClient

CERT_ENV, KEY_ENV = "IIOTFL_CLIENT_CERT", "IIOTFL_CLIENT_KEY"


def with_client_certificate(verify: Any, cert: str, key: str) -> ssl.SSLContext:
    """A client TLS context that verifies like ``verify`` (a context, a CA file or True) and presents ``cert``."""
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context()
    context.load_cert_chain(cert, key)
    return context


def use_client_certificate(cert: str, key: str) -> None:
    """Make the SuperNode's Fleet API client present ``cert`` (only over https, never to loopback apps)."""
    original = FleetHttpClient.__init__

    def init(self: ProtobufClient, base_url: str, *args: Any, verify: Any = True, **kwargs: Any) -> None:
        if base_url.startswith("https://") and verify is not False:
            verify = with_client_certificate(verify, cert, key)
        original(self, base_url, *args, verify=verify, **kwargs)

    FleetHttpClient.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if cert and key:
        use_client_certificate(cert, key)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
