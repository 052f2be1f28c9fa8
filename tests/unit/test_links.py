"""Emulated links: shaping is real (measured through the namespace) and nothing is left behind."""

import subprocess
import sys
import time
import uuid

import pytest

from iiotfl.links import namespaces, shaping
from iiotfl.links.profiles import DeviceProfile, GatewayProfile, LinkProfile

pytestmark = pytest.mark.skipif(shaping.availability() is not None, reason=f"no netns/tc here: {shaping.availability()}")

PROBE = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
s = socket.create_connection((host, port))
s.sendall(b"p")
s.recv(1)
rtt = time.perf_counter() - t0
s.sendall(b"x" * n)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(rtt, time.perf_counter() - t0)
"""


@pytest.fixture
def one_link():
    fleet = namespaces.LinkFleet(uuid.uuid4().hex)
    link = LinkProfile("test", up_kbit=400, down_kbit=2000, rtt_ms=200, jitter_ms=0, loss_pct=0)
    try:
        gw = fleet.create([GatewayProfile(0, link, DeviceProfile("test", cpu_share=0.5, memory_mb=512))])[0]
        yield fleet, gw, link
    finally:
        fleet.remove()


def test_shaping_is_real(one_link, tmp_path):
    import socket
    import threading

    fleet, gw, link = one_link
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    fleet.start_relays(server.getsockname()[1])
    port = gw.relay_port
    received = []

    def sink():
        conn, _ = server.accept()
        total = len(conn.recv(1))
        conn.sendall(b"k")
        while chunk := conn.recv(65536):
            total += len(chunk)
        received.append(total)
        conn.sendall(b"k")
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    n = 100_000
    out = subprocess.run(gw.wrap([sys.executable, "-c", PROBE, namespaces.SERVER_ADDRESS, str(port), str(n)]),
                         capture_output=True, text=True, timeout=60)
    thread.join(10)
    server.close()
    assert out.returncode == 0, out.stderr
    rtt_s, total_s = map(float, out.stdout.split())
    assert received == [n + 1]
    assert rtt_s >= link.rtt_ms / 1000                        # a request/response takes an RTT
    assert total_s >= n * 8 / (link.up_kbit * 1000)           # the uplink rate bounds the transfer
    assert total_s < n * 8 / (link.up_kbit * 1000) * 1.6 + 2  # ... and the link is not broken either
    counters = gw.counters()
    assert counters["up"] >= n                                 # the veth saw the bytes


def test_device_cgroup_holds_the_process(one_link):
    fleet, gw, _ = one_link
    out = subprocess.run(gw.wrap(["cat", "/proc/self/cgroup"]), capture_output=True, text=True, timeout=30)
    assert f"iiotfl-{fleet.tag}-0" in out.stdout


def test_outage_takes_the_link_down(one_link):
    fleet, gw, _ = one_link
    ping = [sys.executable, "-c", "import socket,sys; s=socket.socket(); s.settimeout(1.5); "
            f"sys.exit(s.connect_ex(('{namespaces.SERVER_ADDRESS}', 9)) not in (111,))"]
    assert subprocess.run(gw.wrap(ping), timeout=30).returncode == 0   # refused = reachable
    gw.set_up(False)
    assert subprocess.run(gw.wrap(ping), timeout=30).returncode != 0   # no answer while down
    gw.set_up(True)
    time.sleep(0.5)
    assert subprocess.run(gw.wrap(ping), timeout=30).returncode == 0


def test_remove_leaves_nothing():
    fleet = namespaces.LinkFleet(uuid.uuid4().hex)
    link = LinkProfile("lte", up_kbit=1000, down_kbit=1000, rtt_ms=50)
    fleet.create([GatewayProfile(i, link, DeviceProfile("d", cpu_share=0.5, memory_mb=512)) for i in range(2)])
    assert any(fleet.tag in n for n in namespaces.project_objects()["netns"])
    fleet.remove()
    left = namespaces.project_objects()
    assert not [x for v in left.values() for x in v if fleet.tag in x], left


def test_stale_leftovers_are_cleaned_up():
    fleet = namespaces.LinkFleet(uuid.uuid4().hex)
    fleet.create([GatewayProfile(0, LinkProfile("none"), DeviceProfile("d", cpu_share=1.0))])
    removed = namespaces.cleanup_stale(lambda tag: tag != fleet.tag)  # as if its run had died
    assert any(fleet.tag in r for r in removed)
    left = namespaces.project_objects()
    assert not [x for v in left.values() for x in v if fleet.tag in x], left
