"""Emulated plant links: a network namespace per gateway, on 10.77.0.0/16.

Topology of one run (``<t>`` = first 6 hex digits of the run tag)::

    root namespace                               namespace iiotfl-<t>-<i>
    bridge ifl<t>b  10.77.0.1/16  <-- SuperLink
      └─ veth ifl<t>g<i>  ================  eth0  10.77.<(i+2)//256>.<(i+2)%256>/16

* rate: downlink (server -> gateway) is shaped on the egress of ``ifl<t>g<i>`` (host
  side), uplink (gateway -> server) on the egress of ``eth0`` inside the namespace,
  each a token bucket (``links/shaping.py``). Wire bytes per gateway are the host-side
  veth counters (:func:`veth_counters`, :meth:`LinkFleet.counters`).
* loss: nftables rules inside the namespace (``links/shaping.py``).
* delay and jitter: a relay per gateway on 10.77.0.1 (``links/relay.py``,
  :meth:`LinkFleet.start_relays`); the kernel has no ``sch_netem``.
* device profile: a cgroup per gateway, ``iiotfl-<t>-<i>`` (``links/devices.py``).
* outage: the veth is set down and up again (:meth:`GatewayLink.set_up`).

Everything is named after the run tag, so :func:`cleanup_stale` removes what a crashed
run left (its tag has no live process any more) and :meth:`LinkFleet.remove` what this
run made, on every exit path. Only addresses inside 10.77.0.0/16 are used, and only on
interfaces created here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from iiotfl.links.devices import cgroups_named, make_cgroup, remove_cgroup
from iiotfl.links.iproute import ip
from iiotfl.links.profiles import GatewayProfile
from iiotfl.links.relay import DelayRelay
from iiotfl.links.shaping import apply_link, shape

SUBNET = "10.77.0.0/16"
SERVER_ADDRESS = "10.77.0.1"
PREFIX = "iiotfl-"  # namespaces and cgroups; links are ifl<t>b (bridge) and ifl<t>g<i> (veth, host side)


def gateway_address(index: int) -> str:
    host = index + 2
    if host >= 256 * 256 - 1:
        raise ValueError("10.77.0.0/16 holds at most 65532 gateways")
    return f"10.77.{host // 256}.{host % 256}"


def _tag_of(name: str) -> str | None:
    m = re.search(r"(?:iiotfl-|ifl)([0-9a-f]{6})", name)
    return m.group(1) if m else None


# -- one gateway's link ---------------------------------------------------------------------------
def veth_counters(host_dev: str) -> dict[str, int] | None:
    """Wire bytes so far of a gateway: up = received on the host side, down = sent to it."""
    base = Path("/sys/class/net") / host_dev / "statistics"
    try:
        return {"up": int((base / "rx_bytes").read_text()), "down": int((base / "tx_bytes").read_text())}
    except OSError:
        return None


@dataclass
class GatewayLink:
    profile: GatewayProfile
    netns: str
    host_dev: str
    address: str
    cgroups: list[Path] = field(default_factory=list)
    loss_emulated: bool = True
    relay_port: int = 0

    def counters(self) -> dict[str, int]:
        return veth_counters(self.host_dev) or {"up": 0, "down": 0}

    def set_up(self, up: bool) -> None:
        ip("link", "set", "dev", self.host_dev, "up" if up else "down", check=False)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this gateway's cgroups and namespace."""
        join = "; ".join(f"echo $$ > {p}/cgroup.procs" for p in self.cgroups)
        prefix = ["sh", "-c", f'{join}; exec "$@"', "sh"] if join else []
        return [*prefix, "ip", "netns", "exec", self.netns, *argv]


