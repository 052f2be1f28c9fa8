"""``iiotfl`` command line.

* ``iiotfl run [OVERRIDES...]`` — a Hydra app: compose configs/, validate, run on
  the chosen engine, write the run directory. ``-m`` sweeps every combination; a point that
  fails (its config cannot be composed or is refused by the checks, the launcher crashes, the
  run fails or times out) is recorded in its run directory (``launch.json`` status ``failed``
  and the reason, ``report.md``) and the sweep goes on. The sweep ends with ``summary.md``
  (one table, trade-off plots), ``summary.csv`` and ``sweep-<task>.png`` in its directory,
  and exits 1 if any point failed. Ctrl-C stops the sweep (the summary of what ran is written).
* ``iiotfl report DIR`` — a run directory: re-render its ``report.md``; any other directory
  (a sweep, a day of sweeps): the sweep table and plots over every run below it.
* ``iiotfl keys DIR`` — an HE key set for ``strategy=he``: ``device.he`` (parameters,
  public and secret key; 0600; copy to every gateway) and ``server.he`` (parameters and
  public key; the only file the server is given). Never overwrites without ``--force``.
* ``iiotfl gateway ...`` — a plant's gateway joining a remote SuperLink (``clients/gateway.py``).
* ``iiotfl certs DIR`` — CA, SuperLink TLS certificate and one node key pair per gateway
  (``server/certs.py``; private keys 0600, never overwritten without ``--force``);
  ``--register HOST:PORT`` registers every gateway's public key with a running SuperLink.
* ``iiotfl export DIR`` — the run's final model as signed int8 TorchScript for devices, with its size,
  latency and metric change in ``report.md`` (``server/export.py``; keys: ``server/artefacts.py``).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from iiotfl.configs import ConfigError, validate

USAGE = """usage: iiotfl run [HYDRA OVERRIDES...]   run the federated job (e.g. engine=sim fleet.rounds=5, -m to sweep)
       iiotfl report DIR                 a run: rewrite its report.md; a sweep (or any folder of runs):
                                         summary.md (one table), summary.csv and trade-off plots
       iiotfl cleanup                    remove what killed runs left (processes, namespaces, links, cgroups)
       iiotfl audit DIR [--refs K]       membership-inference audit of a run's final model (audit.json, report)
       iiotfl export DIR                 the run's final model as signed int8 TorchScript (DIR/export/, report)
       iiotfl keys DIR [--force]         provision an HE key set: DIR/device.he (gateways, 0600), DIR/server.he
       iiotfl gateway --superlink H:P --ca CA --key KEY --data DIR [--link L]
                                         run this plant's gateway against a remote SuperLink (--help)
       iiotfl certs DIR [--san NAME ...] [--gateways N] [--force] | DIR --register HOST:PORT
                                         TLS CA + SuperLink certificate + gateway node keys; register the keys"""

_failures: list[str] = []
_sweep_dir: list[Path] = []  # the running sweep's directory (for its summary after Ctrl-C)

# A config key holding why a sweep point's config could not be composed (see _tolerate_composition_errors)
COMPOSE_ERROR = "iiotfl_compose_error"


def _one_line(err: BaseException) -> str:
    text = str(err)
    for noise in ("Config search path", "full_key:", "Set the environment variable HYDRA_FULL_ERROR"):
        text = text.split(noise)[0]  # Hydra's messages end in details no one needs in a table
    text = " ".join(text.split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, ConfigError) else text


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
        from iiotfl.server.report import write_report

        write_report(run_dir)
    except Exception as err:  # noqa: BLE001
        print(f"warning: report.md of {run_dir} not written: {_one_line(err)}", file=sys.stderr)


def _tolerate_composition_errors() -> None:
    """Let a sweep go on past a point whose config Hydra cannot compose (an override that one option
    of a swept group lacks, e.g. ``-m task=predictive_maintenance,energy_anomaly task.data.units_min=4``,
    or a misspelt option). Hydra's basic launcher
    composes every point just before running it and aborts the whole sweep when one fails; here
    such a point gets the sweep's base config with the error under ``COMPOSE_ERROR``, so
    ``run_job`` records it as a failed run with its own directory and overrides."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import open_dict, read_write

    original = ConfigLoaderImpl.load_sweep_config
    if getattr(original, "_iiotfl", False):
        return

    def load_sweep_config(self, master_config, sweep_overrides):
        try:
            return original(self, master_config, sweep_overrides)
        except Exception as err:  # noqa: BLE001 - ConfigCompositionException, MissingConfigException, ...
            cfg = original(self, master_config, [])
            with read_write(cfg), open_dict(cfg):
                cfg.hydra.overrides.task = list(sweep_overrides)
                cfg[COMPOSE_ERROR] = f"config: these overrides cannot be composed: {_one_line(err)}"
            return cfg

    load_sweep_config._iiotfl = True
    ConfigLoaderImpl.load_sweep_config = load_sweep_config


