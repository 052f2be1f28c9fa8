"""The ClientApp: what a plant gateway does with each message from the server.

* ``query.feature_stats``: reply with this plant's per-condition feature sums (for the
  fleet-wide normalisation; only sums leave the gateway, never a record).
* ``train``: take the model the server sent (in full, or as a delta against the one
  kept from last round in ``context.state``), train ``local-epochs`` on the plant's
  windows, reply with the encoded update (new weights minus the start, through the
  configured codec; top-k's residual stays in ``context.state``), ``num-examples``
  (the FedAvg weight) and timings. Contract: ``strategies/codec_fedavg.py``.
* ``evaluate``: score the global model on the plant's held-out units.

Which plant a node is comes from its node config (``partition-id``, or
``data-path`` for a gateway with its own files); the task and data settings from
the run config; training hyper-parameters from each train message.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from iiotfl.clients.training import train_local, train_local_dp
from iiotfl.configs import from_run_config
from iiotfl.privacy.accounting import DeviceAccountant, noise_for_target, steps_per_round
from iiotfl.strategies import he
from iiotfl.strategies.codec_fedavg import encoded_record, record_arrays
from iiotfl.strategies.he_fedavg import digest, verified_payload
from iiotfl.strategies.codecs import ErrorFeedback, flatten, get_codec, unflatten
from iiotfl.tasks import get_task

app = ClientApp()


def _process_started() -> float:
    """Wall-clock time this process (Flower starts one per message) was created."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _plant(context: Context):
    """(config, task, local train split, local validation split, partition id)."""
    cfg, _ = from_run_config(context.run_config)
    torch.set_num_threads(int(context.node_config.get("torch-threads", cfg["train"]["torch_threads"])))
    task = get_task(cfg["task"], cfg["seed"])
    partition = int(context.node_config.get("partition-id", 0))
    train, val = task.gateway_data(partition, context.node_config)
    return cfg, task, train, val, partition


def _normaliser(task, config: ConfigRecord):
    cols = int(config["norm-cols"])
    sums = np.asarray(config["norm-sums"], dtype=float).reshape(-1, cols)
    return task.normaliser(sums)


def _device_keys(cfg, context: Context) -> he.KeySet:
    """This gateway's HE key set: node config ``he-key``, else ``<strategy.keys>/device.he``."""
    path = context.node_config.get("he-key") or os.path.join(str(cfg["strategy"].get("keys") or ""), he.DEVICE_FILE)
    keys = he.KeySet.load(path)
    if not keys.can_decrypt:
        raise he.HEError(f"{path} has no secret key; a gateway needs device.he from `iiotfl keys`")
    return keys


def _encrypted(payload: bytes, keys: he.KeySet, key: str) -> dict:
    return {key: ArrayRecord({"ct": Array(np.frombuffer(payload, dtype=np.uint8))}),
            "he": ConfigRecord({"fingerprint": keys.fingerprint, "digest": digest(payload)})}


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    """Per-condition (count, sum, sum of squares). Under strategy=he only their encrypted,
    exact fixed-point limbs leave the gateway (the server learns the fleet's sum only)."""
    cfg, task, train, _, partition = _plant(context)
    sums = task.feature_sums(train)
    examples = len(task.windows(train, task.normaliser(sums))[1])  # the FedAvg weight, public anyway
    gateway = MetricRecord({"partition": partition, "num-examples": examples, "rows": int(sums.shape[0]),
                            "cols": int(sums.shape[1])})
    if cfg["strategy"]["name"] == "he":
        keys = _device_keys(cfg, context)
        reply = RecordDict({**_encrypted(keys.encrypt_slots(he.to_limbs(sums)), keys, "stats-he"), "gateway": gateway})
    else:
        reply = RecordDict({"stats": ArrayRecord(numpy_ndarrays=[sums]), "gateway": gateway})
    return Message(content=reply, reply_to=msg)


@app.query("he_decrypt")
def he_decrypt(msg: Message, context: Context) -> Message:
    """Decrypt a *sum* of encrypted updates or statistics (never fewer than min-aggregate)."""
    cfg, _ = from_run_config(context.run_config)
    config = msg.content["config"]
    keys = _device_keys(cfg, context)
    if int(config["contributors"]) < max(2, int(config["min-aggregate"])):
        raise he.HEError(f"asked to decrypt a sum of {config['contributors']} update(s); this gateway decrypts only "
                         f"sums of at least {max(2, int(config['min-aggregate']))}")
    payload = verified_payload(msg.content["sum"], config, keys.fingerprint)
    slots = keys.decrypt_slots(payload)
    return Message(content=RecordDict({"slots": ArrayRecord({"slots": Array(slots)})}), reply_to=msg)


