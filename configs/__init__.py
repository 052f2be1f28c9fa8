"""Hydra config groups of iiotfl, their validation, and their trip through Flower.

``iiotfl run`` composes ``config.yaml`` with one option per group (task/, strategy/,
fleet/, engine/). Before anything starts, :func:`validate` checks every value and
raises :class:`ConfigError` with one line naming the key and the fix.

The composed config reaches the ServerApp and the ClientApps as Flower run config:
``iiotfl-config`` holds it as JSON, ``output-dir`` says where the ServerApp writes
its artefacts. Under plain ``flwr run .`` the JSON is empty and the apps compose the
defaults here, with the few flat keys of ``[tool.flwr.app.config]`` applied.
"""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Any, Mapping

CONFIG_DIR = Path(__file__).resolve().parent

STRATEGIES = ("fedavg", "krum", "median", "trimmed_mean", "he", "secagg")
ROBUST = ("krum", "median", "trimmed_mean")  # strategies/robust.py: Flower's rules on plaintext updates
POISON_KINDS = ("none", "scale", "sign_flip")
ENGINES = ("fleet", "sim", "remote")
DATA_SOURCES = ("generator", "csv", "cmapss")
CODECS = ("none", "fp16", "int8", "int4", "topk")
OUTAGE_MODES = ("none", "periodic", "random", "rounds")
PRIVACY = ("none", "sample", "client")

# Flat run-config keys of pyproject.toml's [tool.flwr.app.config] -> config paths.
FLAT_KEYS = {
    "num-server-rounds": "fleet.rounds",
    "fraction-train": "fleet.fraction_train",
    "fraction-evaluate": "fleet.fraction_evaluate",
    "local-epochs": "train.local_epochs",
    "batch-size": "train.batch_size",
    "lr": "train.lr",
}


class ConfigError(ValueError):
    """A config value that cannot work, with the key and the fix in one line."""


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose config.yaml with Hydra's compose API and return a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return data


def _get(cfg: Mapping[str, Any], path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"config: {path} is missing; add it or restore the config group's default")
        node = node[part]
    return node


def _int(cfg: Mapping[str, Any], path: str, low: int, high: int | None = None) -> int:
    value = _get(cfg, path)
    bad = not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low
    if bad or (high is not None and value > high):
        rng = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"config: {path}={value!r} is invalid; it must be an integer {rng} (e.g. {path}={low})")
    return int(value)


def _float(cfg: Mapping[str, Any], path: str, low: float, high: float, low_open: bool = False) -> float:
    value = _get(cfg, path)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ConfigError(f"config: {path}={value!r} is invalid; it must be a number in {bound}")
    return float(value)


def _choice(cfg: Mapping[str, Any], path: str, choices: tuple[str, ...], group: str | None = None) -> str:
    value = _get(cfg, path)
    if value not in choices:
        how = f"pick {group}=<one of {list(choices)}>" if group else f"set {path} to one of {list(choices)}"
        raise ConfigError(f"config: {path}={value!r} is unknown; {how}")
    return str(value)


