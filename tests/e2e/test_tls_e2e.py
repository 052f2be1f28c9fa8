"""TLS and SuperNode authentication: ``iiotfl certs`` and the local fleet's secure SuperLink.

Fast: what ``iiotfl certs`` writes (files, SANs, modes, OpenSSH P-384 node keys that flwr
1.42's own parsers accept), that it never overwrites without ``--force``, the fleet's
flags (parsed by flwr's own argument parsers) and the config checks of ``engine.certs``.

Slow (one real TLS + ``--enable-supernode-auth`` SuperLink shared by the module, started
with the fleet's own argv): a registered node joins, and a SuperNode with the wrong CA,
with an unregistered key, without a key, or without TLS does not, each with flwr's real
log text and iiotfl's one-line reading of it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from iiotfl.clients.gateway import supernode_failure
from iiotfl.clients.processes import BIN
from iiotfl.compat.flower import (
    load_node_key_pair,
    load_node_public_key,
    public_key_to_bytes,
    superlink_parser,
    supernode_parser,
)
from iiotfl.configs import ConfigError, compose
from iiotfl.security import certs
from iiotfl.server.launch import CONNECTION, Deployment, SimDeployment, free_port, validate, wait_port
from tests.conftest import run_cli, supernode_argv


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- iiotfl certs --------------------------------------------------------------------------------
def test_certs_writes_the_layout_with_sans_modes_and_flwr_node_keys(tmp_path):
    d = tmp_path / "certs"
    proc = run_cli("certs", str(d), "--san", "superlink.plant.example", "--san", "10.1.2.3", "--gateways", "2")
    assert proc.returncode == 0, proc.stderr
    assert set(_files(d)) == {"ca.crt", "ca.key", "superlink.crt", "superlink.key"} | {
        f"gateways/gateway-{i}.{ext}" for i in (0, 1) for ext in ("key", "pub", "crt", "tls.key")}
    for secret in ("ca.key", "superlink.key", "gateways/gateway-0.key", "gateways/gateway-1.key",
                   "gateways/gateway-0.tls.key"):
        assert (d / secret).stat().st_mode & 0o777 == 0o600, secret
    for public in ("ca.crt", "superlink.crt", "gateways/gateway-0.pub", "gateways/gateway-0.crt"):
        assert (d / public).stat().st_mode & 0o077 == 0o044, public  # readable for a container's user

    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    crt = x509.load_pem_x509_certificate((d / "superlink.crt").read_bytes())
    crt.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not crt.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert certs.san_names(crt) == {"localhost", "127.0.0.1", "superlink.plant.example", "10.1.2.3"}
    assert "10.1.2.3" in proc.stdout and "--register" in proc.stdout

    # node keys: what flower-supernode --auth-supernode-private-key and flwr supernode register parse
    priv, pub = load_node_key_pair(d / "gateways/gateway-1.key")
    assert isinstance(priv.curve, ec.SECP384R1)
    registered = load_node_public_key(d / "gateways/gateway-1.pub")
    assert registered == public_key_to_bytes(pub)
    assert (d / "gateways/gateway-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_certs_never_overwrites_without_force_but_adds_gateways(tmp_path):
    d = tmp_path / "certs"
    assert run_cli("certs", str(d), "--san", "superlink", "--gateways", "1").returncode == 0
    before = _files(d)

    proc = run_cli("certs", str(d), "--san", "other.example")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not cover other.example" in proc.stderr and "--force" in proc.stderr
    assert _files(d) == before

    proc = run_cli("certs", str(d), "--san", "superlink", "--gateways", "3")  # same SANs, more gateways
    assert proc.returncode == 0, proc.stderr
    after = _files(d)
    assert {k: after[k] for k in before} == before and "gateways/gateway-2.key" in after
    assert (d / "gateways/gateway-2.key").stat().st_mode & 0o777 == 0o600

    (d / "gateways/gateway-1.pub").unlink()  # a lost public key is re-derived, the private key kept
    assert run_cli("certs", str(d), "--gateways", "3").returncode == 0
    assert _files(d) == after

    proc = run_cli("certs", str(d), "--san", "other.example", "--gateways", "3", "--force")
    assert proc.returncode == 0, proc.stderr
    forced = _files(d)
    assert all(forced[k] != after[k] for k in ("ca.crt", "ca.key", "superlink.key", "gateways/gateway-0.key"))
    assert "other.example" in certs.san_names(certs.load_cert(d / "superlink.crt"))


def test_certs_bad_input_is_one_line(tmp_path):
    d = tmp_path / "certs"
    proc = run_cli("certs", str(d), "--san", "not a name!")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --san 'not a name!'") and not d.exists()
    assert run_cli("certs", str(d), "--gateways", "0").returncode == 0
    (d / "superlink.key").unlink()
    proc = run_cli("certs", str(d))
    assert proc.returncode == 2 and "superlink.key missing" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli("certs", str(tmp_path / "none"), "--register", "127.0.0.1:1")
    assert proc.returncode == 2 and "no gateways/gateway-<i>.pub" in proc.stderr


# -- the fleet's configuration and flags ------------------------------------------------------------
@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    certs.create(d, sans=["10.77.0.1"], gateways=3)
    return d


def test_engine_certs_is_checked_before_anything_starts(certs_dir, tmp_path):
    validate(compose(["fleet.gateways=3", f"engine.certs={certs_dir}"]))
    validate(compose(["engine.insecure=true"]))
    cases = [
        (["fleet.gateways=4", f"engine.certs={certs_dir}"], "gateway-3.key not found"),
        ([f"engine.certs={tmp_path / 'missing'}"], "is not a directory"),
        ([f"engine.certs={certs_dir}", "fleet.gateways=3", "engine.insecure=true"], "drop one of them"),
        (["engine.insecure=yes please"], "must be true or false"),
    ]
    other = tmp_path / "other"
    certs.create(other, gateways=0)
    mixed = tmp_path / "mixed"
    certs.create(mixed, gateways=1)
    (mixed / "ca.crt").write_bytes((other / "ca.crt").read_bytes())  # a CA that did not sign superlink.crt
    cases.append(([f"engine.certs={mixed}", "fleet.gateways=1"], "is not signed by"))
    loose = tmp_path / "loose"
    certs.create(loose, gateways=1)
    (loose / "superlink.key").chmod(0o644)
    cases.append(([f"engine.certs={loose}", "fleet.gateways=1"], "chmod 600"))
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match="engine") as err:
            validate(compose(overrides))
        assert needle in str(err.value) and "\n" not in str(err.value), overrides
    # the address the SuperNodes dial through the link relays must be in the certificate
    with pytest.raises(certs.CertsError, match=r"not valid for 10\.77\.0\.1.*--san 10\.77\.0\.1"):
        certs.check_dir(other, 0, ["127.0.0.1", "10.77.0.1"])


def test_fleet_flags_are_flwr_1_42_flags(certs_dir, tmp_path):

    dep = Deployment(compose(["fleet.gateways=3", f"engine.certs={certs_dir}"]), tmp_path)
    dep.port = 9093
    dep.certs = dep.provision_certs()
    sl = superlink_parser().parse_args(dep.superlink_argv()[1:])
    assert not sl.insecure and sl.enable_supernode_auth and not sl.simulation
    assert (sl.ssl_ca_certfile, sl.ssl_certfile, sl.ssl_keyfile) == tuple(
        str(certs_dir / f) for f in ("ca.crt", "superlink.crt", "superlink.key"))
    sn = supernode_parser().parse_args(supernode_argv(dep, 2, "10.77.0.1:5000")[1:])
    assert not sn.insecure and sn.root_certificates == str(certs_dir / "ca.crt")
    assert sn.auth_supernode_private_key == str(certs_dir / "gateways/gateway-2.key")
    assert sn.superlink == "10.77.0.1:5000" and "partition-id=2" in sn.node_config

    dep.home.mkdir(parents=True)
    dep.write_connection()
    conn = (dep.home / "config.toml").read_text()
    assert f'root-certificates = "{certs_dir / "ca.crt"}"' in conn and "insecure" not in conn

    insecure = Deployment(compose(["engine.insecure=true"]), tmp_path / "insecure")
    assert "--insecure" in insecure.superlink_argv() and "--enable-supernode-auth" not in insecure.superlink_argv()
    assert "--insecure" in supernode_argv(insecure, 0, "127.0.0.1:1")
    sim = SimDeployment(compose(["engine=sim"]), tmp_path / "sim")
    assert {"--insecure", "--simulation"} <= set(sim.superlink_argv())


# -- a real SuperLink with TLS and node authentication -------------------------------------------
def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with ``flag``'s value set (added if absent; the flag dropped when value is None)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out + ([flag, value] if value is not None else [])


class SecureLink:
    """The fleet's Deployment with only its SuperLink up (TLS, --enable-supernode-auth)."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.address = f"127.0.0.1:{dep.port}"
        self.joined: set[str] = set()  # node ids that joined on purpose

    def supernode(self, name: str, i: int, insecure: bool = False, **flags: str | None) -> subprocess.Popen:
        """Gateway i's SuperNode as the fleet starts it, with ``flags`` changed (None: dropped)."""
        argv = supernode_argv(self.dep, i, self.address)
        for flag, value in flags.items():
            argv = _replace(argv, "--" + flag.replace("_", "-"), value)
        return self.dep.spawn(name, argv + (["--insecure"] if insecure else []))

    def log(self, name: str) -> str:
        return (self.dep.logs / f"{name}.log").read_text(errors="replace")

    def ended(self, name: str, timeout: float = 90) -> str:
        proc = self.dep.procs[name]
        _wait(lambda: proc.poll() is not None, timeout, f"{name} to exit")
        assert proc.returncode != 0, self.log(name)
        assert "SuperNode ID" not in self.log(name)
        return self.log(name)

    def nodes(self) -> list[dict]:
        out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
                             capture_output=True, text=True, env=self.dep.env, timeout=60)
        return json.loads(out.stdout)["nodes"]


