"""A real mosquitto broker for tests: on 127.0.0.1, a free port, its config, data and log in a temp dir."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def have_mosquitto() -> bool:
    return Path(MOSQUITTO).is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, up: bool = True, timeout: float = 10.0) -> None:
    """Until 127.0.0.1:port accepts connections (``up``) or refuses them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.02)
    raise TimeoutError(f"127.0.0.1:{port} did not {'open' if up else 'close'} within {timeout} s")


class Mosquitto:
    """``start()`` / ``stop()`` (SIGTERM: a persistent broker saves its sessions) / ``kill()``; the
    same port and persistence directory across restarts. ``extra`` lines go into the listener's config."""

    def __init__(self, directory: Path, port: int | None = None, persistence: bool = True,
                 extra: list[str] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", *(extra or []),
                 "allow_anonymous true" if not any(x.startswith("password_file") for x in extra or []) else "",
                 f"persistence {'true' if persistence else 'false'}", f"persistence_location {self.dir}/",
                 "autosave_interval 0", "max_queued_messages 100000", f"log_dest file {self.log}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        self.conf.write_text("\n".join(x for x in lines if x) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"mosquitto did not start: {self.log_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        """SIGTERM and wait: the broker writes its persistent state (sessions, queued messages)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
