"""``launch(cfg, run_dir)``: one federated job, from bring-up to ``launch.json`` and the report.

The engine's Deployment (``engines.py``) is brought up, the job submitted with ``flwr run`` and
the composed config, and followed every 0.5 s: progress from the ``metrics.jsonl`` the
ServerApp appends to, outages (``links/outages.py``), the wire counters of shaped links
(``<run>/wire.json``, ``links/counters.py``), SuperNodes that were refused, the ServerApp dying,
the deadline (``startup_timeout + (rounds + 2) x round_timeout``: the statistics query, the rounds, the
plants' evaluation of the final model), and the SuperLink dying (then
resumed from the last checkpoint when ``resume.py`` allows). Everything is torn down at the end,
also on Ctrl-C, on SIGTERM and on failure. ``cfg`` is not changed: what the launcher adds (a
fresh HE key set, the round a resumed run starts after) goes to the apps as Flower run config.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from iiotfl.links.counters import write_wire
from iiotfl.links.outages import Outages
from iiotfl.server import events
from iiotfl.server.launch.deployment import Deployment
from iiotfl.server.launch.engines import engine_class
from iiotfl.server.launch.progress import Progress
from iiotfl.server.launch.resume import last_checkpoint, resume_refusal
from iiotfl.server.launch.superlink import LaunchError
from iiotfl.server.report import load_rounds, write_report
from iiotfl.strategies import strategy_spec
from iiotfl.strategies.he import KeySet
from iiotfl.tasks import task_class

POLL_S = 0.5
SERVERAPP_GRACE_S = 5.0  # a ServerApp process gone this long before metrics.json: it died


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def provision_keys(cfg: dict[str, Any], run_dir: Path) -> Path | None:
    """A fresh HE key set in ``run_dir/he-keys`` when the strategy needs keys and strategy.keys is null
    (a real deployment provisions with `iiotfl keys`); its directory, or None."""
    if not strategy_spec(cfg).needs_keys or cfg["strategy"].get("keys"):
        return None
    KeySet.generate().write(run_dir / "he-keys")
    return run_dir / "he-keys"


class Job:
    """One submitted job followed to its end on a brought-up Deployment."""

    def __init__(self, dep: Deployment, info: dict[str, Any], started: float, he_keys: Path | None,
                 progress: Progress) -> None:
        self.dep, self.cfg, self.run_dir = dep, dep.cfg, dep.run_dir
        self.info, self.started, self.he_keys, self.progress = info, started, he_keys, progress
        fleet, engine = self.cfg["fleet"], self.cfg["engine"]
        # the statistics query, the rounds and the plants' evaluation of the final model: each within round_timeout
        self.deadline = started + float(engine["startup_timeout"]) + float(fleet["round_timeout"]) * (
            int(fleet["rounds"]) + 2)
        self.seen, self.server_seen, self.server_gone, self.events_seen = 0, False, 0.0, 0
        self.outages = Outages(self.cfg, dep.gateway_links, self.run_dir / "outages.jsonl")
        self.write_wire()  # the ServerApp takes its first reading when it starts
        self.client = dep.submit(he_keys=he_keys, run_uid=info["run_uid"])
        info["status"] = "running"

    def follow(self) -> None:
        """Until ``flwr run`` ends (and the SuperLink still lives); LaunchError on what ends the run early."""
        while True:
            if self.dep.superlink_lost():
                self.resume()
                continue
            if self.client.poll() is not None:
                time.sleep(1.0)  # `flwr run` also ends when the SuperLink dies: look once more
                if not self.dep.superlink_lost():
                    break
                continue
            self.watch_serverapp()
            self.tick()
            time.sleep(POLL_S)
        self.show_rounds()
        self.outages.restore()
        self.write_wire()

    def resume(self) -> None:
        """The SuperLink died: start it again and resubmit from the last checkpoint, or say why not."""
        code = self.dep.superlink_exit()
        why = f"flower-superlink exited with code {code}" if code is not None else "the SuperLink went away"
        done = last_checkpoint(self.run_dir)
        refusal = resume_refusal(self.cfg, len(self.info.get("resumed", [])))
        if refusal:
            raise LaunchError(f"{why}; not resumed: {refusal}; see logs/superlink.log")
        # like a container restart policy: the SuperLink comes back on its state
        # database, the gateways reconnect, the job goes on from the last checkpoint
        self.dep.restart_superlink()
        self.info.setdefault("resumed", []).append(
            {"after_round": done, "superlink_exit": code, "at_s": round(time.time() - self.started, 1)})
        engine, fleet = self.cfg["engine"], self.cfg["fleet"]
        self.deadline += float(engine["startup_timeout"]) + float(fleet["round_timeout"]) * 2
        self.server_seen, self.server_gone = False, 0.0
        self.client = self.dep.submit(resume_round=done, he_keys=self.he_keys, run_uid=self.info["run_uid"])

    def watch_serverapp(self) -> None:
        if self.dep.serverapp_alive():
            self.server_seen, self.server_gone = True, 0.0
        elif self.server_seen and not (self.run_dir / "metrics.json").exists():
            self.server_gone = self.server_gone or time.time()
            if time.time() - self.server_gone > SERVERAPP_GRACE_S:
                raise LaunchError("the ServerApp process died before the run finished; see logs/serverapp.log")

    def tick(self) -> None:
        rows = self.show_rounds()
        self.outages.tick(rows)
        self.write_wire()
        refused = self.dep.supernode_refused()
        if refused:
            raise LaunchError(refused)
        if time.time() > self.deadline:
            raise LaunchError("the run took longer than startup_timeout + (rounds + 2) x round_timeout")

    def show_rounds(self) -> list[dict[str, Any]]:
        news = events.read(self.run_dir)
        for event in news[self.events_seen:]:  # a gateway's failure, the ServerApp's error: one line each
            self.progress.note(event["message"])
        self.events_seen = len(news)
        rows = load_rounds(self.run_dir)
        for row in rows[self.seen:]:
            self.progress.update(row)
        self.seen = len(rows)
        return rows

    def write_wire(self) -> None:
        counters = self.dep.wire_counters()
        if counters is not None:
            write_wire(self.run_dir, counters)

    def conclude(self) -> None:
        """What Flower says about the run: ``info``'s run id, status and traffic."""
        run_id = self.dep.run_id()
        run = self.dep.run_info(run_id) if run_id is not None else {}
        self.info.update(run_id=run_id, flower_status=run.get("status"), traffic=run.get("network-traffic", {}))
        if run.get("status") == "finished:completed" and (self.run_dir / "metrics.json").exists():
            self.info["status"] = "completed"
            return
        dead = self.dep.dead_supernodes()
        self.info["status"] = "failed"
        self.info["error"] = (
            (events.last_error(self.run_dir) or f"Flower run ended with status {run.get('status', 'unknown')}")
            + (f"; SuperNodes that died: {dead}" if dead else "")
            + "; see logs/serverapp.log"
        )


