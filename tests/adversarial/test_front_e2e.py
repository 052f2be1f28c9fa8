"""The gateway-facing front, attacked while real gateways train through it: a rogue registration and a
rogue run submission through the address the gateways dial are refused, a client without a certificate
never reaches the Fleet API, and the run completes with every gateway aggregated every round."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import time

import pytest

from iiotfl.security import certs
from iiotfl.server.launch import front
from tests.conftest import IIOTFL, ROOT
from tests.e2e.test_e2e import assert_nothing_left, rounds_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nginx():
    if front.nginx() is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the front's tests with nginx: {front.NGINX_HINT}")
        pytest.skip(f"nginx is not installed: {front.NGINX_HINT}")


def _post(address: str, path: str, ca, cert=None, key=None) -> int:
    """An HTTPS POST to the front as anyone could send it; the HTTP status, or -1 if TLS refused."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    except (ssl.SSLError, ConnectionError):
        return -1
    finally:
        conn.close()


def test_rogue_registration_and_run_submission_through_the_front_are_refused_while_gateways_train(nginx, tmp_path):
    run_dir = tmp_path / "run"
    # link=none: the gateways dial the front on loopback, the address the links' relays forward to
    proc = subprocess.Popen([str(IIOTFL), "run", "fleet.gateways=2", "fleet.rounds=3", "engine.front=nginx",
                             "link=none", f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while (front.listening(run_dir) is None or not (run_dir / "metrics.jsonl").exists()) \
                and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        address = front.listening(run_dir)
        assert address is not None, "the front never came up"
        ca, gw = run_dir / "certs" / certs.CA_CRT, run_dir / "certs"
        # a rogue node key, registered through the address the gateways dial: refused (no client certificate)
        rogue = tmp_path / "rogue"
        certs.create(rogue, gateways=1)
        with pytest.raises(certs.CertsError, match="failed"):
            certs.register([certs.gateway_pub(rogue, 0)], address, ca, timeout=60)
        # a stolen gateway client certificate reaches the Fleet API only: Control and Runtime answer 403
        stolen = (certs.gateway_crt(gw, 0), certs.gateway_tls_key(gw, 0))
        for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/pull-messages",
                     "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run"):
            assert _post(address, path, ca, *stolen) == 403, path
        # no client certificate: nginx answers 400 before anything reaches the SuperLink
        assert _post(address, "/v1/fleet/activate-node", ca) == 400
        # a certificate from another CA: refused the same way
        assert _post(address, "/v1/fleet/activate-node", ca, certs.gateway_crt(rogue, 0),
                     certs.gateway_tls_key(rogue, 0)) == 400
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    rows = rounds_of(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["aggregated"] == 2 for r in rows[1:])
    launch = json.loads((run_dir / "launch.json").read_text())
    assert "through a front (nginx)" in launch["transport"] and "mutual TLS" in launch["transport"]
    # what reached the SuperLink: the gateways' Fleet API calls only, never a control or runtime path
    forwarded = (run_dir / "front" / "access.log").read_text()
    assert '"POST /v1/fleet/' in forwarded and " 403 " in forwarded and " 400 " in forwarded
    superlink = (run_dir / "logs" / "superlink.log").read_text()
    assert superlink.count("RegisterNode] Created node_id") == 2  # the two registered on loopback, no rogue
    assert_nothing_left(run_dir)