def _he_update(cfg, context: Context, config: ConfigRecord, update: np.ndarray, view, rng) -> tuple[dict, dict]:
    """Clip and noise (client-level DP), quantise, pack and encrypt this round's update."""
    keys = _device_keys(cfg, context)
    if config.get("he-fingerprint") != keys.fingerprint:
        raise he.HEError(f"the server uses key set {config.get('he-fingerprint')}, this gateway's device.he is "
                         f"{keys.fingerprint}; give it the fleet's device.he")
    update, extra = _noised(update, config, rng)  # distributed DP: clip, add this gateway's noise share
    ranges = he.element_ranges(config["he-ranges"], view)
    payload, saturated = he.encrypt_update(keys, update, ranges, float(config["he-weight"]), rng)
    return _encrypted(payload, keys, "he-update"), {"he-saturated": saturated, **extra}


def _start_view(msg: Message, context: Context, codec) -> dict[str, np.ndarray]:
    """The model this round starts from: the full model sent, or last round's plus the delta."""
    state = context.state
    if "arrays" in msg.content:
        view = record_arrays(msg.content["arrays"])
    else:
        base_round = int(msg.content["config"]["base-round"])
        held = int(state["view-meta"]["round"]) if "view-meta" in state else -1
        if held != base_round:
            raise RuntimeError(f"delta against round {base_round}, but this gateway holds round {held}")
        base = record_arrays(state["view"])
        diff = codec.decode(record_arrays(msg.content["delta"]), sum(v.size for v in base.values()))
        view = unflatten(flatten(base) + diff, base)
    state["view"] = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in view.items()})
    state["view-meta"] = ConfigRecord({"round": int(msg.content["config"]["server-round"])})
    return view


def _sample_dp(cfg, context: Context, records: int, config: ConfigRecord, partition: int):
    """Sample-level DP settings of this round on this device: (accountant, sigma, q, steps, budget).

    The budget is the plant's own when its gateway's node config sets ``privacy-budget``,
    else ``privacy.device_budgets[partition]``, else ``privacy.budget``, else the target ε."""
    priv = cfg["privacy"]
    delta = float(priv.get("delta") or 1.0 / (10 * records))
    q, steps = steps_per_round(records, int(config["batch-size"]), int(config["local-epochs"]))
    history = []
    if "dp" in context.state:
        rec = context.state["dp"]
        history = list(zip(rec["sigma"], rec["q"], rec["steps"]))
    accountant = DeviceAccountant(delta, [(float(a), float(b), int(c)) for a, b, c in history])
    if priv.get("noise_multiplier"):
        sigma = float(priv["noise_multiplier"])
    else:  # spend the target over every round of the run
        sigma = noise_for_target(float(priv["epsilon"]), delta, q, steps * int(cfg["fleet"]["rounds"]))
    own = (priv.get("device_budgets") or {})
    budget = (context.node_config.get("privacy-budget") or own.get(str(partition)) or own.get(partition)
              or priv.get("budget") or priv.get("epsilon"))
    return accountant, sigma, q, steps, float(budget) if budget else float("inf")


def _save_dp(context: Context, accountant: DeviceAccountant) -> None:
    h = accountant.history
    context.state["dp"] = ConfigRecord({"sigma": [float(a) for a, _, _ in h], "q": [float(b) for _, b, _ in h],
                                        "steps": [int(c) for _, _, c in h]})


