"""Link shaping with the kernel's own tools: rate by ``tc tbf``, random loss by nftables.

* rate: a token bucket (TBF) at the profile's rate on an interface's egress (:func:`shape`),
  with a modem-sized buffer; with ``downlink`` an ingress policer (``matchall`` + ``police``)
  at the downlink rate (:func:`police`), for a gateway that shapes both ways on its own eth0.
* loss: nftables rules drop packets at random, both ways (:func:`drop_randomly`).
* delay and jitter: not here. ``sch_netem`` would do it, but this project's kernels lack it
  (``tc qdisc add dev lo root netem delay 1ms`` fails), so a per-gateway relay
  (``links/relay.py``) holds each chunk for half the RTT in each direction.

:func:`apply_link` is what both a compose gateway (``iiotfl gateway --link``, on its eth0) and
the local fleet (inside each gateway's namespace, ``links/namespaces.py``) apply, so a
container and a namespace get the same qdiscs and rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from iiotfl.links.iproute import tc
from iiotfl.links.profiles import LinkProfile

PROBE_PREFIX = "iiotfl-probe-"


def availability() -> str | None:
    """None if network namespaces and tc can be used here, else one line saying why not."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces and tc need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
    probe = f"{PROBE_PREFIX}{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` fails: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _burst(rate_kbit: float) -> int:
    return max(1600, int(rate_kbit * 1000 / 8 / 100))  # ~10 ms worth of bytes, at least one packet


def shape(dev: str, rate_kbit: float, netns: str | None = None) -> None:
    """Token bucket (TBF) at ``rate_kbit`` on ``dev``'s egress, with a modem-sized buffer."""
    pre = ["-n", netns] if netns else []
    tc(*pre, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit:.3f}kbit",
       "burst", str(_burst(rate_kbit)), "latency", "30s")


def police(dev: str, rate_kbit: float, netns: str | None = None) -> None:
    """Ingress policer at ``rate_kbit`` on ``dev`` (drops above the rate; needs cls_matchall, act_police)."""
    pre = ["-n", netns] if netns else []
    tc(*pre, "qdisc", "replace", "dev", dev, "handle", "ffff:", "ingress")
    tc(*pre, "filter", "replace", "dev", dev, "parent", "ffff:", "matchall", "action", "police",
       "rate", f"{rate_kbit:.3f}kbit", "burst", str(_burst(rate_kbit)), "drop")


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


def apply_link(link: LinkProfile, interface: str, netns: str | None = None, downlink: bool = False) -> list[str]:
    """Shape ``interface`` (in ``netns``, or here) for ``link``; returns what was applied."""
    if not link.shaped:
        return []
    done = [f"uplink tbf {link.up_kbit:g} kbit/s on {interface}"]
    shape(interface, link.up, netns=netns)
    if downlink:
        police(interface, link.down, netns=netns)
        done.append(f"downlink police {link.down_kbit:g} kbit/s on {interface}")
    if link.loss_pct > 0:
        if drop_randomly(netns, interface, link.loss_pct):
            done.append(f"loss {link.loss_pct:g}% (nftables)")
    return done
