"""Process management in one place: spawn with a tag, stop with a grace period, read /proc.

Contract:

* **Spawn** (:func:`spawn`): every process starts as the leader of its own session (and so of
  its own process group), with this interpreter's ``bin/`` first on ``PATH`` (:func:`bin_env`),
  its output appended to a log file or handed back as a text pipe.
* **Tag** (:func:`tag_env`): a launcher gives every process of a run ``IIOTFL_RUN=<tag>`` and
  ``IIOTFL_LAUNCHER=<pid>:<start ticks>`` in its environment. Children inherit it, so the
  run's processes are found by environment (:func:`processes_with_env`), whoever started them.
* **Stop**: :func:`stop_group` ends one process group (SIGTERM, a grace period, then SIGKILL)
  and signals the group before it reaps the leader: while the leader is an unreaped zombie its
  pid, which is the group id, cannot be reused, so a signal never hits a stranger.
  :func:`stop_run` does the same for every process carrying a run's tag.
* **/proc**: live (not zombie) processes by environment entry, start ticks, command lines,
  whether a group still has a live member, whether a tagged run's launcher still lives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr and iiotfl live beside python
RUN_VAR = "IIOTFL_RUN"
LAUNCHER_VAR = "IIOTFL_LAUNCHER"
PROC = Path("/proc")


# -- reading /proc -------------------------------------------------------------------------------
def _pids() -> Iterator[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ... (OSError if gone)."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _environ(pid: int) -> bytes:
    """``\\0KEY=value\\0KEY=value...`` of ``pid`` (OSError if gone or not ours).

    Its command line's words are added: a program that writes its process title over its
    environment (nginx) carries the run's tag as words of its command line instead
    (``server/launch/front.py``)."""
    environ = (PROC / str(pid) / "environ").read_bytes()
    argv = (PROC / str(pid) / "cmdline").read_bytes()
    return b"\0" + environ + b"\0" + argv.replace(b" ", b"\0") + b"\0"


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs of live (not zombie) processes, other than this one, whose environment has ``key=value``."""
    needle = b"\0" + f"{key}={value}".encode() + b"\0"
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            if needle in _environ(pid) and _stat(pid)[0] != "Z":
                found.append(pid)
        except OSError:
            continue
    return found


def start_ticks(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), which tells a process from a later one with its pid."""
    try:
        return _stat(pid)[19]
    except (OSError, IndexError):
        return None


def started_at(pid: int | str = "self") -> float:
    """Wall-clock time ``pid`` (default: this process) was created; now if /proc cannot tell."""
    try:
        ticks = int(_stat(pid)[19])
        uptime = float((PROC / "uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def cmdline(pid: int) -> bytes | None:
    """``pid``'s argv, NUL-separated (None: gone)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` other than its (zombie) leader still runs."""
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def leader_exited(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` ended, without reaping it: while it is a zombie its pid (its group id) is not reused."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


# -- tags ----------------------------------------------------------------------------------------
def launcher_id() -> str:
    """``pid:start-time`` of this process, so a later run can tell whether it still lives."""
    return f"{os.getpid()}:{start_ticks(os.getpid())}"


# Flower's telemetry and update check post to flower.ai from every process (each ClientApp waits up to
# 4 s for it when it exits): off, so nothing leaves a plant but the Fleet API traffic it chose.
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def bin_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with this interpreter's bin/ first on PATH, and Flower's
    telemetry and update check off (:data:`QUIET_FLOWER`)."""
    env = dict(os.environ if base is None else base)
    return {**env, **QUIET_FLOWER, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def tag_env(tag: str) -> dict[str, str]:
    """The environment entries that mark a process (and its children) as run ``tag``'s."""
    return {RUN_VAR: tag, LAUNCHER_VAR: launcher_id()}


def run_pids(tag: str) -> list[int]:
    """Live processes of run ``tag``."""
    return processes_with_env(RUN_VAR, tag)


def run_processes(tag: str, match: Callable[[bytes], bool]) -> list[int]:
    """PIDs of run ``tag``'s processes whose command line ``match`` accepts."""
    return [pid for pid in run_pids(tag) if (argv := cmdline(pid)) is not None and match(argv)]


def run_alive(tag_prefix: str) -> bool:
    """Whether the run whose tag starts with ``tag_prefix`` is still going.

    Its processes carry ``IIOTFL_RUN=<tag>`` and ``IIOTFL_LAUNCHER=<pid:start>``. A run
    whose launcher died (``kill -9``, a crash) leaves orphans: they are ended here and
    the run counts as gone, so its namespaces and cgroups can be removed.
    """
    needle = f"\0{RUN_VAR}={tag_prefix}".encode()
    launcher = re.compile(rb"\0" + LAUNCHER_VAR.encode() + rb"=(\d+):(\d+)")
    orphans, alive = [], False
    for pid in _pids():
        try:
            environ = _environ(pid)
        except OSError:
            continue
        if needle not in environ:
            continue
        m = launcher.search(environ)
        if m and start_ticks(int(m.group(1))) == m.group(2).decode():
            alive = True
        else:
            orphans.append(pid)
    if not alive:
        for pid in orphans:  # a group leader (nginx's master) with its unmarked members
            kill(pid, signal.SIGKILL, group=True)
    return alive


# -- spawning and stopping -----------------------------------------------------------------------
def spawn(argv: list[str], env: Mapping[str, str], *, log: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` as a new session's leader: output appended to ``log`` (stdin closed), or
    without ``log`` as a text pipe on ``proc.stdout`` (stderr folded in, stdin inherited)."""
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=dict(env), cwd=cwd)
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, start_new_session=True)


def kill(pid: int, sig: int, *, group: bool = False) -> None:
    """Signal ``pid`` (with ``group``: first the process group it leads, if it leads one); a process
    that is gone or not ours is no error."""
    for send in (os.killpg, os.kill) if group else (os.kill,):
        try:
            send(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """End ``proc``'s process group (SIGTERM, up to ``grace`` s, SIGKILL), then reap ``proc``; its exit code.

    The group is signalled while its leader is not reaped yet, so its id is never someone else's."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.1)
        if not group_alive(proc.pid):
            break
    return proc.wait()


def stop_run(tag: str, procs: Iterable[subprocess.Popen], grace: float = 5.0) -> None:
    """End every process of run ``tag`` (found by its tag) and ``procs``, groups included: SIGTERM,
    up to ``grace`` s, then SIGKILL; the ``procs`` are polled meanwhile and reaped at the end."""
    procs = list(procs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = set(run_pids(tag))
        pids.update(p.pid for p in procs if p.poll() is None)
        for pid in pids:
            kill(pid, sig, group=True)
        deadline = time.time() + grace
        while time.time() < deadline and run_pids(tag):
            for p in procs:
                p.poll()
            time.sleep(0.1)
        if not run_pids(tag):
            break
    for p in procs:
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