@pytest.fixture(scope="module")
def secure_link(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tls-superlink")
    dep = Deployment(compose(["fleet.gateways=3"]), run_dir)
    with dep:  # teardown ends the SuperLink and every SuperNode spawned below, also on failure
        dep.port = free_port()
        dep.certs = dep.provision_certs()  # fresh certs in the run directory, as the fleet does
        sl = dep.spawn("superlink", dep.superlink_argv())
        wait_port(dep.port, sl, 120, "flower-superlink", dep.logs / "superlink.log")
        dep.write_connection()
        done = certs.register([certs.gateway_pub(dep.certs, i) for i in (0, 1)], f"127.0.0.1:{dep.port}",
                              dep.certs / certs.CA_CRT, env=dep.env)
        assert [r.node_id is not None for r in done] == [True, True]
        yield SecureLink(dep)


@pytest.mark.slow
def test_registered_node_joins_over_tls(secure_link):
    secure_link.supernode("supernode-0", 0)
    _wait(lambda: "SuperNode ID" in secure_link.log("supernode-0"), 90, "gateway 0 to join")
    assert "https://127.0.0.1" in secure_link.log("superlink")
    assert "SuperNode authentication is disabled" not in secure_link.log("superlink")
    # the flwr CLI connection verifies the SuperLink with the CA and sees the node online
    nodes = _wait(lambda: [n for n in secure_link.nodes() if n["status"] == "online"], 30, "an online node")
    assert len(nodes) == 1
    secure_link.joined.add(nodes[0]["node-id"])


@pytest.mark.slow
def test_node_with_the_wrong_ca_fails_with_a_clear_message(secure_link, tmp_path):
    other = tmp_path / "other"
    certs.create(other, gateways=0)
    secure_link.supernode("supernode-1", 1, root_certificates=str(other / "ca.crt"), max_wait_time="20")
    log = secure_link.ended("supernode-1")
    assert "SSL/TLS handshake error detected." in log
    assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate" in log
    assert "Exit Code: 305" in log
    # what the fleet's launcher reports for it: one line with the fix
    refused = secure_link.dep.supernode_refused()
    assert refused.startswith("gateway 1: the SuperLink's certificate does not verify against this SuperNode's CA "
                              "([SSL: CERTIFICATE_VERIFY_FAILED]")
    assert "\n" not in refused and refused.endswith("see logs/supernode-1.log")


@pytest.mark.slow
def test_unregistered_node_key_is_refused(secure_link, tmp_path):
    stranger = tmp_path / "stranger"
    certs.create(stranger, gateways=1)
    secure_link.supernode("supernode-stranger", 2, auth_supernode_private_key=str(certs.gateway_key(stranger, 0)),
                          max_wait_time="20")
    log = secure_link.ended("supernode-stranger")
    assert "[code: 2004] Failed to activate SuperNode." in log
    assert "/v1/fleet/activate-node" in secure_link.log("superlink")
    assert supernode_failure(log).startswith("the SuperLink refused this node key: it is not registered")
    # and a SuperNode without any key may not register itself
    secure_link.supernode("supernode-nokey", 2, auth_supernode_private_key=None, max_wait_time="20")
    log = secure_link.ended("supernode-nokey")
    assert "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI." in log
    assert "requires registered node keys" in supernode_failure(log)


@pytest.mark.slow
def test_insecure_node_cannot_join_a_tls_superlink(secure_link):
    secure_link.supernode("supernode-plain", 1, insecure=True, root_certificates=None, auth_supernode_private_key=None,
                          max_wait_time="6")
    log = secure_link.ended("supernode-plain")
    assert "Starting insecure channel" in log and "Connection attempt failed" in log
    # the TLS server closes the plaintext connection: usually a clean close, a reset if it races the request
    assert "Server disconnected without sending a response." in log or "Connection reset by peer" in log, log
    assert supernode_failure(log).startswith("it ran without TLS (--insecure) and the SuperLink hung up (")
    assert not [n for n in secure_link.nodes() if n["status"] == "online" and n["node-id"] not in secure_link.joined]


@pytest.mark.slow
def test_iiotfl_certs_register_is_idempotent(secure_link, tmp_path):
    d = tmp_path / "pilot"
    certs.create(d, gateways=2)
    address = secure_link.address
    ca = secure_link.dep.certs / "ca.crt"
    (d / "ca.crt").write_bytes(ca.read_bytes())  # the pilot's keys, the running SuperLink's CA
    first = run_cli("certs", str(d), "--register", address, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("registered as node") == 2
    again = run_cli("certs", str(d), "--register", address, timeout=120)
    assert again.returncode == 0 and again.stdout.count("already registered") == 2, again.stdout + again.stderr
    # without the right CA the registration is refused, in one line
    certs.create(tmp_path / "x", gateways=0)
    (d / "ca.crt").write_bytes((tmp_path / "x" / "ca.crt").read_bytes())
    bad = run_cli("certs", str(d), "--register", address, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: registering") and bad.stderr.count("\n") == 1


# -- a whole TLS fleet run (the shared fleet_run of tests/e2e/test_e2e.py) -------------------------------
@pytest.mark.slow
def test_default_fleet_run_uses_tls_and_node_authentication(fleet_run):
    run_dir, proc = fleet_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["transport"].startswith("TLS") and "SuperNode authentication" in launch["transport"]
    assert "**Transport: TLS" in (run_dir / "report.md").read_text()
    assert (run_dir / "certs" / "gateways" / "gateway-2.key").stat().st_mode & 0o777 == 0o600
    superlink = (run_dir / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://" in superlink and superlink.count("/v1/control/register-node") == 3
    for i in range(3):
        log = (run_dir / "logs" / f"supernode-{i}.log").read_text()
        assert "SuperNode ID" in log and "insecure" not in log.lower()
    assert "root-certificates" in (run_dir / "flwr" / "config.toml").read_text()
