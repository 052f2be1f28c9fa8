"""A warm ClientApp runtime: Flower's SuperExec whose executor forks each task from a process that
has already imported torch and the ClientApp.

flwr 1.42's SuperNode (``--isolation subprocess``) starts ``flower-superexec``, which starts one
``flwr-clientapp`` process per message: an interpreter, flwr, torch and the app, imported for every
message (seconds on a gateway's core). With ``--isolation process`` the SuperNode only serves its
Runtime API on loopback and leaves starting tasks to a SuperExec of ours. This module runs
Flower's own SuperExec loop (``run_superexec``) with :class:`ForkExecutor`: its ``launch`` forks
this pre-loaded process, and the child runs Flower's own ClientApp runner (``run_clientapp``) with
the task's token, which is what ``flwr-clientapp --token`` runs, then exits. Every message still
gets its own process, so a task that raises or is killed fails only that message; the gateway's
TLS, node key, link and byte counting stay with the SuperNode, which is unchanged.

Run as ``python -m iiotfl.compat.warm_clientapp --runtime-api-address HOST:PORT --parent-pid PID``
(``compat/supernode.py`` does, beside the SuperNode). Flower's own warm executors (flwr 1.42) are
for Kubernetes pods and other task types, not a ClientApp on a gateway.
``tests/unit/test_compat.py`` pins the Flower names used here.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import importlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.supercore.constant import TaskType
from flwr.supercore.exit import exit_handler
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supernode.runtime import run_clientapp as runner
from flwr.supernode.runtime.run_clientapp import run_clientapp

from iiotfl.compat.flower import TASK_PULL_ENV, prompt_object_pulls

# What every task imports, loaded once here (import only: no torch op runs before a fork, so no
# thread pool is forked half-way).
PRELOAD = ("numpy", "torch", "iiotfl.clients.app")
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own knob: how often the SuperExec asks for a task
POLL_S = "0.05"  # loopback only (the SuperNode's Runtime API); never on the link
# the message's objects, from the SuperNode, which may still be pulling them over the link
LOOPBACK_OBJECT_RETRY_S = (0.02, 0.2)


def _time_the_message_pull() -> None:
    """Record in this task's environment when Flower's runner pulled its message (TASK_PULL_ENV), so the
    round's time split tells the process's own start from waiting for the message to arrive."""
    pull = runner.pull_task_input

    def pull_task_input(client: Any) -> Any:
        began = time.time()
        found = pull(client)
        os.environ[TASK_PULL_ENV] = f"{began:.6f},{time.time():.6f}"
        return found

    runner.pull_task_input = pull_task_input


def _install_once(verified: Path) -> None:
    """Flower's runner installs the run's FAB for every message: unzip it, check every file's hash, and
    keep the copy already installed (it does not look at that copy again). A FAB that an earlier task
    of this runtime installed and checked (a marker named by its SHA-256 in ``verified``, a directory of
    this runtime's only) is not unzipped and checked again while its installed copy is there."""
    install = runner.install_from_fab

    def install_from_fab(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
        if not isinstance(fab_file, bytes):
            return install(fab_file, *args, **kwargs)
        marker = verified / hashlib.sha256(fab_file).hexdigest()
        try:
            if (done := Path(marker.read_text())).is_dir():
                return done
        except OSError:
            pass
        installed = install(fab_file, *args, **kwargs)
        if installed is not None:
            marker.write_text(str(installed))
        return installed

    runner.install_from_fab = install_from_fab  # Flower's, with the check remembered


def _child(spec: ExecutionSpec, certificates: bytes | None, verified: Path) -> None:
    """In the forked child: Flower's ClientApp runner for this task, then exit with its code."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        # the SuperExec's exit handlers (close its client, its executor) are not this task's
        exit_handler.registered_exit_handlers.clear()
        if spec.suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # as a fresh process would have: not the siblings' stream
        prompt_object_pulls(*LOOPBACK_OBJECT_RETRY_S)
        _time_the_message_pull()
        _install_once(verified)
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=certificates, parent_pid=spec.parent_pid,
                      runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as end:  # run_clientapp always ends with flwr_exit (sys.exit)
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child never returns into the SuperExec's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkExecutor:
    """Flower's Executor protocol (flwr.supercore.superexec.executor.types.Executor): a ClientApp task is a
    fork of this process; any other task type is started as Flower's subprocess executor starts it."""

    def __init__(self) -> None:
        self.children: dict[int, int] = {}  # pid -> task id
        self.cold = SubprocessExecutor()
        self.verified = Path(tempfile.mkdtemp(prefix="iiotfl-fab-"))  # 0700: FABs this runtime's tasks checked
        atexit.register(shutil.rmtree, self.verified, True)

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return self.cold.launch(spec)
        try:
            certificates = Path(spec.root_certificates_path).read_bytes() if spec.root_certificates_path else None
        except OSError as err:
            return LaunchResult.failed(f"Runtime API root certificates {spec.root_certificates_path}: {err}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(spec, certificates, self.verified)  # never returns
        self.children[pid] = spec.task_id
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the tasks that ended (their outcome reached the SuperNode through the Runtime API)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del self.children[pid]

    def close(self) -> None:
        """End running tasks with the SuperExec (the SuperNode marks them failed)."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import what every task imports; the names that could not be imported (the task imports them itself)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the task reports its own import error as Flower does
            missing.append(name)
    return missing


def serve(runtime_api_address: str, parent_pid: int | None, root_certificates: str | None = None,
          auth_secret: bytes | None = None) -> None:
    """Flower's SuperExec loop with :class:`ForkExecutor` (runs until the SuperNode ends)."""
    os.environ.setdefault(POLL_ENV, POLL_S)
    executor = ForkExecutor()

    def get_executor(*args: Any, **kwargs: Any) -> ForkExecutor:
        return executor

    superexec.get_executor = get_executor  # the one executor run_superexec takes
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=root_certificates is None,
                            root_certificates_path=root_certificates, parent_pid=parent_pid,
                            superexec_auth_secret=auth_secret)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m iiotfl.compat.warm_clientapp", description=__doc__.split("\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    p.add_argument("--parent-pid", type=int, help="end when this process (the SuperNode) ends")
    p.add_argument("--root-certificates", help="CA of a TLS Runtime API (default: loopback without TLS)")
    p.add_argument("--auth-secret-file", help="the SuperExec authentication secret the SuperNode was given "
                   "(--superexec-auth-secret-file)")
    args = p.parse_args(argv)
    missing = preload()
    if missing:
        print(f"iiotfl warm runtime: could not preload {', '.join(missing)}; each task imports them itself",
              file=sys.stderr)
    print(f"iiotfl warm runtime: ready, {', '.join(m for m in PRELOAD if m not in missing)} loaded; each message "
          "runs in a process forked from this one", file=sys.stderr, flush=True)
    secret = Path(args.auth_secret_file).read_bytes() if args.auth_secret_file else None
    serve(args.runtime_api_address, args.parent_pid, args.root_certificates, secret)


if __name__ == "__main__":
    main()
