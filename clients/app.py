"""The ClientApp: what a plant gateway does with each message from the server.

* ``query.feature_stats``: reply with this plant's per-condition feature sums (for the
  fleet-wide normalisation; only sums leave the gateway, never a record).
* ``train``: take the model the server sent (in full, or as a delta against the one
  kept from last round in ``context.state``), train ``local-epochs`` on the plant's
  windows, reply with the encoded update (new weights minus the start, through the
  configured codec; top-k's residual stays in ``context.state``), ``num-examples``
  (the FedAvg weight) and timings. Contract: ``strategies/codec_fedavg.py``.
* ``evaluate``: score the global model on the plant's held-out units.

Which plant a node is comes from its node config (``partition-id``; ``data-spec``, the
gateway's own description of its data, ``clients/sources``; or ``data-path``, a file in the
run config's schema); the task from the run config; training hyper-parameters from each
train message.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from iiotfl.clients import scaffold
from iiotfl.clients.poison import poison
from iiotfl.clients.processes import started_at
from iiotfl.clients.sources import gateway_records
from iiotfl.clients.training import train_local, train_local_dp
from iiotfl.compat.flower import (
    KEY_CLIPPING_NORM,
    RECORD_KEY_CONFIGS,
    arrayrecord_to_parameters,
    fitres_to_recorddict,
    secaggplus_mod,
    task_pull_times,
)
from iiotfl.configs import RunSettings, from_run_config
from iiotfl.privacy.accounting import DeviceAccountant, noise_for_target, steps_per_round
from iiotfl.privacy.modes import privacy_mode
from iiotfl.strategies import he, strategy_spec, wire
from iiotfl.strategies.client_dp import client_level
from iiotfl.strategies.codec_fedavg import encoded_record, record_arrays
from iiotfl.strategies.codecs import ErrorFeedback, flatten, get_codec, unflatten, weights_digest
from iiotfl.strategies.he_fedavg import Sent, Unbound, bound_sum, checked_slots, digest
from iiotfl.strategies.mask_fedavg import key_reply, unmask_reply
from iiotfl.tasks import get_task

app = ClientApp()


def _plant(context: Context):
    """(config, task, local train split, local validation split, partition id)."""
    settings = from_run_config(context.run_config)
    cfg = settings.cfg
    torch.set_num_threads(int(context.node_config.get("torch-threads", cfg["train"]["torch_threads"])))
    task = get_task(cfg["task"], cfg["seed"])
    partition = int(context.node_config.get("partition-id", 0))
    # data-spec: the gateway's own description of its data (a CSV export or its live sources' store)
    train, val = task.gateway_data(partition, context.node_config,
                                   gateway_records(task, context.node_config, partition))
    return settings, task, train, val, partition


def _normaliser(task, config: ConfigRecord):
    cols = wire.as_int(config[wire.NORM_COLS])
    sums = np.asarray(config[wire.NORM_SUMS], dtype=float).reshape(-1, cols)
    return task.normaliser(sums)


def _device_keys(settings: RunSettings, context: Context) -> he.KeySet:
    """This gateway's HE key set: node config ``he-key``, else ``device.he`` in the key directory the
    launcher provisioned, else in ``strategy.keys``."""
    folder = settings.he_keys or settings.cfg["strategy"].get("keys") or ""
    path = context.node_config.get("he-key") or os.path.join(str(folder), he.DEVICE_FILE)
    keys = he.KeySet.load(cast(str, path))  # a node config value; he-key is a path
    if not keys.can_decrypt:
        raise he.HEError(f"{path} has no secret key; a gateway needs device.he from `iiotfl keys`")
    return keys


def _sent(context: Context) -> Sent | None:
    """What this gateway last encrypted in this run (``context.state``, which the SuperNode keeps per run)."""
    return Sent.from_record(wire.config_record(context.state, "he-sent")) if "he-sent" in context.state else None


def _own_minimum(settings: RunSettings, context: Context) -> int:
    """The fewest contributions this gateway decrypts a sum of: its node config ``he-min-aggregate`` or the
    run's ``strategy.min_aggregate``, whichever is larger, and at least 2; never what the server's request says."""
    own = int(cast(int, context.node_config.get("he-min-aggregate", 0)) or 0)
    return max(2, own, int(settings.cfg["strategy"].get("min_aggregate") or 2))


def _encrypted(payload: bytes, keys: he.KeySet, key: str, context: Context, kind: str, server_round: int,
               values: int) -> dict:
    """The ciphertext record and its meta: key set, digest and the binding to (kind, run, round, this node).
    What was sent is kept in ``context.state``: the one sum this gateway may decrypt this round."""
    old = _sent(context)
    again = old is not None and old.decrypted and (old.kind, old.server_round) == (kind, server_round)
    sent = Sent(kind, server_round, digest(payload), len(payload) // he.CT_BYTES, values, decrypted=again)
    context.state["he-sent"] = sent.record()
    meta = ConfigRecord({wire.FINGERPRINT: keys.fingerprint, wire.DIGEST: sent.digest, wire.KIND: kind,
                         wire.RUN_ID: str(context.run_id), wire.SERVER_ROUND: server_round,
                         wire.NODE_ID: str(context.node_id),
                         wire.TAG: keys.bind(kind, context.run_id, server_round, context.node_id, payload)})
    return {key: ArrayRecord({wire.CT: Array(np.frombuffer(payload, dtype=np.uint8))}), wire.HE: meta}


def _he_stats(settings: RunSettings, context: Context, sums: np.ndarray, kind: str) -> dict:
    """The statistics' exact fixed-point limbs, encrypted and bound to round 0 of this run and their pass."""
    keys = _device_keys(settings, context)
    return _encrypted(keys.encrypt_slots(he.to_limbs(sums)), keys, wire.STATS_HE, context, kind,
                      wire.STATS_ROUND, int(sums.size))


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    """Per-condition (count, sum, M2) (tasks/moments.py). Under strategy=he only their encrypted,
    exact fixed-point limbs leave the gateway (the server learns the fleet's sum only), in two
    passes: counts and sums, then squared deviations from the fleet's centre the query carries."""
    settings, task, train, _, partition = _plant(context)
    sums = task.feature_sums(train)
    examples = len(task.windows(train, task.normaliser(sums))[1])  # the FedAvg weight, public anyway
    gateway = MetricRecord({"partition": partition, wire.NUM_EXAMPLES: examples, wire.ROWS: int(sums.shape[0]),
                            wire.COLS: int(sums.shape[1])})
    if strategy_spec(settings.cfg).needs_keys:  # strategy=he: the statistics leave encrypted
        sent = wire.config_record(msg.content, "config").get(wire.NORM_CENTRE)
        k = (sums.shape[1] - 1) // 2
        if sent is None:  # first pass: counts and sums only
            sums[:, 1 + k:] = 0.0
            kind = wire.HE_KIND_STATS
        else:
            centre = np.asarray(sent, dtype=np.float64)
            if centre.size != sums.shape[0] * k or not np.isfinite(centre).all():
                raise he.HEError(f"the statistics query's centre has {centre.size} values, this task's statistics "
                                 f"need {sums.shape[0] * k} finite ones; refused")
            sums, kind = task.feature_sums(train, centre.reshape(sums.shape[0], k)), wire.HE_KIND_CENTRED
        reply = RecordDict({**_he_stats(settings, context, sums, kind), wire.GATEWAY: gateway})
    else:
        reply = RecordDict({wire.STATS: ArrayRecord(numpy_ndarrays=[sums]), wire.GATEWAY: gateway})
    return Message(content=reply, reply_to=msg)


