"""``iiotfl gateway``: every bad input gives its one-line error before anything joins.

The SuperLink side of the TLS checks is a real TLS server on loopback with a certificate
from one CA; the gateway is given another CA, an expired one, or the right one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iiotfl.tasks.predictive_maintenance.generator import generate_plant
from iiotfl.tasks.predictive_maintenance.loader import save_csv
from tests.conftest import run_cli


def _cert(subject: str, issuer_key, issuer_name: str | None = None, key=None, *, days: float = 30,
          ca: bool = False, ip: str | None = None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=60)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _cert("iiotfl test CA", None, ca=True)
    other_key, other = _cert("another CA", None, ca=True)
    _, expired = _cert("expired CA", None, ca=True, days=-1)
    srv_key, srv = _cert("superlink", ca_key, "iiotfl test CA", ip="127.0.0.1")
    for name, cert in (("ca.crt", ca), ("other.crt", other), ("expired.crt", expired), ("server.crt", srv)):
        (d / name).write_bytes(_pem(cert))
    (d / "server.key").write_bytes(srv_key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    node = ec.generate_private_key(ec.SECP384R1())
    (d / "gateway-0.key").write_bytes(node.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption()))
    return d


@pytest.fixture(scope="module")
def tls_server(pki):
    """A TLS listener on loopback presenting the SuperLink certificate of ``pki``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    t.join()
    sock.close()


def _gateway(*args: str):
    proc = run_cli("gateway", *args, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    return proc.returncode, lines


def test_wrong_and_expired_ca_are_named(pki, tls_server):
    code, err = _gateway("--superlink", tls_server, "--ca", str(pki / "other.crt"), "--max-wait", "5", "--check")
    assert code == 0  # --check does not connect
    code, err = _gateway("--superlink", tls_server, "--ca", str(pki / "other.crt"), "--max-wait", "5",
                         "--key", str(pki / "gateway-0.key"))
    assert code == 2 and len(err) == 1
    assert "does not verify against CA" in err[0] and "other.crt" in err[0]
    code, err = _gateway("--superlink", tls_server, "--ca", str(pki / "expired.crt"))
    assert code == 2 and "expired on" in err[0] and "iiotfl certs" in err[0]
    code, err = _gateway("--superlink", tls_server, "--ca", str(pki / "server.key"))
    assert code == 2 and "is not a PEM certificate" in err[0]


def test_the_right_ca_passes_the_handshake(pki, tls_server):
    from iiotfl.clients.gateway import GatewayError, probe

    probe(tls_server, str(pki / "ca.crt"))  # no error
    with pytest.raises(GatewayError, match="does not verify"):
        probe(tls_server, str(pki / "other.crt"))


def test_unreachable_server_is_retried_then_named(pki):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("gateway", "--superlink", f"127.0.0.1:{port}", "--ca", str(pki / "ca.crt"), "--max-wait", "4",
                   timeout=60)
    assert proc.returncode == 2
    retries = [x for x in proc.stderr.splitlines() if "retrying in" in x]
    assert len(retries) >= 2 and "retrying in 1 s" in retries[0] and "retrying in 2 s" in retries[1]
    assert "cannot reach the SuperLink at 127.0.0.1" in proc.stderr.splitlines()[-1]


def test_key_and_data_errors(pki, tmp_path):
    base = ("--superlink", "127.0.0.1:1", "--ca", str(pki / "ca.crt"), "--check")
    code, err = _gateway(*base, "--key", str(tmp_path / "missing.key"))
    assert code == 2 and "node key" in err[0] and "not found" in err[0]
    code, err = _gateway(*base, "--key", str(pki / "ca.crt"))
    assert code == 2 and "not an OpenSSH EC private key" in err[0]
    code, err = _gateway(*base, "--key", str(pki / "gateway-0.key"), "--data", str(tmp_path / "nothing"))
    assert code == 2 and "not found" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _gateway(*base, "--data", str(empty))
    assert code == 2 and "no *.csv files" in err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_csv(generate_plant(0, 0, n_units=2), bad / "day1.csv")
    text = (bad / "day1.csv").read_text().splitlines()
    (bad / "day2.csv").write_text("\n".join([text[0], text[1].replace(text[1].split(",")[3], "broken")]) + "\n")
    code, err = _gateway(*base, "--data", str(bad))
    assert code == 2 and "day2.csv: row 2" in err[0]
    code, _ = _gateway(*base, "--key", str(pki / "gateway-0.key"), "--data", str(bad / "day1.csv"))
    assert code == 0
    code, err = _gateway(*base, "--link", "carrier_pigeon")
    assert code == 2 and "carrier_pigeon" in err[0] and "does not exist" in err[0]


def test_the_joined_marker_is_per_key_and_superlink_and_only_with_a_state_dir(tmp_path):
    """A restarted gateway container waits for its old session only if this key joined this SuperLink."""
    from iiotfl.clients import gateway

    keys = []
    for i in range(2):
        keys.append(tmp_path / f"gateway-{i}.key")
        keys[-1].write_bytes(f"key {i}".encode())

    def marker(key, superlink="superlink:9093", state=tmp_path / "state"):
        return gateway.joined_marker(gateway.parser().parse_args(
            ["--superlink", superlink, "--key", str(key), *(["--state-dir", str(state)] if state else [])]))

    assert marker(keys[0], state=None) is None
    assert marker(keys[0]) == marker(keys[0]) and marker(keys[0]).parent == tmp_path / "state"
    assert len({marker(keys[0]), marker(keys[1]), marker(keys[0], "other:9093")}) == 3
    gateway._remember(marker(keys[0]))
    assert marker(keys[0]).exists() and not marker(keys[1]).exists()
