"""``flower-supernode`` as a gateway runs it: prompt message exchange, a warm ClientApp runtime,
and a TLS client certificate for the fleet's front.

Run as ``python -m iiotfl.compat.supernode ARGS`` (the arguments of ``flower-supernode``); it starts
Flower's own SuperNode with three changes, each switched by the environment:

- **Prompt exchange** (always). flwr 1.42's SuperNode sleeps 3 s after every pull that brought no
  message and looks for a finished reply every 0.5 s, so a message waits up to 3 s to be pulled and a
  reply up to 0.5 s to be pushed. Here the wait after a pull that brought nothing starts at
  ``IIOTFL_POLL_MIN_S`` (0.5 s) after a message and grows by half each time up to ``IIOTFL_POLL_MAX_S``
  (3 s, Flower's own; a link profile's ``idle_poll_s`` can set more), so a gateway that has been idle a while
  polls no more often than Flower's does; the local wait for a reply is 0.05 s (no traffic).
  An object of a message that is not there yet is asked for again after 0.1 s, doubling to 1 s
  (Flower: 1 s to 10 s).
- **Warm ClientApp runtime** (``IIOTFL_CLIENTAPP_RUNTIME=warm``). The SuperNode runs with
  ``--isolation process`` and a SuperExec authentication secret, and this process starts
  ``compat/warm_clientapp.py`` beside it: Flower's SuperExec forking each task from a process that
  has torch and the ClientApp loaded. A watchdog starts it again if it dies.
- **Mutual TLS** (``IIOTFL_CLIENT_CERT``, ``IIOTFL_CLIENT_KEY``). flwr 1.42's SuperNode verifies the
  server but cannot present a client certificate; its Fleet API client's TLS context also holds
  this one (``ssl.SSLContext.load_cert_chain``).

``tests/unit/test_compat.py`` pins the Flower internals these rely on.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flwr.supernode.start_client_internal as loop
from flwr.supercore.protobuf.client import ProtobufClient
from flwr.supernode.cli import flower_supernode
from flwr.supernode.fleet_http_client import FleetHttpClient

from iiotfl.compat.flower import prompt_object_pulls

CERT_ENV, KEY_ENV = "IIOTFL_CLIENT_CERT", "IIOTFL_CLIENT_KEY"
RUNTIME_ENV = "IIOTFL_CLIENTAPP_RUNTIME"  # warm | cold (Flower's flwr-clientapp process per message)
POLL_MIN_ENV, POLL_MAX_ENV = "IIOTFL_POLL_MIN_S", "IIOTFL_POLL_MAX_S"
POLL_MIN_S, POLL_MAX_S, POLL_GROWTH = 0.5, 3.0, 1.5
# flwr 1.42's SuperNode loop (start_client_internal.py): time.sleep(3) after an empty pull,
# time.sleep(0.5) while it waits for a reply in its own state or object store
FLOWER_IDLE_S, FLOWER_LOCAL_POLL_S, LOCAL_POLL_S = 3, 0.5, 0.05
# an object of a message the SuperLink does not hold yet (the ServerApp still pushing it): asked for
# again after 0.1 s, doubling to 1 s (Flower: 1 s to 10 s); over the link, so not faster
LINK_OBJECT_RETRY_S = (0.1, 1.0)


def with_client_certificate(verify: Any, cert: str, key: str) -> ssl.SSLContext:
    """A client TLS context that verifies like ``verify`` (a context, a CA file or True) and presents ``cert``."""
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context()
    context.load_cert_chain(cert, key)
    return context


def use_client_certificate(cert: str, key: str) -> None:
    """Make the SuperNode's Fleet API client present ``cert`` (only over https, never to loopback apps)."""
    original = FleetHttpClient.__init__

    def init(self: ProtobufClient, base_url: str, *args: Any, verify: Any = True, **kwargs: Any) -> None:
        if base_url.startswith("https://") and verify is not False:
            verify = with_client_certificate(verify, cert, key)
        original(self, base_url, *args, verify=verify, **kwargs)

    FleetHttpClient.__init__ = init  # type: ignore[method-assign]


# -- prompt exchange ---------------------------------------------------------------------------
class Pacer:
    """The wait before the next pull after one that brought nothing: ``fastest`` after a message,
    growing by ``growth`` per empty pull to ``slowest``."""

    def __init__(self, fastest: float = POLL_MIN_S, slowest: float = POLL_MAX_S, growth: float = POLL_GROWTH) -> None:
        if not 0 < fastest <= slowest:
            raise ValueError(f"poll interval: need 0 < min ({fastest}) <= max ({slowest})")
        self.fastest, self.slowest, self.growth = fastest, slowest, growth
        self.next = slowest  # until the first message: Flower's own pace

    def busy(self) -> None:
        self.next = self.fastest

    def idle_wait(self) -> float:
        wait, self.next = self.next, min(self.next * self.growth, self.slowest)
        return wait


