"""``iiotfl`` command line.

* ``iiotfl run [OVERRIDES...]`` — a Hydra app: compose configs/, validate, run on
  the chosen engine, write the run directory. ``-m`` sweeps; a sweep ends with
  ``summary.csv`` / ``summary.md`` in its directory.
* ``iiotfl report DIR`` — re-render ``report.md`` of a run, or the summary of a sweep.
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

from configs import ConfigError, validate

USAGE = """usage: iiotfl run [HYDRA OVERRIDES...]   run the federated job (e.g. engine=sim fleet.rounds=5, -m to sweep)
       iiotfl report DIR                 re-render the report of a run or the summary of a sweep
       iiotfl cleanup                    remove what killed runs left (processes, namespaces, links, cgroups)
       iiotfl audit DIR [--refs K]       membership-inference audit of a run's final model (audit.json, report)
       iiotfl export DIR                 the run's final model as signed int8 TorchScript (DIR/export/, report)
       iiotfl keys DIR [--force]         provision an HE key set: DIR/device.he (gateways, 0600), DIR/server.he
       iiotfl gateway --superlink H:P --ca CA --key KEY --data DIR [--link L]
                                         run this plant's gateway against a remote SuperLink (--help)
       iiotfl certs DIR [--san NAME ...] [--gateways N] [--force] | DIR --register HOST:PORT
                                         TLS CA + SuperLink certificate + gateway node keys; register the keys"""

_failures: list[str] = []


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> str:
    from server.fleet import launch

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        validate(plain)
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.RUN:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        _failures.append(str(err))
        (run_dir / "launch.json").write_text(json.dumps({"status": "failed", "error": str(err)}))
        return "failed"
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = launch(plain, run_dir)
    print(f"{info['status']}: {run_dir / 'report.md'}" + (f" — {info['error']}" if info.get("error") else ""))
    if info["status"] != "completed":
        _failures.append(info.get("error", info["status"]))
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
        run_job()
        return 1 if _failures else 0
    if command == "report":
        from server.report import write_report, write_summary

        if len(rest) != 1 or not Path(rest[0]).is_dir():
            print(f"error: iiotfl report needs one run or sweep directory\n{USAGE}", file=sys.stderr)
            return 2
        target = Path(rest[0])
        if (target / "metrics.jsonl").exists() or (target / "launch.json").exists():
            print(write_report(target))
        else:
            print(write_summary(target)[1])
        return 0
    if command == "audit":
        from privacy.audit import audit_run
        from server.report import write_report

        refs = 4
        if "--refs" in rest:
            i = rest.index("--refs")
            refs = int(rest[i + 1])
            rest = rest[:i] + rest[i + 2:]
        if len(rest) != 1 or not Path(rest[0]).is_dir():
            print(f"error: iiotfl audit needs one run directory\n{USAGE}", file=sys.stderr)
            return 2
        from server.artefacts import ArtefactError

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
        from server.artefacts import ArtefactError
        from server.export import export_run
        from server.report import write_report

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
              + (f", RMSE {i8['rmse']:.3f} (float32 {f32['rmse']:.3f})" if i8 else ""))
        return 0
    if command == "keys":
        from strategies.he import HEError, KeySet

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
        from server.certs import main as certs_main

        return certs_main(rest)
    if command == "gateway":
        from clients.gateway import main as gateway_main

        return gateway_main(rest)
    if command == "cleanup":
        from server.fleet import cleanup

        removed = cleanup()
        print(f"removed {len(removed)} leftovers" + (": " + ", ".join(removed) if removed else ""))
        return 0
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