# -- one run's links ------------------------------------------------------------------------------
class LinkFleet:
    """Create and remove the namespaces, veths, qdiscs and cgroups of one run."""

    def __init__(self, tag: str) -> None:
        self.tag = tag[:6]
        self.bridge = f"ifl{self.tag}b"
        self.gateways: list[GatewayLink] = []
        self.relays: list[DelayRelay] = []

    def create(self, profiles: list[GatewayProfile]) -> list[GatewayLink]:
        if ip("-o", "addr", "show", "to", f"{SERVER_ADDRESS}/32", check=False).stdout.strip():
            raise OSError(f"{SERVER_ADDRESS} is taken: another shaped fleet is running on this machine; "
                          "wait for it to finish (one shaped fleet at a time) or use link=none")
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{SERVER_ADDRESS}/16", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for prof in profiles:
            gw = self._add_gateway(prof)
            self._shape(gw)
            gw.cgroups = make_cgroup(f"{PREFIX}{self.tag}-{prof.index}", prof.device)
        return self.gateways

    def _add_gateway(self, prof: GatewayProfile) -> GatewayLink:
        """Gateway ``prof.index``'s namespace, with its veth on the bridge and its address."""
        i = prof.index
        ns, dev = f"{PREFIX}{self.tag}-{i}", f"ifl{self.tag}g{i}"
        gw = GatewayLink(prof, ns, dev, gateway_address(i))
        self.gateways.append(gw)
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", dev, "master", self.bridge)
        ip("link", "set", dev, "up")
        ip("-n", ns, "addr", "add", f"{gw.address}/16", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        return gw

    @staticmethod
    def _shape(gw: GatewayLink) -> None:
        """Downlink on the host side of the veth; uplink and loss on eth0, as a compose gateway does."""
        link = gw.profile.link
        if link.shaped:
            shape(gw.host_dev, link.down)
            applied = apply_link(link, "eth0", netns=gw.netns)
            gw.loss_emulated = link.loss_pct == 0 or any(a.startswith("loss") for a in applied)

    def start_relays(self, superlink_port: int) -> None:
        """One delay relay per gateway on 10.77.0.1, forwarding to the SuperLink on loopback."""
        for gw in self.gateways:
            link = gw.profile.link
            relay = DelayRelay((SERVER_ADDRESS, 0), ("127.0.0.1", superlink_port), link.rtt_ms / 2000,
                               link.jitter_ms / 2000, seed=gw.profile.index)
            self.relays.append(relay)
            gw.relay_port = relay.port

    def counters(self) -> dict[int, dict[str, int]]:
        """Wire bytes so far per gateway index (its veth's counters; zeros once it is gone)."""
        return {gw.profile.index: gw.counters() for gw in self.gateways}

    def remove(self) -> None:
        for relay in self.relays:
            relay.close()
        for gw in self.gateways:
            for path in gw.cgroups:
                remove_cgroup(path)
            ip("netns", "del", gw.netns, check=False)  # takes its veth (and both qdiscs) with it
            ip("link", "del", gw.host_dev, check=False)
        ip("link", "del", self.bridge, check=False)
        # anything a half-finished create() left
        for name in project_objects()["netns"]:
            if _tag_of(name) == self.tag:
                ip("netns", "del", name, check=False)
        for cgroup in project_objects()["cgroups"]:
            if _tag_of(Path(cgroup).name) == self.tag:
                remove_cgroup(Path(cgroup))


# -- leftovers --------------------------------------------------------------------------------------
def project_objects() -> dict[str, list[str]]:
    """Namespaces, links and cgroups of this project present on the machine."""
    ns = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines()
          if line.startswith(PREFIX)]
    links = re.findall(r"^\d+: (ifl[0-9a-f]{6}[bg]\d*)[@:]", ip("-o", "link", "show", check=False).stdout, re.M)
    return {"netns": ns, "links": links, "cgroups": cgroups_named(PREFIX)}


def cleanup_stale(is_alive: Callable[[str], bool]) -> list[str]:
    """Remove the namespaces, links and cgroups of runs whose processes are all gone."""
    removed = []
    objs = project_objects()
    for name in objs["netns"]:
        tag = _tag_of(name)
        if tag and not is_alive(tag):
            ip("netns", "del", name, check=False)
            removed.append(name)
    for name in objs["links"]:
        tag = _tag_of(name)
        if tag and not is_alive(tag):
            ip("link", "del", name, check=False)
            removed.append(name)
    for path in objs["cgroups"]:
        tag = _tag_of(Path(path).name)
        if tag and not is_alive(tag):
            remove_cgroup(Path(path))
            removed.append(path)
    return removed
