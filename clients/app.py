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

from clients.training import train_local
from configs import from_run_config
from strategies.codec_fedavg import encoded_record, record_arrays
from strategies.codecs import ErrorFeedback, flatten, get_codec, unflatten
from tasks import get_task

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


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    _, task, train, _, partition = _plant(context)
    sums = task.feature_sums(train)
    reply = RecordDict({"stats": ArrayRecord(numpy_ndarrays=[sums]),
                        "gateway": MetricRecord({"partition": partition})})
    return Message(content=reply, reply_to=msg)


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    cfg, task, data, _, partition = _plant(context)
    config = msg.content["config"]
    codec = get_codec(cfg.get("codec"))
    bytes_down = sum(rec.count_bytes() for key, rec in msg.content.array_records.items())
    view = _start_view(msg, context, codec)
    model = task.build_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in view.items()})
    x, y = task.windows(data, _normaliser(task, config))
    server_round = int(config["server-round"])
    stats = train_local(
        model,
        x,
        task.target(y),
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        seed=hash((cfg["seed"], partition, server_round)) % 2**31,
    )
    # The update leaves the device encoded (any privacy noise is added before this line).
    update = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()}) - flatten(view)
    rng = np.random.default_rng([cfg["seed"], partition, server_round])
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
            "num-examples": len(y),
            "bytes-down": bytes_down,
            "bytes-up": record.count_bytes(),
            "partition": partition,
            "t-proc": _process_started(),
            "t-start": started,
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
