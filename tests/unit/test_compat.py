"""compat/flower.py reaches Flower's internal and moving names from one place; this test fails,
naming the name and the module, when the pinned flwr moves one of them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import flwr
import pytest

COMPAT = Path(__file__).resolve().parents[2] / "compat"


def _reaches() -> list[tuple[str, str]]:
    """(module, name) of every ``from flwr... import name`` in compat/, nested ones included."""
    return [(node.module, alias.name) for path in sorted(COMPAT.glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flwr")
            for alias in node.names]


@pytest.mark.parametrize("module, name", _reaches())
def test_every_flower_name_the_project_reaches_is_where_compat_expects_it(module, name):
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"flwr {flwr.__version__} moved or removed {module}.{name} ({err}); compat/flower.py pins "
                    f"where iiotfl reaches it: find its new place and update that module")
    assert found is not None


def test_the_parsers_accept_what_the_fleet_passes():
    from iiotfl.compat.flower import superlink_parser, supernode_parser

    sl = superlink_parser().parse_args(["--insecure", "--fleet-api-address", "127.0.0.1:1"])
    sn = supernode_parser().parse_args(["--insecure", "--superlink", "127.0.0.1:1"])
    assert sl.insecure and sn.superlink == "127.0.0.1:1"


def test_no_other_module_of_the_project_reaches_flower_internals():
    """Outside compat/, project code imports only Flower's public Message-API and legacy packages."""
    root = COMPAT.parents[1]
    private = ("flwr.supercore", "flwr.compat", "flwr.common.secure_aggregation", "flwr.superlink", "flwr.supernode",
               "flwr.cli", "flwr.client.mod")
    offenders = []
    for folder in ("configs", "tasks", "strategies", "links", "security", "privacy", "clients", "server"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and any(
                        node.module == p or node.module.startswith(p + ".") for p in private):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} imports {node.module}")
    assert not offenders, "reach these through iiotfl.compat.flower:\n" + "\n".join(offenders)


# Log texts that come from outside flwr's own source: OpenSSL's verify error, and Flower's error
# codes, which its SuperNode prints as "[code: N]" from its error catalogue.
NOT_IN_FLWR_SOURCE = {"cert_verify", "not_registered", "auth_required"}


def test_every_log_text_the_project_matches_is_still_printed_by_flwr():
    import flwr

    from iiotfl.compat.flower import LOG

    source = "\n".join(p.read_text(errors="replace") for p in Path(flwr.__file__).parent.rglob("*.py"))
    moved = [f"{key}: {text!r}" for key, text in LOG.items() if key not in NOT_IN_FLWR_SOURCE
             and (text.split("(")[0].strip() if key == "run_started" else text) not in source]
    assert not moved, (f"flwr {flwr.__version__} no longer prints these texts that compat/flower.py's LOG matches; "
                       "find what it prints now and update the table:\n" + "\n".join(moved))


def test_the_error_codes_the_gateway_names_are_flowers():
    import flwr.supercore.error.base as errors

    from iiotfl.compat.flower import LOG

    codes = {int(LOG[key].strip("[]").split(":")[1]) for key in ("not_registered", "auth_required")}
    source = Path(errors.__file__).read_text()
    assert all(f"= {code}" in source for code in codes), f"flwr's error codes no longer include {codes}"


def _mutual_tls_server(certs_dir: Path):
    """A one-shot TLS server on loopback that asks for a client certificate from the fleet's CA and says
    whose it got; returns (port, thread, answers)."""
    import socket
    import ssl
    import threading

    from iiotfl.security import certs

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs_dir / certs.CA_CRT))
    ctx.load_cert_chain(str(certs_dir / certs.SERVER_CRT), str(certs_dir / certs.SERVER_KEY))
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    answers: list[str] = []

    def serve():
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                answers.append(dict(x[0] for x in tls.getpeercert()["subject"])["commonName"])
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as err:
            answers.append(f"refused: {err}")
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, answers


def _handshake(context, port: int) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.recv(2)


def test_the_supernode_presents_its_client_certificate_to_the_fleet_api(tmp_path):
    """compat/supernode.py: Flower's Fleet API client, built as the SuperNode builds it, completes a mutual-TLS
    handshake with the gateway's certificate; without the patch a server that asks for one refuses it."""
    import ssl

    from flwr.supernode.fleet_http_client import FleetHttpClient

    from iiotfl.compat import supernode
    from iiotfl.security import certs

    certs.create(tmp_path, gateways=1)
    ca = (tmp_path / certs.CA_CRT).read_bytes()

    def context():
        client = FleetHttpClient.from_server_address("127.0.0.1:1", insecure=False, root_certificates=ca,
                                                     interceptors=())
        return client._client._transport._pool._ssl_context  # httpx: the context its connections use

    port, thread, answers = _mutual_tls_server(tmp_path)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(context(), port)  # Flower's own client: no certificate to show
    thread.join(5)
    original = FleetHttpClient.__init__
    try:
        supernode.use_client_certificate(str(certs.gateway_crt(tmp_path, 0)), str(certs.gateway_tls_key(tmp_path, 0)))
        patched = context()
    finally:
        FleetHttpClient.__init__ = original
    port, thread, answers = _mutual_tls_server(tmp_path)
    assert _handshake(patched, port) == b"ok"
    thread.join(5)
    assert answers == ["gateway-0"]


def test_every_process_the_project_starts_has_flowers_telemetry_and_update_check_off():
    """Flower posts telemetry to flower.ai from every process unless told not to (each ClientApp also
    waits up to 4 s for it); the environment every launcher and gateway gives its processes says no."""
    import subprocess
    import sys

    from iiotfl.clients.processes import QUIET_FLOWER, bin_env

    probe = ("import flwr.supercore.telemetry as t, flwr.supercore.constant as c, os; "
             "print(t.FLWR_TELEMETRY_ENABLED, os.environ.get(c.FLWR_DISABLE_UPDATE_CHECK))")
    env = {**bin_env(), "FLWR_TELEMETRY_ENABLED": "1"}  # even where the shell turned it on
    out = subprocess.run([sys.executable, "-c", probe], env=bin_env(env), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "1"], out.stderr
    assert QUIET_FLOWER == {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
