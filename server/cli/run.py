"""iiotfl run [-m] [OVERRIDES...]: run the federated job (a Hydra app).

Composes configs/ with the Hydra overrides (e.g. ``engine=sim fleet.rounds=5 link=nb_iot``), checks the
config, runs it on the chosen engine and writes the run directory (runs/<date>/<time>/ unless
``hydra.run.dir=...``; report.md says what happened). The last lines name the report and the run's
metric with the evaluation it comes from (the server's held-out test set, or the gateways' own
held-out data when there is none), or why there is none. A config the checks refuse is one line on stderr,
exit 2, before anything starts.

``-m`` sweeps every combination (``-m codec=none,int8 link=lte_m,nb_iot``) into multirun/<date>/<time>/.
A point that fails (its config cannot be composed or is refused by the checks, the launcher crashes,
the run fails or times out) is recorded in its run directory (``launch.json`` status ``failed`` and the
reason, ``report.md``) and the sweep goes on. The sweep ends with ``summary.md`` (one table, trade-off
plots), ``summary.csv`` and ``sweep-<task>.png`` in its directory, and exits 1 if any point failed.
Ctrl-C stops the sweep (the summary of what ran is written; exit 130).

Every argument is handed to Hydra untouched; ``--help`` also prints Hydra's list of config groups and
the composed config.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from iiotfl.compat.hydra import tolerate_sweep_composition_errors
from iiotfl.configs import ConfigError
from iiotfl.server.cli.base import description, summary
from iiotfl.server.launch import check_data_files, launch, validate
from iiotfl.server.report import metric_line, run_summary, write_report, write_summary

EPILOG = """Hydra's own flags work too, e.g. --cfg job (print the composed config), --info, --hydra-help."""
HELP_FLAGS = ("-h", "--help")

_failures: list[str] = []
_sweep_dir: list[Path] = []  # the running sweep's directory (for its summary after Ctrl-C)

# A config key holding why a sweep point's config could not be composed (see iiotfl.compat.hydra)
COMPOSE_ERROR = "iiotfl_compose_error"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("run", passthrough=True, help=summary(__doc__), description=description(__doc__),
                            epilog=EPILOG)
    p.add_argument("-m", "--multirun", action="store_true", help="sweep every combination of the overrides")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="a Hydra override, e.g. fleet.rounds=5")
    p.set_defaults(handler=main)
    return p


def _one_line(err: BaseException) -> str:
    text = str(err)
    for noise in ("Config search path", "full_key:", "Set the environment variable HYDRA_FULL_ERROR"):
        text = text.split(noise)[0]  # Hydra's messages end in details no one needs in a table
    text = " ".join(text.split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, ConfigError) else text


def _compose_error(err: Exception) -> str:
    return f"config: these overrides cannot be composed: {_one_line(err)}"