def _bring_up(dep: Deployment, info: dict[str, Any]) -> None:
    info["logs"] = {"superlink": "logs/superlink.log", "serverapp": "logs/serverapp.log"}
    dep.start()
    info["links"] = dep.emulation
    info["transport"] = dep.transport
    if dep.certs is not None:
        info["certs"] = str(dep.certs)


def launch(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run one federated job in ``run_dir``; return what ``launch.json`` records."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = cfg["fleet"]
    info: dict[str, Any] = {"engine": cfg["engine"]["name"], "gateways": int(fleet["gateways"]), "status": "starting",
                            "run_uid": uuid.uuid4().hex}  # the run's own id: its checkpoints are bound to it
    started = time.time()
    he_keys = provision_keys(cfg, run_dir)
    progress = Progress(int(fleet["rounds"]), task_class(cfg["task"]["name"]).primary_metric)
    try:
        with _sigterm_as_interrupt(), engine_class(cfg)(cfg, run_dir) as dep:
            _bring_up(dep, info)
            job = Job(dep, info, started, he_keys, progress)
            job.follow()
            job.conclude()
    except KeyboardInterrupt:
        info.update(status="interrupted", error="stopped by the user (Ctrl-C / SIGTERM); processes torn down")
    except LaunchError as err:
        info.update(status="failed", error=str(err))
    finally:
        progress.close()
        info["wall_s"] = time.time() - started
        (run_dir / "launch.json").write_text(json.dumps(info, indent=2))
        write_report(run_dir)
    return info
