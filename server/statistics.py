"""Fleet-wide normalisation statistics: every gateway's feature sums, added up (encrypted under HE)."""

from __future__ import annotations

import time
from collections import Counter
from logging import WARNING
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.server.rounds import DeadlineGrid, error_reason
from iiotfl.strategies import he, wire
from iiotfl.strategies.he_fedavg import contribution, decrypt_sum
from iiotfl.tasks.moments import centre_of, combine, recentre

REASK_S = 90.0  # how long a gateway seen offline during the statistics query is waited for


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or time.time() > deadline:
            return nodes
        time.sleep(0.5)


def _query(grid: DeadlineGrid, nodes: list[int], timeout: float,
           centre: np.ndarray | None = None) -> tuple[list[Message], dict[int, str]]:
    """Every gateway's statistics reply, and why the others gave none.

    A gateway the SuperLink briefly saw as offline (a heartbeat lost while a thin link
    fetched the app) is asked again once it is back, for up to ``REASK_S``; a gateway
    whose ClientApp failed is not (its reason is returned)."""
    deadline = time.time() + timeout
    reask_until = time.time() + min(timeout, REASK_S)
    pending, replies = list(nodes), []
    failures: dict[int, str] = {}
    config: dict[str, ConfigRecordValues] = {}
    if centre is not None:  # the second pass under HE
        config[wire.NORM_CENTRE] = [float(v) for v in np.ravel(centre)]
    while pending:
        messages = [Message(content=RecordDict({"config": ConfigRecord(config)}), dst_node_id=n,
                            message_type=wire.QUERY_FEATURE_STATS) for n in pending]
        offline = []
        for r in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.time())):
            node = grid.sender(r)
            if r.has_content():
                replies.append(r)
                failures.pop(node, None)
            elif r.error.code == ErrorCode.NODE_UNAVAILABLE:
                offline.append(node)
                failures[node] = "offline (no heartbeat)"
            else:
                failures[node] = error_reason(r)
        answered = {r.metadata.src_node_id for r in replies}
        pending = [n for n in offline if n not in answered]
        while pending and time.time() < reask_until and not set(pending) & set(grid.get_node_ids()):
            time.sleep(1.0)
        pending = [n for n in pending if n in set(grid.get_node_ids())] if time.time() < reask_until else []
    return replies, failures


def federated_feature_sums(grid: DeadlineGrid, nodes: list[int], timeout: float, keys=None, min_aggregate: int = 2,
                           on_failure: Callable[[int, str], None] | None = None):
    """Fleet-wide per-condition (count, sum, M2) (tasks/moments.py), node -> partition, bytes, examples.

    In plaintext the server merges every gateway's statistics. With ``keys`` (strategy=he)
    every gateway sends them encrypted; the server adds the ciphertexts and one gateway
    decrypts the sum: no plant's own statistics are ever seen (the same path as the model
    updates, ``strategies/he_fedavg.py``). Sums only add up, so HE takes two passes: counts
    and sums give the fleet's centre, then squared deviations from it give M2."""
    replies, failures = _query(grid, nodes, timeout)
    for node, reason in failures.items():
        log(WARNING, "gateway %d: no feature statistics: %s", node, reason)
        if on_failure is not None:
            on_failure(node, reason)
    if not replies:
        reasons = "; ".join(f"gateway {n}: {why}" for n, why in sorted(failures.items())) or "none replied in time"
        raise RuntimeError(f"no gateway answered the feature-statistics query ({reasons}); check the SuperNode logs")
    gateways = {r.metadata.src_node_id: wire.metric_record(r.content, wire.GATEWAY) for r in replies}
    partitions = {n: wire.as_int(g["partition"]) for n, g in gateways.items()}
    examples = {n: wire.as_int(g[wire.NUM_EXAMPLES]) for n, g in gateways.items()}
    if keys is None:
        nbytes = {r.metadata.src_node_id: r.content[wire.STATS].count_bytes() for r in replies}
        total = combine([wire.array_record(r.content, wire.STATS).to_numpy_ndarrays()[0] for r in replies])
        return total, partitions, nbytes, examples
    first, senders, nbytes = _encrypted_sum(grid, replies, gateways, partitions, keys, min_aggregate,
                                            wire.HE_KIND_STATS)
    centre = centre_of(first)
    replies, failures = _query(grid, senders, timeout, centre)
    for node, reason in failures.items():
        log(WARNING, "gateway %d: no centred feature statistics: %s", node, reason)
    second, senders, more = _encrypted_sum(grid, replies, gateways, partitions, keys, min_aggregate,
                                           wire.HE_KIND_CENTRED)
    nbytes = {n: nbytes.get(n, 0) + more[n] for n in senders}
    return recentre(second, centre), {n: partitions[n] for n in senders}, nbytes, {n: examples[n] for n in senders}


def _encrypted_sum(grid: DeadlineGrid, replies: list[Message], gateways: dict, partitions: dict[int, int],
                   keys, min_aggregate: int, kind: str) -> tuple[np.ndarray, list[int], dict[int, int]]:
    """One encrypted pass: the decrypted sum, the gateways in it, the bytes each sent."""
    shapes = {n: _shape(g) for n, g in gateways.items()}
    if not any(shapes.values()):
        raise RuntimeError("no gateway said what shape its statistics have; update the gateways to this iiotfl version")
    rows, cols = Counter(s for s in shapes.values() if s).most_common(1)[0][0]  # the task's, unless most lie
    parts = []
    for r in replies:
        node = r.metadata.src_node_id
        try:
            if shapes.get(node) != (rows, cols):
                raise he.HEError(f"statistics of shape {shapes.get(node)}, the fleet's are {(rows, cols)} "
                                 "(another task?)")
            parts.append(contribution(r, wire.STATS_HE, kind, wire.STATS_ROUND, keys,
                                      he.limb_ciphertext_count(rows * cols)))
        except (he.HEError, KeyError, TypeError, ValueError, wire.RecordKindError) as err:
            log(WARNING, "gateway %d (partition %s): statistics left out, the others go on: %s", node,
                partitions.get(node, "?"), err)
    if len(parts) < max(2, min_aggregate):
        raise RuntimeError(f"only {len(parts)} gateway(s) sent valid encrypted statistics; secure aggregation "
                           f"needs at least {max(2, min_aggregate)}")
    decrypted = decrypt_sum(grid, parts, wire.STATS_ROUND, kind, keys, min_aggregate)
    for node, why in decrypted.refused.items():
        log(WARNING, "gateway %d (partition %s): statistics left out, the others go on: %s", node,
            partitions.get(node, "?"), why)
    if decrypted.slots is None:
        raise RuntimeError("no gateway decrypted the fleet's statistics; see the SuperNode logs")
    senders = decrypted.nodes
    sums = he.from_limbs(decrypted.slots, rows * cols, len(senders)).reshape(rows, cols)
    return sums, senders, {p.node: len(p.payload) for p in parts if p.node in senders}


def _shape(gateway) -> tuple[int, int] | None:
    """The (rows, cols) a gateway says its statistics have (None if it does not say)."""
    try:
        return wire.as_int(gateway[wire.ROWS]), wire.as_int(gateway[wire.COLS])
    except (KeyError, TypeError, ValueError):
        return None
