"""Emulated plant links: a network namespace per gateway, shaped with tc, on 10.77.0.0/16.

Topology of one run (``<t>`` = first 6 hex digits of the run tag)::

    root namespace                               namespace iiotfl-<t>-<i>
    bridge ifl<t>b  10.77.0.1/16  <-- SuperLink
      └─ veth ifl<t>g<i>  ================  eth0  10.77.<(i+2)//256>.<(i+2)%256>/16

* rate: downlink (server -> gateway) is shaped on the egress of ``ifl<t>g<i>`` (host
  side), uplink (gateway -> server) on the egress of ``eth0`` inside the namespace,
  each a token bucket (TBF) at the profile's rate. Wire bytes per gateway are the host-side
  veth counters.
* loss: nftables rules inside the namespace drop packets at random, both ways.
* delay and jitter: ``sch_netem`` would do it, but this project's kernel lacks it
  (:func:`has_netem`), so a per-gateway relay (``links/relay.py``) holds each chunk
  for half the RTT in each direction.
* device profile: a cgroup (v1 ``cpu`` and ``memory`` controllers, or v2) per gateway,
  ``iiotfl-<t>-<i>``, with the CPU quota and memory limit; the SuperNode and every
  process it spawns (SuperExec, ClientApps) live in it.
* outage: the veth is set down and up again.

Everything is named after the run tag, so :func:`cleanup_stale` removes what a crashed
run left (its tag has no live process any more) and :meth:`LinkFleet.remove` what this
run made, on every exit path. Only addresses inside 10.77.0.0/16 are used, and only on
interfaces created here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from iiotfl.links.profiles import DeviceProfile, GatewayProfile, LinkProfile

SUBNET = "10.77.0.0/16"
SERVER_ADDRESS = "10.77.0.1"
PREFIX = "iiotfl-"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def gateway_address(index: int) -> str:
    host = index + 2
    if host >= 256 * 256 - 1:
        raise ValueError("10.77.0.0/16 holds at most 65532 gateways")
    return f"10.77.{host // 256}.{host % 256}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def _tc(*args: str) -> None:
    out = subprocess.run(["tc", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"tc {' '.join(args)}: {out.stderr.strip()}")


def availability() -> str | None:
    """None if namespaces and tc can be used here, else one line saying why not."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces and tc need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` fails: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def shape(dev: str, rate_kbit: float, netns: str | None = None) -> None:
    """Token bucket (TBF) at ``rate_kbit`` on ``dev``'s egress, with a modem-sized buffer."""
    pre = ["-n", netns] if netns else []
    burst = max(1600, int(rate_kbit * 1000 / 8 / 100))  # ~10 ms worth of bytes, at least one packet
    _tc(*pre, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit:.3f}kbit",
        "burst", str(burst), "latency", "30s")


def has_netem() -> bool:
    """Whether the kernel offers ``sch_netem`` (this project's machines do not: see relay.py)."""
    probe = f"{PREFIX}netem-{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    try:
        out = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                             capture_output=True)
        return out.returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


def drop_randomly(netns: str | None, dev: str, loss_pct: float) -> bool:
    """Random packet loss both ways on ``dev`` inside ``netns`` (None: here) with nftables; False if nft is missing."""
    if shutil.which("nft") is None:
        return False
    threshold = int(round(loss_pct / 100 * 1_000_000))
    rules = (
        "table inet iiotfl_loss {\n"
        " chain out { type filter hook output priority 0; policy accept;"
        f" oifname \"{dev}\" numgen random mod 1000000 < {threshold} drop; }}\n"
        " chain in { type filter hook input priority 0; policy accept;"
        f" iifname \"{dev}\" numgen random mod 1000000 < {threshold} drop; }}\n"
        "}\n"
    )
    pre = ["ip", "netns", "exec", netns] if netns else []
    out = subprocess.run([*pre, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"nft in {netns or 'this namespace'}: {out.stderr.strip()}")
    return True


# -- cgroups (v1 cpu+memory controllers, or a v2 unified hierarchy) -----------------------
def _cgroup_dirs(name: str) -> list[tuple[str, Path]]:
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [("v2", CGROUP_ROOT / name)]
    dirs = []
    for ctl in ("cpu", "memory"):
        if (CGROUP_ROOT / ctl).is_dir():
            dirs.append((ctl, CGROUP_ROOT / ctl / name))
    return dirs


def make_cgroup(name: str, device: DeviceProfile) -> list[Path]:
    made = []
    for kind, path in _cgroup_dirs(name):
        path.mkdir(exist_ok=True)
        made.append(path)
        if kind == "v2":
            if device.cpu_share:
                (path / "cpu.max").write_text(f"{int(device.cpu_share * 100000)} 100000")
            if device.memory_mb:
                (path / "memory.max").write_text(str(device.memory_mb * 2**20))
        elif kind == "cpu" and device.cpu_share:
            (path / "cpu.cfs_period_us").write_text("100000")
            (path / "cpu.cfs_quota_us").write_text(str(int(device.cpu_share * 100000)))
        elif kind == "memory" and device.memory_mb:
            (path / "memory.limit_in_bytes").write_text(str(device.memory_mb * 2**20))
    return made


def remove_cgroup(path: Path) -> None:
    if not path.exists():
        return
    procs = path / "cgroup.procs"
    parent_procs = path.parent / "cgroup.procs"
    try:
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
            try:
                parent_procs.write_text(pid)
            except OSError:
                pass
    except OSError:
        pass
    try:
        path.rmdir()
    except OSError:
        pass


# -- leftovers ----------------------------------------------------------------------------
def project_objects() -> dict[str, list[str]]:
    """Namespaces, links and cgroups of this project present on the machine."""
    ns = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
          if line.startswith(PREFIX)]
    links = re.findall(r"^\d+: (ifl[0-9a-f]{6}[bg]\d*)[@:]", _ip("-o", "link", "show", check=False).stdout, re.M)
    groups = []
    for kind in ("", "cpu", "memory"):
        base = CGROUP_ROOT / kind if kind else CGROUP_ROOT
        if base.is_dir():
            groups += [str(p) for p in base.glob(f"{PREFIX}*") if p.is_dir()]
    return {"netns": ns, "links": links, "cgroups": groups}