def validate(cfg: Mapping[str, Any]) -> None:
    """Check every value the run uses; raise ConfigError on the first bad one."""
    from iiotfl.tasks import TASKS, task_class

    _int(cfg, "seed", 0)
    _choice(cfg, "task.name", TASKS, group="task")
    _choice(cfg, "strategy.name", STRATEGIES, group="strategy")
    _choice(cfg, "engine.name", ENGINES, group="engine")
    gateways = _int(cfg, "fleet.gateways", 1, 250 * 250)
    _int(cfg, "fleet.rounds", 1)
    _float(cfg, "fleet.fraction_train", 0.0, 1.0, low_open=True)
    _float(cfg, "fleet.fraction_evaluate", 0.0, 1.0)
    if _get(cfg, "fleet.min_gateways") is not None:
        _int(cfg, "fleet.min_gateways", 1, gateways)
    _float(cfg, "fleet.round_timeout", 0.0, 1e7, low_open=True)
    if cfg["fleet"].get("resume_attempts") is not None:
        _int(cfg, "fleet.resume_attempts", 0, 100)
    _float(cfg, "engine.startup_timeout", 0.0, 1e5, low_open=True)
    _int(cfg, "train.local_epochs", 1)
    _int(cfg, "train.batch_size", 1)
    _float(cfg, "train.lr", 0.0, 10.0, low_open=True)
    _int(cfg, "train.torch_threads", 1)
    check = getattr(task_class(cfg["task"]["name"]), "validate", None)
    if check is not None:  # the task's own keys (tasks/<name>/__init__.py)
        check(cfg)
    _choice(cfg, "codec.name", CODECS, group="codec")
    _choice(cfg, "codec.downlink", ("full", "delta"))
    if cfg["codec"]["name"] in ("int8", "int4"):
        _int(cfg, "codec.chunk", 8)
    if cfg["codec"]["name"] == "topk":
        _float(cfg, "codec.k_fraction", 0.0, 1.0, low_open=True)
        if cfg["codec"]["downlink"] == "delta":
            raise ConfigError("config: codec.downlink=delta with codec=topk would lose what top-k drops on the way "
                              "down; use codec.downlink=full")
    if _get(cfg, "fleet.clients_per_round") is not None:
        _int(cfg, "fleet.clients_per_round", 1, gateways)
    _float(cfg, "fleet.over_selection", 0.0, 10.0)
    _int(cfg, "fleet.min_replies", 1, gateways)
    _choice(cfg, "fleet.outage.mode", OUTAGE_MODES)
    _validate_privacy(cfg)
    _validate_secure(cfg)
    _validate_robust(cfg)
    _validate_poison(cfg)
    _validate_tls(cfg)
    from iiotfl.links.profiles import ProfileError, gateway_profiles

    try:
        gateway_profiles(cfg)
    except ProfileError as err:
        raise ConfigError(str(err)) from None
    if cfg["engine"]["name"] == "sim":
        _int(cfg, "engine.client_cpus", 1)
        if _get(cfg, "engine.num_cpus") is not None:
            _int(cfg, "engine.num_cpus", 1)
        ray = cfg["engine"].get("ray_address")
        if ray is not None:
            if not re.fullmatch(r"(auto|[\w.-]+:\d{1,5})", str(ray)):
                raise ConfigError(f"config: engine.ray_address={ray!r} is not host:port; give the Ray head's address "
                                  "as `ray start --head` printed it, e.g. engine.ray_address=10.0.0.5:6379")
            if _get(cfg, "engine.num_cpus") is not None:
                raise ConfigError("config: engine.num_cpus cannot be set with engine.ray_address; the Ray cluster "
                                  "brings its own CPUs (set engine.num_cpus=null)")
    if cfg["engine"]["name"] == "remote":
        address = str(_get(cfg, "engine.superlink") or "")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"config: engine.superlink={address!r} is not host:port; give the SuperLink's address, "
                              "e.g. engine.superlink=superlink.plant.example:9093")
        if not _get(cfg, "engine.insecure") and not _get(cfg, "engine.ca"):
            raise ConfigError("config: engine=remote needs engine.ca (the SuperLink's ca.crt from `iiotfl certs`), or "
                              "engine.insecure=true for a SuperLink started with --insecure")


def _validate_privacy(cfg: Mapping[str, Any]) -> None:
    name = _choice(cfg, "privacy.name", PRIVACY, group="privacy")
    if name == "none":
        return
    priv = cfg["privacy"]
    for key in ("epsilon", "budget", "noise_multiplier"):
        if priv.get(key) is not None:
            _float(cfg, f"privacy.{key}", 0.0, 1e6, low_open=True)
    if priv.get("delta") is not None:
        value = priv["delta"]
        if not isinstance(value, numbers.Real) or not 0 < value < 1:
            raise ConfigError(f"config: privacy.delta={value!r} is invalid; it must be in (0, 1), "
                              "well below 1 / records (or null for the default)")
    if not priv.get("epsilon") and not priv.get("noise_multiplier"):
        raise ConfigError("config: privacy needs privacy.epsilon (a target) or privacy.noise_multiplier")
    if name == "sample":
        _float(cfg, "privacy.max_grad_norm", 0.0, 1e6, low_open=True)
        from iiotfl.tasks import get_task

        model = get_task(cfg["task"], cfg["seed"]).build_model()
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigError(f"config: privacy=sample needs a model DP-SGD can train; {type(model).__name__} has "
                              f"{'; '.join(sorted({str(e).splitlines()[0] for e in errors}))} (e.g. use GroupNorm "
                              "instead of BatchNorm)")
    if name == "client":
        _float(cfg, "privacy.clipping_norm", 0.0, 1e6, low_open=True)
        _choice(cfg, "privacy.clipping", ("server", "client"))
        if cfg["codec"]["name"] != "none":
            raise ConfigError("config: privacy=client clips and averages full float32 weights (Flower's DP wrappers); "
                              "use codec=none with it")
        if float(cfg["fleet"]["fraction_train"]) != 1.0 or cfg["fleet"].get("clients_per_round"):
            raise ConfigError("config: privacy=client accounts every gateway in every round; keep "
                              "fleet.fraction_train=1.0 and fleet.clients_per_round=null")