def record_failure(run_dir: Path, reason: str, **extra: object) -> None:
    """Mark a run as failed with ``reason``: merged into ``launch.json`` (what the launcher already
    wrote is kept), and ``report.md`` re-rendered. Never raises: a sweep goes on after it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "launch.json"
    try:
        info = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        info = {}
    info.update(extra, status="failed", error=reason)
    path.write_text(json.dumps(info, indent=2))
    try:
        write_report(run_dir)
    except Exception as err:  # noqa: BLE001
        print(f"warning: report.md of {run_dir} not written: {_one_line(err)}", file=sys.stderr)


def _failed_point(run_dir: Path, reason: str, stage: str, record: bool = True) -> str:
    """A sweep point that failed: recorded (unless ``record`` is false: its directory is another run's), counted,
    said; the sweep goes on."""
    _failures.append(reason)
    if record:
        record_failure(run_dir, reason, stage=stage)
    print(f"failed: {run_dir} — {reason}", file=sys.stderr)
    return "failed"


def _checked_config(cfg: DictConfig) -> tuple[dict, str | None]:
    """The plain config and, if the checks refuse it, why (one line)."""
    plain: dict = {}
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        validate(plain)
        check_data_files(plain)
    except Exception as err:  # noqa: BLE001 - ConfigError, or a check that tripped over a bad value
        return plain, str(err) if isinstance(err, ConfigError) else f"config: {_one_line(err)}"
    return plain, None


def _previous_run(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot take a new run: it holds another run's results or checkpoints, which a resume or
    an export would take for this run's. Nothing there is touched."""
    held = [name for name in ("launch.json", "metrics.jsonl", "model.ckpt") if (run_dir / name).exists()]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        held.append("checkpoints/")
    if not held:
        return None
    return (f"run directory {run_dir} already holds another run ({', '.join(held)}); give a new hydra.run.dir "
            "(or leave it out: every run gets runs/<date>/<time>)")


def _launch(plain: dict, run_dir: Path, sweep: bool) -> dict | None:
    """What the launcher returns, or None when it crashed in a sweep (recorded; a single run re-raises)."""
    try:
        return launch(plain, run_dir)
    except Exception as err:  # noqa: BLE001 - a crash of the launcher itself: record it, go on with the sweep
        reason = f"the launcher crashed: {_one_line(err)}; traceback in logs/launcher-traceback.txt"
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs" / "launcher-traceback.txt").write_text(traceback.format_exc())
        record_failure(run_dir, reason, stage="launch")
        if not sweep:
            raise
        _failures.append(reason)
        print(f"failed: {run_dir} — {reason}", file=sys.stderr)
        return None


def _print_metric(run_dir: Path) -> None:
    """The run's metric and which evaluation it comes from (without one: why), one line under the status."""
    try:
        print(f"  {metric_line(run_summary(run_dir))}")
    except Exception as err:  # noqa: BLE001 - the run is over; its report.md has the figures
        print(f"warning: the run's metric could not be read: {_one_line(err)}", file=sys.stderr)


@hydra.main(config_path="pkg://iiotfl.configs", config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    if sweep:
        _sweep_dir[:] = [Path(hc.sweep.dir)]
    if COMPOSE_ERROR in cfg:
        return _failed_point(run_dir, str(cfg[COMPOSE_ERROR]), "config")
    previous = _previous_run(run_dir)
    if previous is not None:  # nothing is written there, not even the failure record
        if not sweep:
            print(f"error: {previous}", file=sys.stderr)
            sys.exit(2)
        return _failed_point(run_dir, previous, "run directory", record=False)
    plain, refused = _checked_config(cfg)
    if refused is not None:
        if not sweep:
            print(f"error: {refused}", file=sys.stderr)
            sys.exit(2)
        return _failed_point(run_dir, refused, "config")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = _launch(plain, run_dir, sweep)
    if info is None:
        return "failed"
    print(f"{info['status']}: {run_dir / 'report.md'}" + (f" — {info['error']}" if info.get("error") else ""))
    _print_metric(run_dir)
    if info["status"] != "completed":
        _failures.append(info.get("error", info["status"]))
        if sweep and info["status"] == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C / SIGTERM stops the sweep, not only this point
    return info["status"]


def main(args: argparse.Namespace) -> int:
    if any(flag in args.argv for flag in HELP_FLAGS):
        print(args.parser.format_help())  # then Hydra's: the config groups and the composed config
    # Ctrl-C must reach the launcher (and tear the fleet down) even when started
    # from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    saved_argv, sys.argv = sys.argv, ["iiotfl run", *args.argv]
    _failures.clear()
    _sweep_dir.clear()
    tolerate_sweep_composition_errors(COMPOSE_ERROR, _compose_error)
    try:
        run_job()
    except KeyboardInterrupt:
        if not _sweep_dir:
            return 1
        md = write_summary(_sweep_dir[0])[1]
        print(f"sweep stopped by the user; summary of what ran: {md}", file=sys.stderr)
        return 130
    finally:
        sys.argv = saved_argv
    return 1 if _failures else 0