class PacedTime:
    """``time`` as the SuperNode loop sees it: its idle sleep paced, its local polls short."""

    def __init__(self, pacer: Pacer, sleep: Callable[[float], None] = time.sleep) -> None:
        self.pacer, self._sleep = pacer, sleep

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            seconds = self.pacer.idle_wait()
        elif seconds == FLOWER_LOCAL_POLL_S:
            seconds = LOCAL_POLL_S
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def pace_exchange(pacer: Pacer) -> None:
    """Install ``pacer`` in the SuperNode loop: a pull that brings a message makes it busy."""
    pull = loop._pull_and_store_message

    def pull_and_store(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pacer.busy()
        return run_id

    loop._pull_and_store_message = pull_and_store
    loop.time = PacedTime(pacer)  # type: ignore[assignment]


def env_pacer(env: dict[str, str] | os._Environ[str] = os.environ) -> Pacer:
    try:
        return Pacer(float(env.get(POLL_MIN_ENV, POLL_MIN_S)), float(env.get(POLL_MAX_ENV, POLL_MAX_S)))
    except ValueError as err:
        raise SystemExit(f"iiotfl supernode: {POLL_MIN_ENV}/{POLL_MAX_ENV}: {err}") from None


# -- warm ClientApp runtime --------------------------------------------------------------------
def option(argv: list[str], name: str, default: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


class WarmRuntime:
    """The warm SuperExec (compat/warm_clientapp.py) beside this SuperNode, restarted if it dies."""

    RESTART_S = 1.0

    def __init__(self, runtime_api_address: str, secret_file: Path) -> None:
        self.argv = [sys.executable, "-m", "iiotfl.compat.warm_clientapp", "--runtime-api-address",
                     runtime_api_address, "--parent-pid", str(os.getpid()), "--auth-secret-file", str(secret_file)]
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv)
        threading.Thread(target=self._watch, daemon=True, name="warm-runtime-watchdog").start()
        atexit.register(self.stop)

    def _watch(self) -> None:
        while not self.stopping:
            assert self.proc is not None
            code = self.proc.wait()
            if self.stopping:
                return
            print(f"iiotfl supernode: the warm ClientApp runtime exited with code {code}; starting it again",
                  file=sys.stderr, flush=True)
            time.sleep(self.RESTART_S)
            self.proc = subprocess.Popen(self.argv)

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


RUNTIME_DIR_PREFIX = "iiotfl-runtime-"


def sweep_runtime_dirs(tmp: Path | None = None) -> None:
    """Remove the secret directories of SuperNodes that are gone (a SuperNode killed with its process
    group never runs its exit handlers); each is named after its SuperNode's pid."""
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{RUNTIME_DIR_PREFIX}*"):
        pid = d.name.removeprefix(RUNTIME_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def warm_runtime(argv: list[str]) -> list[str]:
    """Start the warm runtime for the SuperNode about to run with ``argv``; the SuperNode's argv."""
    if option(argv, "--isolation", "subprocess") != "subprocess":
        raise SystemExit("iiotfl supernode: the warm ClientApp runtime starts its own tasks; drop --isolation")
    host, port = option(argv, "--host", "127.0.0.1"), option(argv, "--port", "9094")
    sweep_runtime_dirs()
    private = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_DIR_PREFIX}{os.getpid()}-"))  # 0700
    atexit.register(shutil.rmtree, private, True)
    secret = private / "superexec.secret"
    secret.write_bytes(secrets.token_bytes(32))  # only our SuperExec may acquire this SuperNode's tasks
    secret.chmod(0o600)
    WarmRuntime(f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}", secret).start()
    return [*argv, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]


def main() -> None:
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if cert and key:
        use_client_certificate(cert, key)
    pace_exchange(env_pacer())
    prompt_object_pulls(*LINK_OBJECT_RETRY_S)
    argv = sys.argv[1:]
    runtime = os.environ.get(RUNTIME_ENV, "cold")
    if runtime not in ("warm", "cold"):
        raise SystemExit(f"iiotfl supernode: {RUNTIME_ENV}={runtime!r}; use warm or cold")
    if runtime == "warm":
        argv = warm_runtime(argv)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