def _validate_secure(cfg: Mapping[str, Any]) -> None:
    """strategy=he / secagg: parameters, and the combinations that cannot work."""
    name = cfg["strategy"]["name"]
    if name not in ("he", "secagg"):
        return
    gateways = int(cfg["fleet"]["gateways"])
    if cfg["codec"]["name"] != "none":
        raise ConfigError(f"config: strategy={name} quantises updates itself; use codec=none with it")
    if name == "he":
        from iiotfl.strategies.he import MAX_DEVICES

        _float(cfg, "strategy.initial_range", 0.0, 1e6, low_open=True)
        _float(cfg, "strategy.range_factor", 1.0, 1e6)
        _int(cfg, "strategy.min_aggregate", 2)
        if gateways > MAX_DEVICES:
            raise ConfigError(f"config: strategy=he sums at most {MAX_DEVICES} gateways per round (digit headroom); "
                              f"set fleet.clients_per_round <= {MAX_DEVICES}")
        if gateways < 2:
            raise ConfigError("config: strategy=he needs fleet.gateways >= 2 (one gateway's sum is its update)")
    if name == "secagg":
        if gateways < 3:
            raise ConfigError("config: strategy=secagg needs fleet.gateways >= 3 (Flower's SecAgg+ needs more than "
                              "two shares)")
        shares = _get(cfg, "strategy.num_shares")
        if not isinstance(shares, numbers.Real) or shares <= 0 or (isinstance(shares, int) and 1 < shares <= 2):
            raise ConfigError(f"config: strategy.num_shares={shares!r}; give an int > 2 or a fraction in (0, 1]")
        threshold = _get(cfg, "strategy.reconstruction_threshold")
        if not isinstance(threshold, numbers.Real) or threshold <= 0 or (isinstance(threshold, float) and threshold > 1):
            raise ConfigError(f"config: strategy.reconstruction_threshold={threshold!r}; give an int >= 2 or a "
                              "fraction in (0, 1]")
        if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
            raise ConfigError("config: strategy.reconstruction_threshold must be below strategy.num_shares")
        _float(cfg, "strategy.clipping_range", 0.0, 1e6, low_open=True)
        q = _int(cfg, "strategy.quantization_range", 2)
        m = _int(cfg, "strategy.modulus_range", 2, 2**32)
        if m & (m - 1):
            raise ConfigError(f"config: strategy.modulus_range={m} must be a power of two (at most 2^32)")
        if m < q * gateways:
            raise ConfigError(f"config: strategy.modulus_range={m} < gateways x quantization_range = {q * gateways}: "
                              "the masked sum would wrap around; lower strategy.quantization_range")
        _float(cfg, "strategy.max_weight", 0.0, 1e12, low_open=True)


