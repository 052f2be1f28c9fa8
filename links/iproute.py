"""The two iproute2 commands the links are made with, ``ip`` and ``tc``: one line of stderr on failure."""

from __future__ import annotations

import subprocess


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS``; OSError with its stderr unless it succeeded or ``check`` is False."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def tc(*args: str) -> None:
    """``tc ARGS``; OSError with its stderr if it failed."""
    out = subprocess.run(["tc", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"tc {' '.join(args)}: {out.stderr.strip()}")