def _client_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping mod, when the server's DP wrapper asks for it."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if KEY_CLIPPING_NORM in msg.content.config_records.get("config", {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secagg(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ mod, for the messages of a SecAgg+ round (strategy=secagg)."""
    from flwr.client.mod import secaggplus_mod

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _noised(update: np.ndarray, config, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Client-level DP inside secure aggregation: clip to ``he-dp-clip``, add this gateway's noise share."""
    if "he-dp-clip" not in config:
        return update, {}
    clip, sigma = float(config["he-dp-clip"]), float(config["he-dp-sigma"])
    norm = float(np.linalg.norm(update))
    update = update * min(1.0, clip / max(norm, 1e-12)) + rng.normal(0.0, sigma, update.shape)
    return update, {"dp-clip": clip, "dp-norm": norm, "dp-share-sigma": sigma}


def _secagg_fit(msg: Message, context: Context, started: float) -> Message:
    """A SecAgg+ round's training step (Flower's legacy fit format, which SecAgg+ masks)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

    cfg, task, data, _, partition = _plant(context)
    config = msg.content.config_records["fitins.config"]  # lists (normalisation sums) need the record itself
    parameters = arrayrecord_to_parameters(msg.content.array_records["fitins.parameters"], keep_input=True)
    model = task.build_model()
    names = list(model.state_dict().keys())
    view = dict(zip(names, parameters_to_ndarrays(parameters)))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in view.items()})
    x, y = task.windows(data, _normaliser(task, config))
    server_round = int(config["server-round"])
    stats = train_local(model, x, task.target(y), epochs=int(config["local-epochs"]),
                        batch_size=int(config["batch-size"]), lr=float(config["lr"]),
                        seed=hash((cfg["seed"], partition, server_round)) % 2**31, loss_fn=task.loss())
    stats.update(_poison(model, view, cfg, context, partition))
    base = flatten(view)
    update = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()}) - base
    update, extra = _noised(update, config, np.random.default_rng([cfg["seed"], partition, server_round]))
    weights = base + update
    clip_range = float(cfg["strategy"]["clipping_range"])
    # SecAgg+ scales every weight by num-examples / max_weight before quantising: report
    # max_weight itself under DP (equal weights, what the accountant assumes) and otherwise
    # the count scaled so the largest gateway is at max_weight (full quantisation precision)
    max_weight = float(cfg["strategy"]["max_weight"])
    examples = int(max_weight if extra else min(max_weight, len(y) * float(config.get("secagg-weight-scale", 1.0))))
    metrics = {**stats, **extra, "partition": partition, "num-examples": len(y),
               "secagg-saturated": float(np.mean(np.abs(weights) > clip_range)),
               "t-proc": _process_started(), "t-start": started,
               "bytes-down": sum(len(t) for t in parameters.tensors),
               # SecAgg+ sends int64 masked integers: 8 bytes per weight, plus the weight factor
               "bytes-up": 8 * (weights.size + 1) + 128 * (len(view) + 1),
               "objects-down": 2 + len(msg.content) + len(view), "objects-up": 4, "t-end": time.time()}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(unflatten(weights, view).values())), examples,
                 {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    content = fitres_to_recorddict(res, keep_input=True)
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def _poison(model: torch.nn.Module, view: dict, cfg, context: Context, partition: int) -> dict:
    """``fleet.poison``: replace this gateway's update u by factor x u (``scale``) or -factor x u
    (``sign_flip``) before it is encoded, by moving the trained model to view + that. Settings: the
    node config's ``poison`` / ``poison-factor`` (engine=fleet sets them, as ``crash-round``), else
    the run config's ``fleet.poison`` for this partition (Flower's simulation engine gives virtual
    nodes only partition-id and num-partitions). Returns the reply's metrics: "poisoned" 1 or 0 (every
    gateway reports it: Flower's strategies refuse replies whose metric keys differ)."""
    poison = cfg["fleet"].get("poison") or {}
    if "poison" in context.node_config:
        kind, factor = str(context.node_config["poison"]), float(context.node_config.get("poison-factor", 10.0))
    elif partition in (poison.get("gateways") or []):
        kind, factor = str(poison.get("kind", "none")), float(poison.get("factor", 10.0))
    else:
        kind, factor = "none", 1.0
    if kind == "none":
        return {"poisoned": 0}
    if kind not in ("scale", "sign_flip"):
        raise ValueError(f"poison={kind!r} is unknown; use none, scale or sign_flip")
    scale = -factor if kind == "sign_flip" else factor
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                start = torch.from_numpy(np.asarray(view[name], dtype=np.float32)).to(tensor.dtype)
                tensor.copy_(start + scale * (tensor - start))
    return {"poisoned": 1}


def _crash_if_asked(msg: Message, context: Context) -> None:
    """``fleet.crash``: fail this round after receiving its train message (a gateway dying mid-round)."""
    cfgrec = msg.content.config_records.get("config") or msg.content.config_records.get("fitins.config") or {}
    crash = int(context.node_config.get("crash-round", 0) or 0)
    if crash and int(cfgrec.get("server-round", -1)) == crash:
        raise RuntimeError(f"fault injection: this gateway fails in round {crash} (fleet.crash)")