def _validate_robust(cfg: Mapping[str, Any]) -> None:
    """strategy=krum / median / trimmed_mean (Flower's rules, strategies/robust.py): parameters, enough
    updates per round for the rule to neutralise what it is set to tolerate, and what cannot go with them.
    (strategy=he / secagg show the server only the sum: they are the other choices of the same key.)"""
    name = cfg["strategy"]["name"]
    if name not in ROBUST:
        return
    if cfg["privacy"]["name"] == "client":
        raise ConfigError(f"config: strategy={name} with privacy=client: Flower's DP wrappers calibrate the noise "
                          f"to a mean of clipped updates, which {name} is not, so the reported epsilon would be "
                          "false; use privacy=sample (DP-SGD on the gateways) with it, or strategy=fedavg")
    if cfg["codec"]["name"] == "topk":
        raise ConfigError(f"config: strategy={name} with codec=topk: every gateway sends its own 2% largest "
                          f"changes, so {name} would judge sparsity patterns, not outliers (and drop what error "
                          "feedback holds back); use codec=int8, int4, fp16 or none with it")
    from iiotfl.strategies.robust import updates_needed

    gateways = int(cfg["fleet"]["gateways"])
    per_round = cfg["fleet"].get("clients_per_round") or max(1, int(gateways * float(cfg["fleet"]["fraction_train"])))
    fix = "raise fleet.gateways (or fleet.clients_per_round / fleet.fraction_train)"
    if name == "krum":
        f = _int(cfg, "strategy.num_malicious_nodes", 0)
        keep = _int(cfg, "strategy.num_nodes_to_keep", 1)
        if per_round < (need := updates_needed(cfg)):
            raise ConfigError(f"config: strategy=krum with strategy.num_malicious_nodes={f} needs >= 2f+3 = "
                              f"{need} updates per round, the fleet gives {per_round}; {fix} or lower "
                              "strategy.num_malicious_nodes")
        if keep > per_round - f:
            raise ConfigError(f"config: strategy.num_nodes_to_keep={keep} would keep poisoned updates: with "
                              f"{per_round} updates per round and num_malicious_nodes={f}, keep at most "
                              f"{per_round - f}")
    if name == "median" and per_round < (need := updates_needed(cfg)):
        raise ConfigError(f"config: strategy=median needs >= {need} updates per round (the median of two is their "
                          f"mean), the fleet gives {per_round}; {fix}")
    if name == "trimmed_mean":
        beta = _float(cfg, "strategy.beta", 0.0, 0.5, low_open=True)
        if beta >= 0.5:
            raise ConfigError(f"config: strategy.beta={beta} would trim everything; it must be in (0, 0.5)")
        if per_round < (need := updates_needed(cfg)):
            raise ConfigError(f"config: strategy=trimmed_mean with strategy.beta={beta} trims int(beta x "
                              f"{per_round}) = 0 updates per end, which is plain FedAvg; raise strategy.beta to "
                              f">= {1 / per_round:.2g} or the updates per round to >= {need}")


def _validate_poison(cfg: Mapping[str, Any]) -> None:
    """fleet.poison: which gateways send a scaled or sign-flipped update (a poisoning scenario)."""
    if cfg["fleet"].get("poison") is None:
        return
    kind = _choice(cfg, "fleet.poison.kind", POISON_KINDS)
    _float(cfg, "fleet.poison.factor", 0.0, 1e6, low_open=True)
    gateways = int(cfg["fleet"]["gateways"])
    chosen = _get(cfg, "fleet.poison.gateways")
    if not isinstance(chosen, list) or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < gateways
                                               for g in chosen):
        raise ConfigError(f"config: fleet.poison.gateways={chosen!r} must be a list of gateway indices in "
                          f"0-{gateways - 1}, e.g. fleet.poison.gateways=[1]")
    if kind != "none" and not chosen:
        raise ConfigError(f"config: fleet.poison.kind={kind} poisons no gateway; name them, e.g. "
                          "fleet.poison.gateways=[1]")


def _validate_tls(cfg: Mapping[str, Any]) -> None:
    """engine=fleet: TLS and node authentication unless engine.insecure; a given certs directory must hold
    what the fleet reads (the SuperLink certificate's addresses are checked at start, once links are known)."""
    if cfg["engine"]["name"] != "fleet":
        return
    insecure, given = _get(cfg, "engine.insecure"), _get(cfg, "engine.certs")
    if not isinstance(insecure, bool):
        raise ConfigError(f"config: engine.insecure={insecure!r} is invalid; it must be true or false")
    if given is None:
        return
    if insecure:
        raise ConfigError("config: engine.certs is set but engine.insecure=true runs without TLS; drop one of them")
    from iiotfl.security.certs import CertsError, check_dir

    try:
        check_dir(Path(str(given)).expanduser(), int(cfg["fleet"]["gateways"]))
    except CertsError as err:
        raise ConfigError(f"config: engine.certs: {err}") from None


def to_run_config(cfg: Mapping[str, Any], output_dir: str | Path) -> dict[str, Any]:
    """The Flower run config that carries ``cfg`` to the apps."""
    flat = {key: _get(cfg, path) for key, path in FLAT_KEYS.items()}
    flat["iiotfl-config"] = json.dumps(cfg, sort_keys=True)
    flat["output-dir"] = str(Path(output_dir).resolve())
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """Recover (config, output directory) from a Flower run config."""
    blob = run_config.get("iiotfl-config") or ""
    if blob:
        cfg = json.loads(blob)
    else:
        cfg = compose()
        for key, path in FLAT_KEYS.items():
            if key in run_config:
                section, leaf = path.split(".")
                cfg[section][leaf] = run_config[key]
        validate(cfg)
    out = run_config.get("output-dir") or ""
    return cfg, Path(out) if out else Path("runs") / "flwr-run"
