"""Prompt exchange and the warm ClientApp runtime (compat/supernode.py, compat/warm_clientapp.py): the
Flower internals they rely on are pinned here, and the fork executor runs real forks."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.exit import exit_handler
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import ExecutionSpec
from flwr.supercore.superexec.executor.types import Executor
from flwr.supernode import start_client_internal as loop
from flwr.supernode.runtime import run_clientapp as runner

from iiotfl.compat import supernode, warm_clientapp
from iiotfl.compat.flower import TASK_PULL_ENV, prompt_object_pulls


# -- pins: fail with the name that moved when the pinned flwr changes ---------------------------------------
def test_the_supernode_loop_still_sleeps_as_compat_supernode_expects():
    body = inspect.getsource(loop.start_client_internal)
    assert f"time.sleep({supernode.FLOWER_IDLE_S})" in body, "the SuperNode's idle sleep after an empty pull moved"
    assert "_pull_and_store_message(" in body and "_push_messages(" in body
    assert f"time.sleep({supernode.FLOWER_LOCAL_POLL_S})" in inspect.getsource(loop._push_messages)
    assert loop.time is time or isinstance(loop.time, supernode.PacedTime)


def test_the_clientapp_runner_and_the_superexec_take_what_the_warm_runtime_passes():
    params = inspect.signature(runner.run_clientapp).parameters
    assert list(params)[:6] == ["runtime_api_address", "token", "insecure", "certificates", "parent_pid",
                                "runtime_dependency_install"]
    sx = inspect.signature(superexec.run_superexec).parameters
    assert {"runtime_api_address", "insecure", "root_certificates_path", "parent_pid", "superexec_auth_secret"} <= set(sx)
    assert "get_executor(" in inspect.getsource(superexec.run_superexec)  # looked up by name: replaceable
    assert isinstance(exit_handler.registered_exit_handlers, list)
    for name in ("get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"):
        ours, theirs = inspect.signature(getattr(warm_clientapp.ForkExecutor, name)), inspect.signature(getattr(Executor, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_object_pull_retries_are_set_and_flower_still_passes_them_down():
    saved = dict(inflatable_utils.pull_objects.__kwdefaults__), dict(
        inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__)
    try:
        prompt_object_pulls(0.05, 0.5)
        for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
            assert fn.__kwdefaults__["initial_backoff"] == 0.05 and fn.__kwdefaults__["backoff_cap"] == 0.5
        src = inspect.getsource(inflatable_utils.pull_and_inflate_object_from_tree)
        assert "initial_backoff=initial_backoff" in src and "backoff_cap=backoff_cap" in src
    finally:
        inflatable_utils.pull_objects.__kwdefaults__.update(saved[0])
        inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__.update(saved[1])


# -- prompt exchange ------------------------------------------------------------------------------------------
def test_the_pacer_is_quick_after_a_message_and_slows_to_flowers_pace_when_idle():
    pacer = supernode.Pacer(0.5, 3.0)
    assert pacer.idle_wait() == 3.0  # before any message: Flower's own pace
    pacer.busy()
    waits = [pacer.idle_wait() for _ in range(8)]
    assert waits[0] == 0.5 and waits == sorted(waits) and waits[-1] == 3.0
    pacer.busy()
    assert pacer.idle_wait() == 0.5
    with pytest.raises(ValueError):
        supernode.Pacer(2.0, 1.0)


def test_paced_time_replaces_only_the_supernodes_own_sleeps():
    slept: list[float] = []
    pacer = supernode.Pacer(0.5, 10.0)
    paced = supernode.PacedTime(pacer, slept.append)
    pacer.busy()
    paced.sleep(3)
    paced.sleep(3)
    paced.sleep(0.5)
    paced.sleep(1.25)
    assert slept == [0.5, 0.75, supernode.LOCAL_POLL_S, 1.25]
    assert paced.monotonic() <= time.monotonic()  # the rest of `time` is time's


def test_a_pulled_message_makes_the_loop_quick(monkeypatch):
    pulls = iter([None, 42, None])
    monkeypatch.setattr(loop, "_pull_and_store_message", lambda **_: next(pulls))
    monkeypatch.setattr(loop, "time", time)
    pacer = supernode.Pacer(0.5, 3.0)
    supernode.pace_exchange(pacer)
    assert loop._pull_and_store_message() is None and pacer.next == 3.0
    assert loop._pull_and_store_message() == 42 and pacer.next == 0.5
    assert isinstance(loop.time, supernode.PacedTime)


def test_the_warm_runtime_runs_the_supernode_in_process_isolation_with_a_secret(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(supernode.WarmRuntime, "start", lambda self: started.append(self.argv))
    monkeypatch.setattr(supernode.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.setattr(supernode, "sweep_runtime_dirs", lambda: None)
    argv = supernode.warm_runtime(["--superlink", "x:1", "--host", "127.0.0.1", "--port", "9555"])
    assert argv[-4:-2] == ["--isolation", "process"] and argv[-2] == "--superexec-auth-secret-file"
    secret = tmp_path / "superexec.secret"
    assert argv[-1] == str(secret) and len(secret.read_bytes()) == 32 and (secret.stat().st_mode & 0o077) == 0
    assert started[0][started[0].index("--runtime-api-address") + 1] == "127.0.0.1:9555"
    with pytest.raises(SystemExit, match="drop --isolation"):
        supernode.warm_runtime(["--isolation", "process"])


# -- the fork executor: real forks -----------------------------------------------------------------------------
def _spec(task_id: int = 1, task_type: TaskType = TaskType.CLIENT_APP) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="t" * 8, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=True, task_id=task_id)


@pytest.mark.parametrize("outcome, code", [("return", 0), ("exit", 7), ("raise", 1)])
def test_each_task_is_a_fork_that_ends_with_its_own_code_and_leaves_the_runtime_alone(tmp_path, monkeypatch,
                                                                                      outcome, code):
    marker = tmp_path / "child"
    calls = []

    def fake_run_clientapp(**kwargs):
        runner.pull_task_input(None)  # as Flower's runner does first: the warm runtime times it
        marker.write_text(f"{os.getpid()} {kwargs['token']} {len(exit_handler.registered_exit_handlers)} "
                          f"{os.environ[TASK_PULL_ENV]}")
        if outcome == "exit":
            sys.exit(7)
        if outcome == "raise":
            raise RuntimeError("the task failed")

    monkeypatch.setattr(warm_clientapp, "run_clientapp", fake_run_clientapp)
    monkeypatch.setattr(runner, "pull_task_input", lambda client: time.sleep(0.05))
    monkeypatch.delenv(TASK_PULL_ENV, raising=False)
    monkeypatch.setattr(warm_clientapp, "prompt_object_pulls", lambda *a: None)
    monkeypatch.setattr(exit_handler, "registered_exit_handlers", [lambda: calls.append("closed")])
    executor = warm_clientapp.ForkExecutor()
    result = executor.launch(_spec())
    assert result.status == "accepted"
    (pid, task), = executor.children.items()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == code
    child_pid, token, handlers, pulled = marker.read_text().split()
    began, ended = map(float, pulled.split(","))
    assert 0.05 <= ended - began < 5 and TASK_PULL_ENV not in os.environ  # set in the task's process only
    assert int(child_pid) == pid != os.getpid() and token == "t" * 8
    assert handlers == "0"  # the SuperExec's exit handlers are not the task's
    assert calls == [] and task == 1
    executor.reconcile()
    assert executor.children == {}


def test_other_task_types_start_as_flower_starts_them(monkeypatch):
    seen = []
    executor = warm_clientapp.ForkExecutor()
    monkeypatch.setattr(executor.cold, "launch", lambda spec: seen.append(spec.task_type) or "cold")
    assert executor.launch(_spec(task_type=TaskType.SERVER_APP)) == "cold" and seen == [TaskType.SERVER_APP]
    assert executor.children == {}


def test_the_time_split_tells_the_process_start_from_waiting_for_the_message():
    from iiotfl.server.roundlog import RoundLog
    from iiotfl.strategies import wire

    warm = {wire.T_PROC: 100.0, wire.T_PULL: 100.1, wire.T_PULLED: 101.6, wire.T_START: 101.9}
    assert RoundLog._process_split(warm) == pytest.approx({"startup_s": 0.4, "message_s": 1.5})
    cold = {wire.T_PROC: 100.0, wire.T_START: 104.0}  # Flower's flwr-clientapp: the wait is part of the start
    assert RoundLog._process_split(cold) == {"startup_s": 4.0, "message_s": None}
    assert RoundLog._process_split({}) == {"startup_s": None, "message_s": None}


def test_a_fab_checked_by_one_task_is_not_unzipped_and_checked_again_by_the_next(tmp_path, monkeypatch):
    src = inspect.getsource(runner.run_clientapp)
    assert "\n        install_from_fab(fab.content, skip_prompt=True)\n" in src  # its result is not used
    installs = tmp_path / "installs"
    installed = tmp_path / "apps" / "iiotfl"
    installed.mkdir(parents=True)

    def flower_install(fab_file, skip_prompt=False):
        with installs.open("a") as f:
            f.write(f"{fab_file.decode()}\n")
        return installed

    monkeypatch.setattr(runner, "install_from_fab", flower_install)
    monkeypatch.setattr(warm_clientapp, "run_clientapp", lambda **_: runner.install_from_fab(b"fab-1", skip_prompt=True))
    monkeypatch.setattr(warm_clientapp, "prompt_object_pulls", lambda *a: None)
    executor = warm_clientapp.ForkExecutor()

    def one_task(task_id):
        executor.launch(_spec(task_id))
        for pid in list(executor.children):
            os.waitpid(pid, 0)
        executor.children.clear()

    one_task(1)
    one_task(2)
    assert installs.read_text().splitlines() == ["fab-1"]  # the second task found it checked
    installed.rmdir()  # the installed copy is gone: Flower installs it again
    installed.parent.mkdir(exist_ok=True)
    one_task(3)
    assert installs.read_text().splitlines() == ["fab-1", "fab-1"]
    assert (executor.verified.stat().st_mode & 0o077) == 0


def test_secret_directories_of_supernodes_that_are_gone_are_swept(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{supernode.RUNTIME_DIR_PREFIX}{gone.pid}-abc"
    alive = tmp_path / f"{supernode.RUNTIME_DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{supernode.RUNTIME_DIR_PREFIX}notapid"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "superexec.secret").write_bytes(b"x")
    supernode.sweep_runtime_dirs(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()
