"""The ClientApp: what a plant gateway does with each message from the server.

* ``query.feature_stats``: reply with this plant's per-condition feature sums (for the
  fleet-wide normalisation; only sums leave the gateway, never a record).
* ``train``: load the global model, train ``local-epochs`` on the plant's windows,
  reply with the new weights and ``num-examples`` (the FedAvg weight).
* ``evaluate``: score the global model on the plant's held-out units.

Which plant a node is comes from its node config (``partition-id``, or
``data-path`` for a gateway with its own files); the task and data settings from
the run config; training hyper-parameters from each train message.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.training import train_local
from configs import from_run_config
from tasks import get_task

app = ClientApp()


def _plant(context: Context):
    """(config, task, local train split, local validation split, partition id)."""
    cfg, _ = from_run_config(context.run_config)
    torch.set_num_threads(int(cfg["train"]["torch_threads"]))
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
    _, task, train, _, _ = _plant(context)
    sums = task.feature_sums(train)
    reply = RecordDict({"stats": ArrayRecord(numpy_ndarrays=[sums])})
    return Message(content=reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, task, data, _, partition = _plant(context)
    config = msg.content["config"]
    model = task.build_model()
    received = msg.content["arrays"]
    model.load_state_dict(received.to_torch_state_dict())
    x, y = task.windows(data, _normaliser(task, config))
    stats = train_local(
        model,
        x,
        task.target(y),
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        seed=hash((cfg["seed"], partition, int(config["server-round"]))) % 2**31,
    )
    arrays = ArrayRecord(model.state_dict())
    metrics = MetricRecord(
        {
            **stats,
            "num-examples": len(y),
            "bytes-down": received.count_bytes(),
            "bytes-up": arrays.count_bytes(),
            "partition": partition,
        }
    )
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, task, _, val, _ = _plant(context)
    model = task.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    scores = task.evaluate(model, val, _normaliser(task, msg.content["config"]))
    return Message(content=RecordDict({"metrics": MetricRecord(scores)}), reply_to=msg)