def _tag_of(name: str) -> str | None:
    m = re.search(r"(?:iiotfl-|ifl)([0-9a-f]{6})", name)
    return m.group(1) if m else None


def cleanup_stale(is_alive: Callable[[str], bool]) -> list[str]:
    """Remove the namespaces, links and cgroups of runs whose processes are all gone."""
    removed = []
    objs = project_objects()
    for name in objs["netns"]:
        tag = _tag_of(name)
        if tag and not is_alive(tag):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for name in objs["links"]:
        tag = _tag_of(name)
        if tag and not is_alive(tag):
            _ip("link", "del", name, check=False)
            removed.append(name)
    for path in objs["cgroups"]:
        tag = _tag_of(Path(path).name)
        if tag and not is_alive(tag):
            remove_cgroup(Path(path))
            removed.append(path)
    return removed


# -- one run's links ----------------------------------------------------------------------
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
        _ip("link", "set", "dev", self.host_dev, "up" if up else "down", check=False)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this gateway's cgroups and namespace."""
        join = "; ".join(f"echo $$ > {p}/cgroup.procs" for p in self.cgroups)
        prefix = ["sh", "-c", f'{join}; exec "$@"', "sh"] if join else []
        return [*prefix, "ip", "netns", "exec", self.netns, *argv]


class LinkFleet:
    """Create and remove the namespaces, veths, qdiscs and cgroups of one run."""

    def __init__(self, tag: str) -> None:
        self.tag = tag[:6]
        self.bridge = f"ifl{self.tag}b"
        self.gateways: list[GatewayLink] = []
        self.relays: list = []

    def create(self, profiles: list[GatewayProfile]) -> list[GatewayLink]:
        if _ip("-o", "addr", "show", "to", f"{SERVER_ADDRESS}/32", check=False).stdout.strip():
            raise OSError(f"{SERVER_ADDRESS} is taken: another shaped fleet is running on this machine; "
                          "wait for it to finish (one shaped fleet at a time) or use link=none")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{SERVER_ADDRESS}/16", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for prof in profiles:
            i = prof.index
            ns, dev = f"{PREFIX}{self.tag}-{i}", f"ifl{self.tag}g{i}"
            gw = GatewayLink(prof, ns, dev, gateway_address(i))
            self.gateways.append(gw)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", dev, "master", self.bridge)
            _ip("link", "set", dev, "up")
            _ip("-n", ns, "addr", "add", f"{gw.address}/16", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            link: LinkProfile = prof.link
            if link.shaped:
                from iiotfl.clients.gateway import apply_link  # what a compose gateway applies to its own eth0

                shape(dev, link.down_kbit)  # downlink on the host side of the veth
                applied = apply_link(link, "eth0", netns=ns)
                gw.loss_emulated = link.loss_pct == 0 or any(a.startswith("loss") for a in applied)
            gw.cgroups = make_cgroup(f"{PREFIX}{self.tag}-{i}", prof.device)
        return self.gateways

    def start_relays(self, superlink_port: int) -> None:
        """One delay relay per gateway on 10.77.0.1, forwarding to the SuperLink on loopback."""
        from iiotfl.links.relay import DelayRelay

        for gw in self.gateways:
            link = gw.profile.link
            relay = DelayRelay((SERVER_ADDRESS, 0), ("127.0.0.1", superlink_port), link.rtt_ms / 2000,
                               link.jitter_ms / 2000, seed=gw.profile.index)
            self.relays.append(relay)
            gw.relay_port = relay.port

    def remove(self) -> None:
        for relay in self.relays:
            relay.close()
        for gw in self.gateways:
            for path in gw.cgroups:
                remove_cgroup(path)
            _ip("netns", "del", gw.netns, check=False)  # takes its veth (and both qdiscs) with it
            _ip("link", "del", gw.host_dev, check=False)
        _ip("link", "del", self.bridge, check=False)
        # anything a half-finished create() left
        for name in project_objects()["netns"]:
            if _tag_of(name) == self.tag:
                _ip("netns", "del", name, check=False)
        for path in project_objects()["cgroups"]:
            if _tag_of(Path(path).name) == self.tag:
                remove_cgroup(Path(path))