@app.query("he_decrypt")
def he_decrypt(msg: Message, context: Context) -> Message:
    """Decrypt the sum of this round's bound contributions: once a round, only if this gateway's own is in
    and there are at least its own minimum (checks: ``strategies/he_fedavg.py``). Contributions whose
    binding fails are named in a ``refused`` reply; any other refusal raises HEError."""
    settings = from_run_config(context.run_config)
    keys, sent = _device_keys(settings, context), _sent(context)
    try:
        total, devices = bound_sum(msg.content, keys, context.run_id, context.node_id, sent,
                                   _own_minimum(settings, context))
    except Unbound as err:
        refused = ConfigRecord({wire.NODES: [str(n) for n in err.nodes], wire.REASON: str(err)})
        return Message(content=RecordDict({wire.REFUSED: refused}), reply_to=msg)
    assert sent is not None, "bound_sum refuses a gateway that sent nothing"
    slots = checked_slots(keys.decrypt_slots(total), sent, devices)
    context.state["he-sent"] = replace(sent, decrypted=True).record()
    return Message(content=RecordDict({wire.SLOTS: ArrayRecord({wire.SLOTS: Array(slots)})}), reply_to=msg)


@app.query("mask_keys")
def mask_keys(msg: Message, context: Context) -> Message:
    """strategy=mask: this run's public keys, made now from OS entropy if the run has none yet."""
    return Message(content=key_reply(context, msg.metadata.run_id), reply_to=msg)


