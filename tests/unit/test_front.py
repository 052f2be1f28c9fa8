"""The gateway-facing front's nginx config and the gateways' client certificates."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from iiotfl.clients import processes
from iiotfl.clients.gateway import GatewayError, check_client_cert
from iiotfl.configs import ConfigError, compose
from iiotfl.security import certs
from iiotfl.server.launch import front, validate
from iiotfl.server.launch.superlink import free_port


def test_every_gateway_gets_a_client_certificate_of_the_fleets_ca_and_reruns_keep_them(tmp_path):
    certs.create(tmp_path, gateways=2)
    first = {i: certs.gateway_crt(tmp_path, i).read_bytes() for i in range(2)}
    for i in range(2):
        crt = certs.load_cert(certs.gateway_crt(tmp_path, i))
        crt.verify_directly_issued_by(certs.load_cert(tmp_path / certs.CA_CRT))
        assert crt.subject.rfc4514_string().startswith(f"CN=gateway-{i}")
        assert (certs.gateway_tls_key(tmp_path, i).stat().st_mode & 0o777) == 0o600
        check_client_cert(certs.gateway_crt(tmp_path, i), certs.gateway_tls_key(tmp_path, i), tmp_path / certs.CA_CRT)
    certs.create(tmp_path, gateways=3)
    assert {i: certs.gateway_crt(tmp_path, i).read_bytes() for i in range(2)} == first
    certs.check_dir(tmp_path, 3)
    certs.gateway_crt(tmp_path, 2).unlink()
    with pytest.raises(certs.CertsError, match="gateway-2.crt .* not found; add it with"):
        certs.check_dir(tmp_path, 3)


def test_a_gateway_refuses_a_client_certificate_that_cannot_work(tmp_path):
    certs.create(tmp_path / "a", gateways=2)
    certs.create(tmp_path / "b", gateways=1)
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(GatewayError, match="cannot be used together"):  # gateway 0's cert with gateway 1's key
        check_client_cert(certs.gateway_crt(a, 0), certs.gateway_tls_key(a, 1), a / certs.CA_CRT)
    with pytest.raises(GatewayError, match="not issued by"):  # another fleet's certificate
        check_client_cert(certs.gateway_crt(b, 0), certs.gateway_tls_key(b, 0), a / certs.CA_CRT)
    with pytest.raises(GatewayError, match="not found"):
        check_client_cert(a / "nope.crt", certs.gateway_tls_key(a, 0), a / certs.CA_CRT)


def test_the_front_forwards_the_fleet_api_only_and_asks_for_client_certificates(tmp_path):
    certs.create(tmp_path / "certs", gateways=1)
    text = front.config(tmp_path / "front", "127.0.0.1:9092", "127.0.0.1:9093", tmp_path / "certs")
    assert "ssl_verify_client on;" in text and "location / { return 403; }" in text
    assert [line.strip() for line in text.splitlines() if line.strip().startswith("location")] == [
        "location /v1/fleet/ {", "location / { return 403; }"]
    assert "server 127.0.0.1:9093;" in text and "proxy_pass https://superlink_fleet_api;" in text
    assert "proxy_ssl_verify on;" in text and "keepalive 16;" in text
    if front.nginx() is None:
        pytest.skip("nginx is not installed: the config is not checked by nginx itself")
    argv = front.prepare(tmp_path, "127.0.0.1:9092", "127.0.0.1:9093", tmp_path / "certs", {})
    checked = subprocess.run([*argv[:5], "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_the_front_needs_tls_and_nginx_when_asked_for():
    with pytest.raises(ConfigError, match="engine.front=nginx needs TLS"):
        validate(compose(["engine.front=nginx", "engine.insecure=true"]))
    with pytest.raises(ConfigError, match="engine.front='apache' is unknown"):
        validate(compose(["engine.front=apache"]))
    validate(compose(["engine.front=none", "engine.insecure=true"]))


def members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else []
        except OSError:
            continue
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def test_a_front_left_by_a_killed_launcher_is_found_by_its_tag_and_ended_with_its_workers(tmp_path):
    """nginx writes its title over its environment: the run's tag must still find it after kill -9."""
    if front.nginx() is None:
        pytest.skip("nginx is not installed")
    certs.create(tmp_path / "certs", gateways=1)
    tag = f"test-{os.getpid()}-front"
    dead_launcher = "1:0"  # pid 1 did not start at tick 0: this run's launcher is gone
    argv = front.prepare(tmp_path, f"127.0.0.1:{free_port()}", "127.0.0.1:9", tmp_path / "certs",
                         {processes.RUN_VAR: tag, processes.LAUNCHER_VAR: dead_launcher})
    master = processes.spawn(argv, processes.bin_env(), log=tmp_path / "front.log")
    try:
        deadline = time.time() + 20
        while len(group := members(master.pid)) < 2:
            assert master.poll() is None and time.time() < deadline, (tmp_path / "front.log").read_text()
            time.sleep(0.1)
        assert b"nginx: master" in (processes.cmdline(master.pid) or b"")
        assert processes.run_pids(tag) == [master.pid]  # found, although its environment is overwritten
        assert processes.run_alive(tag) is False  # launcher gone: the orphan is ended, group and all
        deadline = time.time() + 10
        while set(members(master.pid)) & set(group) - {master.pid}:
            assert time.time() < deadline, "the front's worker outlived its master"
            time.sleep(0.1)
        assert master.wait(10) == -9
    finally:
        processes.stop_group(master, grace=1)


def test_iiotfl_front_checks_its_certificates_and_addresses_and_writes_a_config_nginx_loads(tmp_path, capsys):
    from iiotfl.server.cli import main

    assert main(["front", str(tmp_path / "none"), "--listen", "0.0.0.0:9443", "--superlink", "superlink:9093"]) == 2
    assert "ca.crt not found; create the directory with `iiotfl certs" in capsys.readouterr().err
    certs.create(tmp_path / "certs", gateways=1, sans=["superlink", "front"])
    bad = ["front", str(tmp_path / "certs"), "--listen", "0.0.0.0", "--superlink", "superlink:9093",
           "--dir", str(tmp_path / "f")]
    assert main(bad) == 2
    assert "'0.0.0.0' is not HOST:PORT" in capsys.readouterr().err
    if front.nginx() is None:
        pytest.skip("nginx is not installed")
    good = ["front", str(tmp_path / "certs"), "--listen", "127.0.0.1:9443", "--superlink", "127.0.0.1:9093",
            "--dir", str(tmp_path / "f"), "--check"]
    assert main(good) == 0, capsys.readouterr().err
    text = (tmp_path / "f" / "nginx.conf").read_text()
    assert "server 127.0.0.1:9093;" in text and "proxy_ssl_name localhost;" in text