@hydra.main(config_path="pkg://iiotfl.configs", config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> str:
    from iiotfl.server.fleet import launch

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    if sweep:
        _sweep_dir[:] = [Path(hc.sweep.dir)]
    if COMPOSE_ERROR in cfg:
        reason = str(cfg[COMPOSE_ERROR])
        _failures.append(reason)
        record_failure(run_dir, reason, stage="config")
        print(f"failed: {run_dir} — {reason}", file=sys.stderr)
        return "failed"
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        validate(plain)
    except Exception as err:  # noqa: BLE001 - ConfigError, or a check that tripped over a bad value
        reason = str(err) if isinstance(err, ConfigError) else f"config: {_one_line(err)}"
        if not sweep:
            print(f"error: {reason}", file=sys.stderr)
            sys.exit(2)
        _failures.append(reason)
        record_failure(run_dir, reason, stage="config")
        print(f"failed: {run_dir} — {reason}", file=sys.stderr)
        return "failed"
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        info = launch(plain, run_dir)
    except Exception as err:  # noqa: BLE001 - a crash of the launcher itself: record it, go on with the sweep
        import traceback

        reason = f"the launcher crashed: {_one_line(err)}; traceback in logs/launcher-traceback.txt"
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs" / "launcher-traceback.txt").write_text(traceback.format_exc())
        record_failure(run_dir, reason, stage="launch")
        if not sweep:
            raise
        _failures.append(reason)
        print(f"failed: {run_dir} — {reason}", file=sys.stderr)
        return "failed"
    print(f"{info['status']}: {run_dir / 'report.md'}" + (f" — {info['error']}" if info.get("error") else ""))
    if info["status"] != "completed":
        _failures.append(info.get("error", info["status"]))
        if sweep and info["status"] == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C / SIGTERM stops the sweep, not only this point
    return info["status"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        # Ctrl-C must reach the launcher (and tear the fleet down) even when started
        # from a shell that ignores SIGINT for background jobs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["iiotfl run", *rest]
        _failures.clear()
        _sweep_dir.clear()
        _tolerate_composition_errors()
        try:
            run_job()
        except KeyboardInterrupt:
            if not _sweep_dir:
                return 1
            from iiotfl.server.report import write_summary

            md = write_summary(_sweep_dir[0])[1]
            print(f"sweep stopped by the user; summary of what ran: {md}", file=sys.stderr)
            return 130
        return 1 if _failures else 0
    if command == "report":
        from iiotfl.server.report import report

        if len(rest) != 1 or not Path(rest[0]).is_dir():
            print(f"error: iiotfl report needs one run or sweep directory\n{USAGE}", file=sys.stderr)
            return 2
        try:
            print(report(rest[0]))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if command == "audit":
        from iiotfl.privacy.audit import audit_run
        from iiotfl.server.report import write_report

        refs = 4
        if "--refs" in rest:
            i = rest.index("--refs")
            refs = int(rest[i + 1])
            rest = rest[:i] + rest[i + 2:]
        if len(rest) != 1 or not Path(rest[0]).is_dir():
            print(f"error: iiotfl audit needs one run directory\n{USAGE}", file=sys.stderr)
            return 2
        from iiotfl.security.artefacts import ArtefactError

        try:
            result = audit_run(rest[0], reference_models=refs)
        except (FileNotFoundError, ArtefactError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        write_report(rest[0])
        for name in ("loss_threshold", "lira"):
            if name in result:
                r = result[name]
                print(f"{name}: AUC {r['auc']:.3f}, TPR at 1% FPR {r['at_fpr_1%']['tpr']:.3f}, "
                      f"at 0.1% FPR {r['at_fpr_0.1%']['tpr']:.4f}")
        return 0
    if command == "export":
        from iiotfl.security.artefacts import ArtefactError
        from iiotfl.server.export import export_run
        from iiotfl.server.report import write_report

        if len(rest) != 1 or not Path(rest[0]).is_dir():
            print(f"error: iiotfl export needs one run directory\n{USAGE}", file=sys.stderr)
            return 2
        try:
            ex = export_run(rest[0])
        except (FileNotFoundError, ArtefactError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        write_report(rest[0])
        f32, i8 = ex["metrics"].get("float32", {}), ex["metrics"].get("int8", {})
        print(f"{Path(rest[0]) / ex['file']}: int8 TorchScript {ex['int8_bytes']} B (float32 {ex['float32_bytes']} B), "
              f"{ex['latency_us']['int8']:.0f} us per sample (float32 {ex['latency_us']['float32']:.0f} us)"
              + (f", {key} {i8[key]:.3f} (float32 {f32[key]:.3f})" if (key := ex.get("primary_metric")) in i8 else ""))
        return 0
    if command == "keys":
        from iiotfl.strategies.he import HEError, KeySet

        force = "--force" in rest
        rest = [a for a in rest if a != "--force"]
        if len(rest) != 1:
            print(f"error: iiotfl keys needs one directory\n{USAGE}", file=sys.stderr)
            return 2
        try:
            device, server = KeySet.generate().write(rest[0], force=force)
        except (HEError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"device key set (secret, 0600; copy to each gateway): {device}\n"
              f"server key set (public; the server's only HE material): {server}\n"
              f"run with: iiotfl run strategy=he strategy.keys={Path(rest[0]).resolve()}")
        return 0
    if command == "certs":
        from iiotfl.security.certs import main as certs_main

        return certs_main(rest)
    if command == "gateway":
        from iiotfl.clients.gateway import main as gateway_main

        return gateway_main(rest)
    if command == "cleanup":
        from iiotfl.server.fleet import cleanup

        removed = cleanup()
        print(f"removed {len(removed)} leftovers" + (": " + ", ".join(removed) if removed else ""))
        return 0
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