@app.query("mask_unmask")
def mask_unmask(msg: Message, context: Context) -> Message:
    """strategy=mask: this survivor's shares and the dropped pairs' seeds, once a round, after its own
    checks (``strategies/mask_fedavg.py``)."""
    cfg = from_run_config(context.run_config).cfg
    return Message(content=unmask_reply(msg.content, context, cfg, msg.metadata.run_id), reply_to=msg)


def _he_update(settings: RunSettings, context: Context, config: ConfigRecord, update: np.ndarray, view,
               rng) -> tuple[dict, dict]:
    """Clip and noise (client-level DP), quantise, pack and encrypt this round's update."""
    keys = _device_keys(settings, context)
    if config.get(wire.HE_FINGERPRINT) != keys.fingerprint:
        raise he.HEError(f"the server uses key set {wire.as_str(config.get('he-fingerprint'))}, this gateway's "
                         f"device.he is {keys.fingerprint}; give it the fleet's device.he")
    update, extra = _noised(update, config, rng)  # distributed DP: clip, add this gateway's noise share
    ranges = he.element_ranges(config[wire.HE_RANGES], view)
    payload, saturated = he.encrypt_update(keys, update, ranges, wire.as_float(config[wire.HE_WEIGHT]), rng)
    records = _encrypted(payload, keys, wire.HE_UPDATE, context, wire.HE_KIND_UPDATE,
                         wire.as_int(config[wire.SERVER_ROUND]), int(update.size))
    return records, {wire.HE_SATURATED: saturated, **extra}


def _start_view(msg: Message, context: Context, codec, build) -> dict[str, np.ndarray]:
    """The model this round starts from: the full model sent, the task's seeded model (``build``) the server
    named by its digest, or last round's plus the delta."""
    state = context.state
    config = wire.config_record(msg.content, "config")
    if "arrays" in msg.content:
        view = record_arrays(wire.array_record(msg.content, "arrays"))
    elif wire.SEEDED_START in config:
        view = {k: v.detach().numpy().astype(np.float32) for k, v in build().state_dict().items()}
        if weights_digest(view) != wire.as_str(config[wire.SEEDED_START]):
            raise RuntimeError("this gateway's seeded initial model differs from the server's (another torch or "
                               "iiotfl version?); install the fleet's versions (pyproject.toml pins torch)")
    else:
        base_round = wire.as_int(config[wire.BASE_ROUND])
        held = wire.as_int(wire.config_record(state, "view-meta")["round"]) if "view-meta" in state else -1
        base = record_arrays(wire.array_record(state, "view")) if "view" in state else {}
        if held == wire.as_int(config[wire.SERVER_ROUND]) and held > base_round:
            view = base  # this round's message sent again after an outage: its delta is already applied
        elif held != base_round:
            raise RuntimeError(f"delta against round {base_round}, but this gateway holds round {held}")
        else:
            diff = codec.for_downlink().decode(record_arrays(wire.array_record(msg.content, "delta")),
                                               sum(v.size for v in base.values()))
            view = unflatten(flatten(base) + diff, base)
    state["view"] = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in view.items()})
    state["view-meta"] = ConfigRecord({"round": wire.as_int(config[wire.SERVER_ROUND])})
    return view


