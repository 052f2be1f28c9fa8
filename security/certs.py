"""TLS certificates and SuperNode keys for a SuperLink with node authentication (flwr 1.42).

Contract. ``iiotfl certs DIR`` (:func:`create`) writes, with the ``cryptography`` library,
this layout, which stays stable (``docker-compose.yml`` mounts these exact files):

=============================  ===========================================================
``DIR/ca.crt``                 CA certificate (PEM; 10 years). Gateways (``--root-certificates``)
                               and the ``flwr`` CLI (``root-certificates``) verify the SuperLink with it.
``DIR/ca.key``                 CA key (PEM PKCS#8, ECDSA P-384, 0600). Only for issuing; no process reads it.
``DIR/superlink.crt``          SuperLink certificate (PEM; 2 years) signed by the CA. SANs: localhost,
                               127.0.0.1 and every ``--san`` (DNS name or IP address).
``DIR/superlink.key``          its key (PEM PKCS#8, ECDSA P-384, 0600).
``DIR/gateways/gateway-<i>.key``  gateway i's node key: OpenSSH private key, ECDSA P-384 (a NIST curve, as
                               flwr 1.42 requires), unencrypted, 0600 (``flower-supernode
                               --auth-supernode-private-key``).
``DIR/gateways/gateway-<i>.pub``  its public key, one OpenSSH line ``ecdsa-sha2-nistp384 AAAA... gateway-<i>``
                               (``flwr supernode register gateway-<i>.pub <connection>``).
``DIR/gateways/gateway-<i>.crt``  gateway i's TLS client certificate (PEM; 2 years; clientAuth only; CN
                               gateway-<i>) signed by the CA: the front checks it (mutual TLS).
``DIR/gateways/gateway-<i>.tls.key``  its key (PEM PKCS#8, ECDSA P-384, 0600), apart from the node key.
=============================  ===========================================================

Existing files are never overwritten without ``force``: a re-run with the same (or no) SANs
keeps the CA and the SuperLink certificate and only adds missing gateway keys; anything
else ends with :class:`CertsError`, one line with the fix.

Registration (:func:`register`): a SuperLink started with ``--enable-supernode-auth``
refuses SuperNodes that register themselves; each node's public key is added through the
Control API (same host:port as the Fleet API, over the same TLS) with
``flwr supernode register PUB <connection>``, the connection holding ``address`` and
``root-certificates``. Registering a key the SuperLink already holds counts as done.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CRT, CA_KEY = "ca.crt", "ca.key"
SERVER_CRT, SERVER_KEY = "superlink.crt", "superlink.key"
GATEWAYS = "gateways"
DEFAULT_SANS = ("localhost", "127.0.0.1")
CURVE = ec.SECP384R1
BIN = Path(sys.executable).parent
CONNECTION = "iiotfl"
DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


class CertsError(RuntimeError):
    """A certificate directory that cannot be used or written as asked; one line with the fix."""


def gateway_key(certs_dir: str | Path, i: int) -> Path:
    return Path(certs_dir) / GATEWAYS / f"gateway-{i}.key"


def gateway_crt(certs_dir: str | Path, i: int) -> Path:
    return Path(certs_dir) / GATEWAYS / f"gateway-{i}.crt"


def gateway_tls_key(certs_dir: str | Path, i: int) -> Path:
    return Path(certs_dir) / GATEWAYS / f"gateway-{i}.tls.key"


def gateway_pub(certs_dir: str | Path, i: int) -> Path:
    return Path(certs_dir) / GATEWAYS / f"gateway-{i}.pub"


# -- writing ---------------------------------------------------------------------------------
def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write atomically; secrets are created 0600 (never world-readable, not even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600 if secret else 0o644)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        if not DNS_NAME.fullmatch(name):
            raise CertsError(f"--san {name!r} is neither an IP address nor a DNS name "
                             "(e.g. --san superlink.plant.local or --san 10.0.0.5)") from None
        return x509.DNSName(name.lower())


def san_names(cert: x509.Certificate) -> set[str]:
    """The certificate's subject alternative names, as strings (IP addresses normalised)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {n.lower() for n in ext.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}


