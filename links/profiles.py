"""Link and device profiles of each gateway, the link-bound clock and the energy estimate.

A profile is one file of ``configs/link/`` (rate up/down in kbit/s, RTT, jitter, loss; radio
energy per byte and per connection) or ``configs/device/`` (CPU share, torch threads, memory;
power while training). The run's ``link`` and
``device`` groups are what every gateway gets; ``fleet.link_mix`` /
``fleet.device_mix`` split the fleet by shares (in gateway order: with
``{lte_m: 0.7, nb_iot: 0.3}`` and 10 gateways, 0-6 are LTE-M and 7-9 NB-IoT), and
``fleet.link_overrides`` / ``fleet.device_overrides`` name one gateway's profile.

:func:`link_bound` is compute + bytes over the link rates + the round trips the
messages need. :func:`link_time` is the clock of ``engine=sim`` (printed beside the
measured time on a shaped fleet too): the link bound plus what Flower's deployment
engine itself adds per exchange (:func:`flower_overhead`) plus outage waiting.
:func:`round_energy` estimates what one gateway's round costs in joules: the radio (bytes each
way and one connection per message exchange, from the link profile's constants) and the
compute (the device's power while training times its compute seconds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import yaml

from iiotfl.configs import CONFIG_DIR


class ProfileError(ValueError):
    """A link/device profile or mix that cannot work; one line with the fix."""


@dataclass(frozen=True)
class LinkProfile:
    name: str
    up_kbit: float | None = None  # None: unshaped
    down_kbit: float | None = None
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    idle_poll_s: float = 3.0  # longest wait between an idle gateway's pulls (Flower's own: 3 s)
    tx_uj_per_byte: float = 0.0  # radio energy per byte sent, µJ (0: not counted; sources in configs/link/)
    rx_uj_per_byte: float = 0.0  # per byte received, µJ
    connect_mj: float = 0.0      # per connection (wake-up, RRC set-up and release), mJ

    @property
    def shaped(self) -> bool:
        return self.name != "none"

    @property
    def up(self) -> float:
        """The uplink rate, kbit/s, of a shaped link."""
        if self.up_kbit is None:
            raise ProfileError(f"config: link profile {self.name!r} has no up_kbit; give it one (kbit/s)")
        return self.up_kbit

    @property
    def down(self) -> float:
        """The downlink rate, kbit/s, of a shaped link."""
        if self.down_kbit is None:
            raise ProfileError(f"config: link profile {self.name!r} has no down_kbit; give it one (kbit/s)")
        return self.down_kbit


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cpu_share: float | None = None
    torch_threads: int = 1
    memory_mb: int | None = None
    startup_s: float = 3.5  # start of one ClientApp process on one core (interpreter, flwr, torch)
    power_w: float = 0.0    # power drawn while training, W (0: not counted; sources in configs/device/)


@dataclass(frozen=True)
class GatewayProfile:
    index: int
    link: LinkProfile
    device: DeviceProfile

    @property
    def label(self) -> str:
        return f"{self.link.name}/{self.device.name}"

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "class": self.label, "link": asdict(self.link), "device": asdict(self.device)}


def _load(group: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ProfileError(f"config: {group} profile {name!r} does not exist; use one of {options}")
    return yaml.safe_load(path.read_text()) or {}


# The energy keys of a profile: each a number >= 0, 0 (the default of a file without it) = not counted.
LINK_ENERGY = {"tx_uj_per_byte": "microjoules per byte sent", "rx_uj_per_byte": "microjoules per byte received",
               "connect_mj": "millijoules per connection"}
DEVICE_ENERGY = {"power_w": "watts while training"}


def _energy_checked(prof: LinkProfile | DeviceProfile, what: str, keys: Mapping[str, str]) -> None:
    for key, unit in keys.items():
        value = getattr(prof, key)
        if not math.isfinite(value) or value < 0:
            raise ProfileError(f"config: {what} profile {prof.name!r}: {key}={value!r} is invalid; it must be a "
                               f"number >= 0 ({unit}; 0: not counted)")


def _link(values: Mapping[str, Any]) -> LinkProfile:
    name = str(values.get("name"))
    try:
        prof = LinkProfile(
            name=name,
            up_kbit=None if values.get("up_kbit") is None else float(values["up_kbit"]),
            down_kbit=None if values.get("down_kbit") is None else float(values["down_kbit"]),
            rtt_ms=float(values.get("rtt_ms") or 0), jitter_ms=float(values.get("jitter_ms") or 0),
            loss_pct=float(values.get("loss_pct") or 0), idle_poll_s=float(values.get("idle_poll_s") or 3.0),
            **{key: float(values.get(key) or 0) for key in LINK_ENERGY},
        )
    except (TypeError, ValueError):
        raise ProfileError(f"config: link profile {name!r} has a non-numeric value; rates, rtt, jitter, loss and "
                           "the energy figures are numbers") from None
    _energy_checked(prof, "link", LINK_ENERGY)
    if prof.shaped and not (prof.up_kbit and prof.down_kbit and prof.up_kbit > 0 and prof.down_kbit > 0):
        raise ProfileError(f"config: link profile {name!r} needs up_kbit and down_kbit > 0 (kbit/s)")
    if not 0.5 <= prof.idle_poll_s <= 600:
        raise ProfileError(f"config: link profile {name!r}: idle_poll_s from 0.5 to 600 (seconds) please")
    if prof.rtt_ms < 0 or prof.jitter_ms < 0 or not 0 <= prof.loss_pct < 100:
        raise ProfileError(f"config: link profile {name!r}: rtt_ms, jitter_ms >= 0 and loss_pct in [0, 100) please")
    return prof


def link_profile(name: str) -> LinkProfile:
    """The link profile ``configs/link/<name>.yaml``; ProfileError if it is missing or invalid."""
    return _link(_load("link", name))


def _device(values: Mapping[str, Any]) -> DeviceProfile:
    name = str(values.get("name"))
    try:
        prof = DeviceProfile(
            name=name,
            cpu_share=None if values.get("cpu_share") is None else float(values["cpu_share"]),
            torch_threads=int(values.get("torch_threads") or 1),
            memory_mb=None if values.get("memory_mb") is None else int(values["memory_mb"]),
            startup_s=float(values.get("startup_s", 3.5)),
            power_w=float(values.get("power_w") or 0),
        )
    except (TypeError, ValueError):
        raise ProfileError(f"config: device profile {name!r} has a non-numeric value") from None
    _energy_checked(prof, "device", DEVICE_ENERGY)
    if (prof.cpu_share is not None and prof.cpu_share <= 0) or (prof.memory_mb is not None and prof.memory_mb < 256):
        raise ProfileError(f"config: device profile {name!r}: cpu_share > 0 and memory_mb >= 256 (or null) please")
    return prof


def _split(mix: Mapping[str, Any] | None, default: str, n: int, what: str) -> list[str]:
    """Profile name per gateway index from shares (largest remainder, in mix order)."""
    if not mix:
        return [default] * n
    try:
        shares = {str(k): float(v) for k, v in mix.items()}
    except (TypeError, ValueError, AttributeError):
        raise ProfileError(f"config: fleet.{what}_mix must map profile names to shares, e.g. "
                           "{lte_m: 0.7, nb_iot: 0.3}") from None
    total = sum(shares.values())
    if total <= 0 or any(v < 0 for v in shares.values()):
        raise ProfileError(f"config: fleet.{what}_mix shares must be >= 0 and not all 0")
    exact = {k: v / total * n for k, v in shares.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return [name for name, c in counts.items() for _ in range(c)]


def _overrides(names: list[str], overrides: Mapping[Any, Any] | None, what: str) -> list[str]:
    for key, name in (overrides or {}).items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ProfileError(f"config: fleet.{what}_overrides key {key!r} is not a gateway index") from None
        if not 0 <= i < len(names):
            raise ProfileError(f"config: fleet.{what}_overrides names gateway {i}, but the fleet has "
                               f"0-{len(names) - 1}")
        names[i] = str(name)
    return names


def gateway_profiles(cfg: Mapping[str, Any]) -> list[GatewayProfile]:
    """The link and device profile of every gateway of the fleet, by index."""
    fleet = cfg["fleet"]
    n = int(fleet["gateways"])
    base_link, base_device = cfg.get("link") or {"name": "none"}, cfg.get("device") or {"name": "unlimited"}
    links = _overrides(_split(fleet.get("link_mix"), base_link["name"], n, "link"), fleet.get("link_overrides"), "link")
    devices = _overrides(
        _split(fleet.get("device_mix"), base_device["name"], n, "device"), fleet.get("device_overrides"), "device"
    )
    link_cache: dict[str, LinkProfile] = {base_link["name"]: _link(base_link)}
    device_cache: dict[str, DeviceProfile] = {base_device["name"]: _device(base_device)}
    out = []
    for i in range(n):
        if links[i] not in link_cache:
            link_cache[links[i]] = _link(_load("link", links[i]))
        if devices[i] not in device_cache:
            device_cache[devices[i]] = _device(_load("device", devices[i]))
        out.append(GatewayProfile(i, link_cache[links[i]], device_cache[devices[i]]))
    return out


# -- the link-bound clock ---------------------------------------------------------------
# Round trips of a train exchange on Flower's pull-based protocol (flwr 1.42): the SuperNode
# asks for a message, fetches each object of it (the message, its RecordDict, every record
# and array: one request each), confirms, then pushes the reply the same way.
EXCHANGE_RTTS = 4


def exchange_rtts(objects_down: int | None = None, objects_up: int | None = None) -> int:
    """Requests (round trips) of one exchange; without object counts, the minimum."""
    if objects_down is None or objects_up is None:
        return EXCHANGE_RTTS
    return 2 + int(objects_down) + 1 + int(objects_up)


def transfer_time(link: LinkProfile, bytes_down: float, bytes_up: float,
                  objects_down: int | None = None, objects_up: int | None = None) -> float:
    """Seconds to move the bytes over the link's rates, plus the exchange's round trips."""
    if not link.shaped:
        return 0.0
    return (bytes_down * 8 / (link.down * 1000) + bytes_up * 8 / (link.up * 1000)
            + exchange_rtts(objects_down, objects_up) * link.rtt_ms / 1000)


def link_bound(link: LinkProfile, compute_s: float, bytes_down: float, bytes_up: float,
               objects_down: int | None = None, objects_up: int | None = None) -> float:
    """Compute + bytes over the rates + round trips."""
    return compute_s + transfer_time(link, bytes_down, bytes_up, objects_down, objects_up)


# What the deployment adds to every train exchange (flwr 1.42 as a gateway runs it, compat/supernode.py):
# the SuperNode asks for a message 0.5 s after the last one, slowing down while it waits, which
# bench/runtime.py measured as 0.53-0.57 s of pull wait (half an interval of 1.1 s); a task's
# process start and its message coming through the SuperNode (device.startup_s); the SuperNode
# looks for the reply every 0.05 s and the ServerApp for replies every 0.1 s.
SUPERNODE_PULL_S = 1.1
SUPERNODE_RESULT_POLL_S = 0.05
SERVER_POLL_S = 0.1


def flower_overhead(device: DeviceProfile) -> float:
    share = min(device.cpu_share or 1.0, 1.0)
    return (SUPERNODE_PULL_S / 2 + device.startup_s / share + SUPERNODE_RESULT_POLL_S / 2
            + SERVER_POLL_S / 2)


def link_time(link: LinkProfile, device: DeviceProfile, compute_s: float, bytes_down: float, bytes_up: float,
              outage_wait_s: float = 0.0, measured_on_share: float | None = None,
              objects_down: int | None = None, objects_up: int | None = None) -> float:
    """Simulated round time of one gateway: compute (rescaled to the device's CPU share
    when it was measured on another), transfer and round trips, Flower's own overhead,
    and waiting for the link to come back from an outage."""
    return (link_bound(link, device_compute(device, compute_s, measured_on_share), bytes_down, bytes_up,
                       objects_down, objects_up)
            + flower_overhead(device) + outage_wait_s)


def device_compute(device: DeviceProfile, compute_s: float, measured_on_share: float | None = None) -> float:
    """Compute seconds on the device: as measured, or rescaled to its CPU share when they were measured on
    another (``engine=sim`` measures on whole cores of this machine)."""
    if measured_on_share is not None and device.cpu_share:
        return compute_s * measured_on_share / min(device.cpu_share, measured_on_share)
    return compute_s


# -- the energy estimate ----------------------------------------------------------------
def round_energy(link: LinkProfile, device: DeviceProfile, bytes_up: float, bytes_down: float,
                 exchanges: int, compute_s: float) -> dict[str, float]:
    """Estimated energy of one gateway's round, in joules; a pure function of the profiles' constants.

    ``radio_j`` = ``bytes_up`` x ``tx_uj_per_byte`` + ``bytes_down`` x ``rx_uj_per_byte`` + ``exchanges`` x
    ``connect_mj``: one connection per message exchange (the message down and its reply up), each paying the
    wake-up, RRC connection set-up and release the link's ``connect_mj`` stands for. ``compute_j`` =
    ``power_w`` x ``compute_s``. ``total_j`` is their sum. Not counted: idle listening, PSM/eDRX sleep between
    rounds, retransmissions other than those in the bytes given (pass the wire bytes where they were counted).
    """
    radio = ((bytes_up * link.tx_uj_per_byte + bytes_down * link.rx_uj_per_byte) / 1e6
             + exchanges * link.connect_mj / 1e3)
    compute = device.power_w * compute_s
    return {"radio_j": radio, "compute_j": compute, "total_j": radio + compute}