def _sample_dp(cfg, context: Context, records: int, config: ConfigRecord, partition: int):
    """Sample-level DP settings of this round on this device: (accountant, sigma, q, steps, budget).

    The budget is the plant's own when its gateway's node config sets ``privacy-budget``,
    else ``privacy.device_budgets[partition]``, else ``privacy.budget``, else the target ε."""
    priv = cfg["privacy"]
    delta = float(priv.get("delta") or 1.0 / (10 * records))
    q, steps = steps_per_round(records, wire.as_int(config[wire.BATCH_SIZE]), wire.as_int(config[wire.LOCAL_EPOCHS]))
    history: list[tuple[float, float, int]] = []
    if "dp" in context.state:
        rec = wire.config_record(context.state, "dp")
        history = list(zip(wire.as_floats(rec["sigma"]), wire.as_floats(rec["q"]), wire.as_ints(rec["steps"])))
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
    if KEY_CLIPPING_NORM in msg.content.config_records.get("config", {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secagg(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ mod, for the messages of a SecAgg+ round (strategy=secagg)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _noised(update: np.ndarray, config, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Client-level DP inside secure aggregation: clip to ``he-dp-clip``, add this gateway's noise share."""
    if wire.HE_DP_CLIP not in config:
        return update, {}
    clip, sigma = float(config[wire.HE_DP_CLIP]), float(config[wire.HE_DP_SIGMA])
    norm = float(np.linalg.norm(update))
    update = update * min(1.0, clip / max(norm, 1e-12)) + rng.normal(0.0, sigma, update.shape)
    return update, {wire.DP_CLIP: clip, "dp-norm": norm, "dp-share-sigma": sigma}


def _secagg_fit(msg: Message, context: Context, started: float) -> Message:
    """A SecAgg+ round's training step (Flower's legacy fit format, which SecAgg+ masks)."""
    settings, task, data, _, partition = _plant(context)
    cfg = settings.cfg
    config = msg.content.config_records["fitins.config"]  # lists (normalisation sums) need the record itself
    parameters = arrayrecord_to_parameters(msg.content.array_records["fitins.parameters"], keep_input=True)
    model = task.build_model()
    names = list(model.state_dict().keys())
    view = dict(zip(names, parameters_to_ndarrays(parameters)))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in view.items()})
    x, y = task.windows(data, _normaliser(task, config))
    server_round = wire.as_int(config[wire.SERVER_ROUND])
    stats = train_local(model, x, task.target(y), epochs=wire.as_int(config[wire.LOCAL_EPOCHS]),
                        batch_size=wire.as_int(config[wire.BATCH_SIZE]), lr=wire.as_float(config["lr"]),
                        seed=hash((cfg["seed"], partition, server_round)) % 2**31, loss_fn=task.loss(),
                        optimizer=wire.as_str(config.get(wire.OPTIMIZER, "adam")),
                        momentum=wire.as_float(config.get(wire.MOMENTUM, 0.0)))
    stats.pop("local_steps")
    stats.update(poison(model, view, cfg, context, partition))
    base = flatten(view)
    update = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()}) - base
    update, extra = _noised(update, config, np.random.default_rng([cfg["seed"], partition, server_round]))
    weights = base + update
    clip_range = float(cfg["strategy"]["clipping_range"])
    # SecAgg+ scales every weight by num-examples / max_weight before quantising: report
    # max_weight itself under DP (equal weights, what the accountant assumes) and otherwise
    # the count scaled so the largest gateway is at max_weight (full quantisation precision)
    max_weight = float(cfg["strategy"]["max_weight"])
    examples = int(max_weight if extra
                   else min(max_weight, len(y) * wire.as_float(config.get(wire.SECAGG_WEIGHT_SCALE, 1.0))))
    metrics = {**stats, **extra, "partition": partition, wire.NUM_EXAMPLES: len(y),
               wire.SECAGG_SATURATED: float(np.mean(np.abs(weights) > clip_range)),
               wire.T_PROC: started_at(), wire.T_START: started, **_pull_times(),
               wire.BYTES_DOWN: sum(len(t) for t in parameters.tensors),
               # SecAgg+ sends int64 masked integers: 8 bytes per weight, plus the weight factor
               wire.BYTES_UP: 8 * (weights.size + 1) + 128 * (len(view) + 1),
               wire.OBJECTS_DOWN: 2 + len(msg.content) + len(view), wire.OBJECTS_UP: 4, wire.T_END: time.time()}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(unflatten(weights, view).values())), examples,
                 {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    content = fitres_to_recorddict(res, keep_input=True)
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def _pull_times() -> dict[str, float]:
    """When this task's process pulled its message (warm runtime only): the round's time split."""
    times = task_pull_times()
    return {} if times is None else {wire.T_PULL: times[0], wire.T_PULLED: times[1]}


def _crash_if_asked(msg: Message, context: Context) -> None:
    """``fleet.crash``: fail this round after receiving its train message (a gateway dying mid-round)."""
    records = msg.content.config_records
    cfgrec: ConfigRecord | dict[str, int] = records.get("config") or records.get("fitins.config") or {}
    crash = int(context.node_config.get("crash-round", 0) or 0)
    if crash and wire.as_int(cfgrec.get(wire.SERVER_ROUND, -1)) == crash:
        if context.node_config.get("crash-kind") == "kill":  # the task's process dies, nothing is replied
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injection: this gateway fails in round {crash} (fleet.crash)")


def _train_dp(settings: RunSettings, context: Context, model, x, y, task, config, partition: int,
              common: dict) -> tuple[dict | None, dict]:
    """privacy=sample: DP-SGD within this device's budget. (training stats or None if the budget is
    spent, the dp-* metrics: with the device's whole DP-SGD history, so the server can recompute its
    ε even when an earlier reply came late or never)."""
    cfg = settings.cfg
    accountant, sigma, q, steps, budget = _sample_dp(cfg, context, len(y), config, partition)
    dp = {wire.DP_SIGMA: sigma, wire.DP_CLIP: float(cfg["privacy"]["max_grad_norm"]), wire.DP_DELTA: accountant.delta,
          wire.DP_BUDGET: budget}

    def history() -> dict[str, list]:
        # steps so far per (sigma, q), padded with zero steps to fleet.rounds entries: Flower averages
        # a list metric element-wise over the replies it aggregates, which must all be the same length
        totals = accountant.totals()
        totals += [(0.0, 0.0, 0)] * (int(cfg["fleet"]["rounds"]) - len(totals))
        return {wire.DP_HISTORY_SIGMA: [a for a, _, _ in totals], wire.DP_HISTORY_Q: [b for _, b, _ in totals],
                wire.DP_HISTORY_STEPS: [c for _, _, c in totals]}

    if accountant.would_exceed(budget, sigma, q, steps):
        spent = accountant.epsilon()
        return None, {**dp, **history(), wire.DP_STOPPED: 1, wire.DP_EPSILON: spent,
                      wire.DP_BUDGET_LEFT: budget - spent}
    stats = train_local_dp(model, x, task.target(y), noise_multiplier=sigma,
                           max_grad_norm=float(cfg["privacy"]["max_grad_norm"]), **common)
    accountant.history.append((sigma, float(stats.pop("sample_rate")), int(stats.pop("steps"))))
    _save_dp(context, accountant)
    eps = accountant.epsilon()
    dp.update({wire.DP_EPSILON: eps, wire.DP_BUDGET_LEFT: budget - eps, wire.DP_Q: accountant.history[-1][1],
               wire.DP_STEPS: accountant.history[-1][2], **history()})
    return stats, dp


def _objects_down(msg: Message) -> int:
    """Flower objects of the train message (message, RecordDict, records, arrays): one request each."""
    return 2 + len(msg.content) + sum(len(r) for r in msg.content.array_records.values())


def _encoded_reply(msg: Message, context: Context, cfg, codec, update: np.ndarray, rng, metrics: dict) -> Message:
    """The update encoded by the run's codec (with error feedback when the codec keeps a residual)."""
    if cfg["codec"].get("error_feedback"):
        state = context.state

        def kept(key: str) -> np.ndarray | None:
            return wire.array_record(state, key).to_numpy_ndarrays()[0] if key in state else None

        feedback = ErrorFeedback(codec, kept("residual"), kept("velocity"), float(cfg["codec"].get("momentum") or 0.0))
        enc = feedback.encode(update, rng)
        assert feedback.residual is not None, "ErrorFeedback.encode sets the residual"
        context.state["residual"] = ArrayRecord(numpy_ndarrays=[feedback.residual])
        if feedback.velocity is not None:
            context.state["velocity"] = ArrayRecord(numpy_ndarrays=[feedback.velocity])
        residual_norm = float(np.linalg.norm(feedback.residual))
    else:
        enc = codec.encode(update, rng)
        residual_norm = 0.0
    record = encoded_record(enc)
    reply = MetricRecord({**metrics, wire.BYTES_UP: record.count_bytes(), wire.OBJECTS_DOWN: _objects_down(msg),
                          wire.OBJECTS_UP: 2 + 2 + len(record), wire.T_END: time.time(),
                          wire.RESIDUAL_NORM: residual_norm})
    return Message(content=RecordDict({wire.UPDATE: record, "metrics": reply}), reply_to=msg)


def _reply(msg: Message, context: Context, settings: RunSettings, model, view, config, metrics: dict,
           codec) -> Message:
    """What leaves the device: full weights (Flower's DP wrappers), ciphertexts (he) or the encoded update."""
    cfg = settings.cfg
    spec = strategy_spec(cfg)
    if client_level(cfg) and spec.client_dp == "wrappers":
        # Flower's DP wrappers clip and average full weights, every gateway with equal weight
        arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()})
        reply = MetricRecord({**metrics, wire.DP_WEIGHT: 1, wire.BYTES_UP: arrays.count_bytes(),
                              wire.OBJECTS_DOWN: 2 + len(msg.content) + len(view), wire.OBJECTS_UP: 4 + len(arrays),
                              wire.T_END: time.time()})
        return Message(content=RecordDict({"arrays": arrays, "metrics": reply}), reply_to=msg)
    # The update leaves the device encoded (the DP noise is already in it).
    update = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()}) - flatten(view)
    rng = np.random.default_rng([cfg["seed"], metrics["partition"], int(config[wire.SERVER_ROUND])])
    if spec.needs_keys:  # strategy=he: packed ciphertexts under the fleet's key set
        records, extra = _he_update(settings, context, config, update, view, rng)
        return _secure_reply(msg, records, {**metrics, **extra}, records[wire.HE_UPDATE].count_bytes())
    if spec.device_update is not None:  # strategy=mask: masked k-bit words and sealed shares
        update, extra = _noised(update, config, rng)  # distributed DP: clip, add this gateway's noise share
        records, more = spec.device_update(context, config, update, view, cfg, rng, msg.metadata.run_id)
        return _secure_reply(msg, records, {**metrics, **extra, **more},
                             sum(r.count_bytes() for r in records.values()))
    return _encoded_reply(msg, context, cfg, codec, update, rng, metrics)