@app.train(mods=[_client_clipping, _secagg])
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    _crash_if_asked(msg, context)
    if "fitins.config" in msg.content.config_records:
        return _secagg_fit(msg, context, started)
    cfg, task, data, _, partition = _plant(context)
    config = msg.content["config"]
    codec = get_codec(cfg.get("codec"))
    privacy = (cfg.get("privacy") or {}).get("name", "none")
    bytes_down = sum(rec.count_bytes() for key, rec in msg.content.array_records.items())
    view = _start_view(msg, context, codec)
    model = task.build_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in view.items()})
    x, y = task.windows(data, _normaliser(task, config))
    server_round = int(config["server-round"])
    seed = hash((cfg["seed"], partition, server_round)) % 2**31
    common = dict(epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
                  lr=float(config["lr"]), seed=seed, loss_fn=task.loss())
    dp: dict[str, float] = {}
    if privacy == "sample":
        accountant, sigma, q, steps, budget = _sample_dp(cfg, context, len(y), config, partition)
        dp = {"dp-sigma": sigma, "dp-clip": float(cfg["privacy"]["max_grad_norm"]), "dp-delta": accountant.delta,
              "dp-budget": budget}
        if accountant.would_exceed(budget, sigma, q, steps):
            spent = accountant.epsilon()
            metrics = {"partition": partition, "num-examples": len(y), "dp-stopped": 1, "dp-epsilon": spent,
                       "dp-budget-left": budget - spent, **dp, "t-start": started, "t-end": time.time()}
            return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        stats = train_local_dp(model, x, task.target(y), noise_multiplier=sigma,
                               max_grad_norm=float(cfg["privacy"]["max_grad_norm"]), **common)
        accountant.history.append((sigma, float(stats.pop("sample_rate")), int(stats.pop("steps"))))
        _save_dp(context, accountant)
        eps = accountant.epsilon()
        dp.update({"dp-epsilon": eps, "dp-budget-left": budget - eps, "dp-q": accountant.history[-1][1],
                   "dp-steps": accountant.history[-1][2]})
    else:
        stats = train_local(model, x, task.target(y), **common)
    stats.update(_poison(model, view, cfg, context, partition))  # fleet.poison: a poisoned gateway's update
    timing = {"partition": partition, "t-proc": _process_started(), "t-start": started}
    if privacy == "client" and cfg["strategy"]["name"] == "fedavg":
        # Flower's DP wrappers clip and average full weights, every gateway with equal weight
        arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()})
        metrics = MetricRecord({**stats, **timing, "num-examples": len(y), "dp-weight": 1, "bytes-down": bytes_down,
                                "bytes-up": arrays.count_bytes(), "objects-down": 2 + len(msg.content) + len(view),
                                "objects-up": 4 + len(arrays), "t-end": time.time()})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    # The update leaves the device encoded (the DP noise is already in it).
    update = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()}) - flatten(view)
    rng = np.random.default_rng([cfg["seed"], partition, server_round])
    if cfg["strategy"]["name"] == "he":
        records, extra = _he_update(cfg, context, config, update, view, rng)
        metrics = MetricRecord({**stats, **dp, **timing, **extra, "num-examples": len(y), "bytes-down": bytes_down,
                                "bytes-up": records["he-update"].count_bytes(),
                                "objects-down": 2 + len(msg.content) + sum(len(r) for r in
                                                                           msg.content.array_records.values()),
                                "objects-up": 2 + 3 + 1, "t-end": time.time()})
        return Message(content=RecordDict({**records, "metrics": metrics}), reply_to=msg)
    if (cfg.get("codec") or {}).get("error_feedback"):
        residual = context.state["residual"].to_numpy_ndarrays()[0] if "residual" in context.state else None
        feedback = ErrorFeedback(codec, residual)
        enc = feedback.encode(update, rng)
        context.state["residual"] = ArrayRecord(numpy_ndarrays=[feedback.residual])
        residual_norm = float(np.linalg.norm(feedback.residual))
    else:
        enc = codec.encode(update, rng)
        residual_norm = 0.0
    record = encoded_record(enc)
    metrics = MetricRecord(
        {
            **stats,
            **dp,
            **timing,
            "num-examples": len(y),
            "bytes-down": bytes_down,
            "bytes-up": record.count_bytes(),
            # Flower objects each way (message, RecordDict, records, arrays): one request each
            "objects-down": 2 + len(msg.content) + sum(len(r) for r in msg.content.array_records.values()),
            "objects-up": 2 + 2 + len(record),
            "t-end": time.time(),
            "residual-norm": residual_norm,
        }
    )
    return Message(content=RecordDict({"update": record, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, task, _, val, _ = _plant(context)
    model = task.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    scores = task.evaluate(model, val, _normaliser(task, msg.content["config"]))
    return Message(content=RecordDict({"metrics": MetricRecord(scores)}), reply_to=msg)
