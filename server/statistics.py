"""Fleet-wide normalisation statistics: every gateway's feature sums, added up (encrypted under HE)."""

from __future__ import annotations

import time
from logging import WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.strategies import he, wire
from iiotfl.strategies.he_fedavg import decrypt_sum, verified_payload


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or time.time() > deadline:
            return nodes
        time.sleep(0.5)


def federated_feature_sums(grid: Grid, nodes: list[int], timeout: float, keys=None, min_aggregate: int = 2):
    """Fleet-wide per-condition (count, sum, sum of squares), node -> partition, bytes, examples.

    With ``keys`` (strategy=he) every gateway sends its statistics encrypted; the server
    adds the ciphertexts and one gateway decrypts the sum: no plant's own statistics are
    ever seen (the same path as the model updates, ``strategies/he_fedavg.py``)."""
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=wire.QUERY_FEATURE_STATS)
        for n in nodes
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=timeout) if r.has_content()]
    if not replies:
        raise RuntimeError("no gateway answered the feature-statistics query; check the SuperNode logs")
    gateways = {r.metadata.src_node_id: wire.metric_record(r.content, wire.GATEWAY) for r in replies}
    partitions = {n: wire.as_int(g["partition"]) for n, g in gateways.items()}
    examples = {n: wire.as_int(g[wire.NUM_EXAMPLES]) for n, g in gateways.items()}
    if keys is None:
        nbytes = {r.metadata.src_node_id: r.content[wire.STATS].count_bytes() for r in replies}
        total = sum(wire.array_record(r.content, wire.STATS).to_numpy_ndarrays()[0] for r in replies)
        return total, partitions, nbytes, examples
    shape = {(wire.as_int(g[wire.ROWS]), wire.as_int(g[wire.COLS])) for g in gateways.values()}
    if len(shape) != 1:
        raise RuntimeError(f"gateways disagree on the statistics' shape {sorted(shape)}; they run different tasks")
    rows, cols = shape.pop()
    payloads, senders = [], []
    for r in replies:
        try:
            record = wire.array_record(r.content, wire.STATS_HE)
            payload = verified_payload(record, r.content[wire.HE], keys.fingerprint)
        except he.HEError as err:
            log(WARNING, "gateway %d: statistics left out: %s", r.metadata.src_node_id, err)
            continue
        payloads.append(payload)
        senders.append(r.metadata.src_node_id)
    if len(senders) < max(2, min_aggregate):
        raise RuntimeError(f"only {len(senders)} gateway(s) sent valid encrypted statistics; secure aggregation "
                           f"needs at least {max(2, min_aggregate)}")
    slots = decrypt_sum(grid, keys.add(payloads), senders, 0, keys, min_aggregate)
    if slots is None:
        raise RuntimeError("no gateway decrypted the fleet's statistics; see the SuperNode logs")
    sums = he.from_limbs(slots, rows * cols, len(senders)).reshape(rows, cols)
    nbytes = {n: len(p) for n, p in zip(senders, payloads)}
    return sums, {n: partitions[n] for n in senders}, nbytes, {n: examples[n] for n in senders}