def _secure_reply(msg: Message, records: dict, metrics: dict, bytes_up: int) -> Message:
    """An encrypted or masked update's reply: its records (the update and its meta) and the metrics."""
    # objects up: the message and its RecordDict, the records and "metrics", the update's one array
    reply = MetricRecord({**metrics, wire.BYTES_UP: bytes_up, wire.OBJECTS_DOWN: _objects_down(msg),
                          wire.OBJECTS_UP: 2 + len(records) + 1 + 1, wire.T_END: time.time()})
    return Message(content=RecordDict({**records, "metrics": reply}), reply_to=msg)


@app.train(mods=[_client_clipping, _secagg])
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    _crash_if_asked(msg, context)
    if "fitins.config" in msg.content.config_records:
        return _secagg_fit(msg, context, started)
    settings, task, data, _, partition = _plant(context)
    cfg = settings.cfg
    config = wire.config_record(msg.content, "config")
    codec = get_codec(cfg["codec"])
    bytes_down = sum(rec.count_bytes() for key, rec in msg.content.array_records.items())
    view = _start_view(msg, context, codec, task.build_model)
    model = task.build_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in view.items()})
    x, y = task.windows(data, _normaliser(task, config))
    server_round = wire.as_int(config[wire.SERVER_ROUND])
    seed = hash((cfg["seed"], partition, server_round)) % 2**31
    common = dict(epochs=wire.as_int(config[wire.LOCAL_EPOCHS]), batch_size=wire.as_int(config[wire.BATCH_SIZE]),
                  lr=wire.as_float(config["lr"]), seed=seed, loss_fn=task.loss(),
                  optimizer=wire.as_str(config.get(wire.OPTIMIZER, "adam")),
                  momentum=wire.as_float(config.get(wire.MOMENTUM, 0.0)),
                  proximal_mu=wire.as_float(config.get(wire.PROXIMAL_MU, 0.0)))
    # strategy=scaffold: c - c_i corrects every local step; the mean step taken gives c_i+
    control = scaffold.start(msg, context, model)
    common["correction"] = control.correction if control else None
    dp: dict[str, float] = {}
    if privacy_mode(cfg).on_device:  # privacy=sample: DP-SGD within this device's budget
        stats, dp = _train_dp(settings, context, model, x, y, task, config, partition, common)
        if stats is None:  # this device's budget is spent: nothing leaves it this round
            metrics = {"partition": partition, wire.NUM_EXAMPLES: len(y), **dp, wire.T_START: started,
                       wire.T_END: time.time()}
            return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        steps = int(dp[wire.DP_STEPS])
    else:
        stats = train_local(model, x, task.target(y), **common)
        steps = int(stats.pop("local_steps"))
    scaffold.finish(control, context, model, steps)  # c_i+ from the trained model: after DP-SGD, post-processing
    stats.update(poison(model, view, cfg, context, partition))  # fleet.poison: a poisoned gateway's update
    metrics = {**stats, **dp, "partition": partition, wire.T_PROC: started_at(), wire.T_START: started,
               **_pull_times(), wire.NUM_EXAMPLES: len(y), wire.BYTES_DOWN: bytes_down}
    return scaffold.attach(_reply(msg, context, settings, model, view, config, metrics,
                                  codec.for_round(server_round)), control)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings, task, data, val, partition = _plant(context)
    model = task.build_model()
    model.load_state_dict(wire.array_record(msg.content, "arrays").to_torch_state_dict())
    config = wire.config_record(msg.content, "config")
    normaliser = _normaliser(task, config)
    scores = task.evaluate(model, val, normaliser)
    epochs = wire.as_int(config.get(wire.PERSONALISE_EPOCHS, 0))
    if epochs > 0:  # fleet.personalise_epochs: fine-tune on this plant's training data; the model stays here
        train = settings.cfg["train"]
        x, y = task.windows(data, normaliser)
        train_local(model, x, task.target(y), epochs=epochs, batch_size=int(train["batch_size"]), lr=float(train["lr"]),
                    seed=hash((settings.cfg["seed"], partition, "personal")) % 2**31, loss_fn=task.loss(),
                    optimizer=str(train["optimizer"]), momentum=float(train["momentum"]))
        context.state["personal-model"] = ArrayRecord({k: Array(v.detach().numpy().copy())
                                                       for k, v in model.state_dict().items()})
        scores.update({wire.PERSONAL + k: v for k, v in task.evaluate(model, val, normaliser).items()
                       if k != wire.NUM_EXAMPLES})
    return Message(content=RecordDict({"metrics": MetricRecord(scores)}), reply_to=msg)