def _issue(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, subject: x509.Name,
           key: ec.EllipticCurvePrivateKey, days: int, ca: bool, sans: list[x509.GeneralName]) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    elif not sans:  # a gateway's TLS client certificate (mutual TLS at the front)
        b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    else:
        b = (b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    return b.sign(ca_key, hashes.SHA384())


def _write_gateway(certs_dir: Path, i: int, force: bool) -> list[Path]:
    key_path, pub_path = gateway_key(certs_dir, i), gateway_pub(certs_dir, i)
    keep = key_path.exists() and not force
    if keep:
        if pub_path.exists():
            return []
        key = load_node_key(key_path)  # a lost .pub is re-derived from the key
    else:
        key = ec.generate_private_key(CURVE())
        _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), secret=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(pub_path, pub + f" gateway-{i}\n".encode(), secret=False)
    return [pub_path] if keep else [key_path, pub_path]


def create(certs_dir: str | Path, sans: Iterable[str] = (), gateways: int = 4, force: bool = False) -> list[Path]:
    """Write the layout above into ``certs_dir``; returns the files written (possibly none)."""
    d = Path(certs_dir)
    if gateways < 0:
        raise CertsError(f"--gateways {gateways}: give 0 or more gateways")
    wanted = list(dict.fromkeys([*DEFAULT_SANS, *(s.strip() for s in sans if s.strip())]))
    names = [_san(s) for s in wanted]
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / GATEWAYS).mkdir(exist_ok=True)
    except OSError as err:
        raise CertsError(f"cannot create {d}: {err.strerror or err}; pick a writable directory") from None
    written: list[Path] = []
    ca_crt, ca_key, crt, key = d / CA_CRT, d / CA_KEY, d / SERVER_CRT, d / SERVER_KEY
    if force or not (ca_crt.exists() or ca_key.exists() or crt.exists() or key.exists()):
        ca_private = ec.generate_private_key(CURVE())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iiotfl"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "iiotfl fleet CA")])
        ca_cert = _issue(ca_private, ca_name, ca_name, ca_private, 3650, True, [])
        server_private = ec.generate_private_key(CURVE())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iiotfl"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "iiotfl superlink")])
        server_cert = _issue(ca_private, ca_name, subject, server_private, 730, False, names)
        _write(ca_key, _pem_key(ca_private), secret=True)
        _write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
        _write(key, _pem_key(server_private), secret=True)
        _write(crt, server_cert.public_bytes(serialization.Encoding.PEM), secret=False)
        written += [ca_crt, ca_key, crt, key]
    else:
        missing = [p.name for p in (ca_crt, ca_key, crt, key) if not p.exists()]
        if missing:
            raise CertsError(f"{d} holds part of a certificate set ({', '.join(missing)} missing); "
                             "re-run with --force to replace the CA, the SuperLink certificate and the keys")
        have = san_names(load_cert(crt))
        lacking = [s for s in wanted if str(_san(s).value).lower() not in have]
        if lacking:
            raise CertsError(f"{crt} exists and does not cover {', '.join(lacking)} (it has "
                             f"{', '.join(sorted(have))}); re-run with --force to replace the CA, the certificate "
                             "and the keys (gateways then need the new ca.crt)")
    issuer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    if not isinstance(issuer, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{ca_key} is not an ECDSA key; re-create the set with `iiotfl certs {d} --force`")
    ca_cert = load_cert(ca_crt)
    for i in range(gateways):
        written += _write_gateway(d, i, force)
        written += _write_client_cert(d, i, issuer, ca_cert, force)
    return written


def _write_client_cert(certs_dir: Path, i: int, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                       force: bool) -> list[Path]:
    """Gateway i's TLS client certificate and key (mutual TLS at the front), unless both exist."""
    crt, key_path = gateway_crt(certs_dir, i), gateway_tls_key(certs_dir, i)
    if crt.exists() and key_path.exists() and not force:
        return []
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iiotfl"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"gateway-{i}")])
    cert = _issue(ca_key, ca.subject, subject, key, 730, False, [])
    _write(key_path, _pem_key(key), secret=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return [crt, key_path]


# -- reading and checking ------------------------------------------------------------------------
def load_cert(path: str | Path) -> x509.Certificate:
    path = Path(path)
    if not path.is_file():
        raise CertsError(f"{path} not found; create the certificates with `iiotfl certs {path.parent}`")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise CertsError(f"{path} is not a PEM certificate; use the one `iiotfl certs` wrote") from None


def load_node_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A node key as ``flower-supernode --auth-supernode-private-key`` reads it (OpenSSH, NIST EC)."""
    path = Path(path)
    if not path.is_file():
        raise CertsError(f"node key {path} not found; create it with `iiotfl certs {path.parent.parent}`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"node key {path} is not an OpenSSH EC private key (unencrypted); use gateway-<i>.key "
                         "from `iiotfl certs` (not the .pub file)")
    return key


def check_secret(path: Path) -> None:
    """A private key must exist and be readable by its owner only (as ssh insists)."""
    if not path.is_file():
        raise CertsError(f"{path} not found; create the certificates with `iiotfl certs`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CertsError(f"{path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`")


def check_dir(certs_dir: str | Path, gateways: int, dialled: Iterable[str] = ("127.0.0.1",)) -> None:
    """What a local TLS fleet needs from ``certs_dir``: the CA, a SuperLink certificate signed
    by it and valid now for every address in ``dialled``, and ``gateways`` node keys."""
    d = Path(certs_dir)
    if not d.is_dir():
        raise CertsError(f"{d} is not a directory; create it with `iiotfl certs {d} --gateways {gateways}`")
    ca, crt = load_cert(d / CA_CRT), load_cert(d / SERVER_CRT)
    check_secret(d / SERVER_KEY)
    try:
        crt.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertsError(f"{d / SERVER_CRT} is not signed by {d / CA_CRT}; "
                         f"re-create both with `iiotfl certs {d} --force`") from None
    now = dt.datetime.now(dt.timezone.utc)
    for path, cert in ((d / CA_CRT, ca), (d / SERVER_CRT, crt)):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertsError(f"{path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                             f"{cert.not_valid_after_utc:%Y-%m-%d}); re-create with `iiotfl certs {d} --force`")
    have = san_names(crt)
    lacking = [a for a in dialled if a not in have]
    if lacking:
        sans = " ".join(f"--san {a}" for a in [*sorted(have - set(DEFAULT_SANS)), *lacking])
        raise CertsError(f"{d / SERVER_CRT} is not valid for {', '.join(lacking)}, which the SuperNodes dial (it has "
                         f"{', '.join(sorted(have))}); re-create with `iiotfl certs {d} --force {sans}`")
    for i in range(gateways):
        key = gateway_key(d, i)
        if not key.is_file():
            raise CertsError(f"{key} not found: the fleet has {gateways} gateways; add their keys with "
                             f"`iiotfl certs {d} --gateways {gateways}`")
        check_secret(key)
        load_node_key(key)
        if not gateway_pub(d, i).is_file():
            raise CertsError(f"{gateway_pub(d, i)} not found; `iiotfl certs {d} --gateways {gateways}` re-derives it")
        if not gateway_crt(d, i).is_file() or not gateway_tls_key(d, i).is_file():
            raise CertsError(f"{gateway_crt(d, i)} (the gateway's TLS client certificate) not found; add it with "
                             f"`iiotfl certs {d} --gateways {gateways}`")
        check_secret(gateway_tls_key(d, i))
        try:
            load_cert(gateway_crt(d, i)).verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CertsError(f"{gateway_crt(d, i)} is not signed by {d / CA_CRT}; re-issue it with "
                             f"`iiotfl certs {d} --gateways {gateways}` after removing it") from None


# -- registration ---------------------------------------------------------------------------------
@dataclass
class Registered:
    pub: Path
    node_id: int | None  # None: the SuperLink already held this key
    message: str


def flwr_connection(address: str, ca: str | Path | None) -> dict[str, object]:
    """A ``flwr`` CLI connection (``[superlink.<name>]`` of FLWR_HOME/config.toml)."""
    if ca is None:
        return {"address": address, "insecure": True}
    return {"address": address, "root-certificates": str(Path(ca).resolve())}


def register(pubs: Iterable[str | Path], address: str, ca: str | Path | None, env: dict[str, str] | None = None,
             timeout: float = 60.0) -> list[Registered]:
    """Register each public key with the SuperLink at ``address`` through its Control API
    (``flwr supernode register PUB <connection>``); ``ca=None`` for a SuperLink without TLS.

    Uses a throw-away FLWR_HOME holding only this connection, so it needs no writable
    certificate directory. A key the SuperLink already holds is reported, not an error.
    """
    import tomli_w

    paths = [Path(p) for p in pubs]
    if not paths:
        raise CertsError("no public keys to register; create them with `iiotfl certs DIR --gateways N`")
    if ca is not None and not Path(ca).is_file():
        raise CertsError(f"CA certificate {ca} not found; pass the ca.crt of the SuperLink's `iiotfl certs` directory")
    for pub in paths:
        if not pub.is_file():
            raise CertsError(f"public key {pub} not found; create it with `iiotfl certs {pub.parent.parent}`")
    with tempfile.TemporaryDirectory(prefix="iiotfl-register-") as home:
        config = {"superlink": {"default": CONNECTION, CONNECTION: flwr_connection(address, ca)}}
        (Path(home) / "config.toml").write_text(tomli_w.dumps(config))
        run_env = {**(env or os.environ), "FLWR_HOME": home}

        def one(pub: Path) -> Registered:
            argv = [str(BIN / "flwr"), "supernode", "register", str(pub), CONNECTION, "--format", "json"]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CertsError(f"registering {pub} with the SuperLink at {address} took over {timeout:.0f}s; "
                                 "is the SuperLink up at that address?") from None
            try:  # `--format json` exits 0 also on failure: the JSON says what happened
                reply = json.loads(proc.stdout[proc.stdout.index("{"):])
            except ValueError:
                reply = {}
            if reply.get("success"):
                return Registered(pub, int(reply["node-id"]), f"registered as node {reply['node-id']}")
            text = reply.get("error-message") or proc.stderr or proc.stdout
            why = [x.strip() for x in text.splitlines() if x.strip()]
            if any("already in use" in x.lower() for x in why):
                return Registered(pub, None, "already registered")
            raise CertsError(f"registering {pub} with the SuperLink at {address} failed: "
                             f"{why[-1] if why else f'exit code {proc.returncode}'}")

        # one `flwr` process per key, a few at a time (each is ~1 s of CPU, mostly imports)
        with ThreadPoolExecutor(max_workers=min(len(paths), 2 * (os.cpu_count() or 1), 8)) as pool:
            return list(pool.map(one, paths))


def register_dir(certs_dir: str | Path, address: str, insecure: bool = False) -> list[Registered]:
    """Register every ``gateways/gateway-<i>.pub`` of ``certs_dir`` (CA: ``certs_dir/ca.crt``)."""
    d = Path(certs_dir)
    pubs = sorted((d / GATEWAYS).glob("gateway-*.pub"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not pubs:
        raise CertsError(f"no {GATEWAYS}/gateway-<i>.pub in {d}; create them with `iiotfl certs {d} --gateways N`")
    return register(pubs, address, None if insecure else d / CA_CRT)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``iiotfl certs`` (its CLI subparser and :func:`main` both use them)."""
    p.add_argument("dir", help="certificate directory (layout: see docs/security.md, 'Certificates and TLS')")
    p.add_argument("--san", action="append", default=[], help="DNS name or IP address gateways use to reach the "
                   "SuperLink (repeatable; localhost and 127.0.0.1 are always in)")
    p.add_argument("--gateways", type=int, default=4, help="node key pairs to have: gateway-0 .. gateway-(N-1) "
                   "(existing ones are kept; default 4)")
    p.add_argument("--force", action="store_true", help="replace existing CA, certificate and keys")
    p.add_argument("--register", metavar="HOST:PORT", help="instead: register every gateways/*.pub with the "
                   "SuperLink at HOST:PORT (Control API, verified with DIR/ca.crt)")
    p.add_argument("--insecure", action="store_true", help="with --register: the SuperLink runs without TLS")


def run(args: argparse.Namespace) -> int:
    """Create (or complete) the certificate directory, or register its gateway keys."""
    try:
        if args.register:
            if args.san or args.force:
                raise CertsError("--register only registers the keys DIR holds; create them first (no --san/--force)")
            for r in register_dir(args.dir, args.register, insecure=args.insecure):
                print(f"{r.pub.name}: {r.message}")
            return 0
        written = create(args.dir, args.san, args.gateways, args.force)
    except CertsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    d = Path(args.dir).resolve()
    if written:
        print("\n".join(f"wrote {p}" for p in written))
    else:
        print(f"{d} already holds everything asked for; nothing written")
    sans = ", ".join(sorted(san_names(load_cert(d / SERVER_CRT))))
    print(f"SuperLink certificate valid for: {sans}\n"
          f"register the gateways once the SuperLink runs: iiotfl certs {d} --register HOST:PORT")
    return 0


def main(argv: list[str]) -> int:
    """``iiotfl certs DIR [--san NAME ...] [--gateways N] [--force]`` or ``iiotfl certs DIR --register HOST:PORT``."""
    p = argparse.ArgumentParser(prog="iiotfl certs", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
