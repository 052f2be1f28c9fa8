"""Device profiles as cgroups: a CPU quota and a memory limit per gateway.

One cgroup per gateway, ``iiotfl-<t>-<i>`` (``<t>``: the run tag's first 6 hex digits), under
the v1 ``cpu`` and ``memory`` controllers or in a v2 unified hierarchy. The SuperNode and every
process it spawns (SuperExec, ClientApps) live in it (``GatewayLink.wrap`` puts them there).
A device's ``cpu_share`` of 0.5 is half a core (``cfs_quota_us`` / ``cpu.max`` of 50 ms per
100 ms); ``memory_mb`` is a hard limit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from iiotfl.links.profiles import DeviceProfile

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100000


def cgroup_dirs(name: str) -> list[tuple[str, Path]]:
    """(controller, directory) of cgroup ``name``: ``("v2", ...)`` alone, or v1's cpu and memory."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [("v2", CGROUP_ROOT / name)]
    dirs = []
    for ctl in ("cpu", "memory"):
        if (CGROUP_ROOT / ctl).is_dir():
            dirs.append((ctl, CGROUP_ROOT / ctl / name))
    return dirs


def _limit(kind: str, path: Path, device: DeviceProfile) -> None:
    if kind == "v2":
        if device.cpu_share:
            (path / "cpu.max").write_text(f"{int(device.cpu_share * PERIOD_US)} {PERIOD_US}")
        if device.memory_mb:
            (path / "memory.max").write_text(str(device.memory_mb * 2**20))
    elif kind == "cpu" and device.cpu_share:
        (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(int(device.cpu_share * PERIOD_US)))
    elif kind == "memory" and device.memory_mb:
        (path / "memory.limit_in_bytes").write_text(str(device.memory_mb * 2**20))


def make_cgroup(name: str, device: DeviceProfile) -> list[Path]:
    """Cgroup ``name`` with ``device``'s limits; its directories (one per controller)."""
    made = []
    for kind, path in cgroup_dirs(name):
        path.mkdir(exist_ok=True)
        made.append(path)
        _limit(kind, path, device)
    return made


def cgroups_named(prefix: str) -> list[str]:
    """Directories of the cgroups whose name starts with ``prefix``, in any hierarchy."""
    groups = []
    for kind in ("", "cpu", "memory"):
        base = CGROUP_ROOT / kind if kind else CGROUP_ROOT
        if base.is_dir():
            groups += [str(p) for p in base.glob(f"{prefix}*") if p.is_dir()]
    return groups


def remove_cgroup(path: Path) -> None:
    """Kill what still runs in cgroup ``path``, move it to the parent, remove the cgroup; never raises."""
    if not path.exists():
        return
    procs = path / "cgroup.procs"
    parent_procs = path.parent / "cgroup.procs"
    try:
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
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
