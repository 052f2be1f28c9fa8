"""A fleet of real ClientApp handlers for ``strategy=mask`` tests: each gateway has its own Flower
Context (state kept between messages, as the SuperNode keeps it per run) and answers the key set-up
and unmask queries through the ClientApp's own handlers; its train reply is the ClientApp's
``masked_update``. Messages are created under the ServerApp identity (run 1) of ``serverapp_identity``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from iiotfl.clients.app import mask_keys, mask_unmask
from iiotfl.configs import compose, to_run_config
from iiotfl.security import certs as certs_mod
from iiotfl.strategies import wire
from iiotfl.strategies.codecs import get_codec
from iiotfl.strategies.mask_fedavg import MaskFedAvg, masked_update, min_cohort
from iiotfl.strategies.masking import MaskError
from iiotfl.strategies.spec import server_step

RUN = 1
VIEW = {"a": np.zeros((40, 50), np.float32), "b": np.zeros(300, np.float32)}
SIZE = sum(v.size for v in VIEW.values())


def identity_config(certs: Path, i: int) -> dict[str, str]:
    return {"identity-cert": str(certs_mod.gateway_crt(certs, i)), "identity-key": str(certs_mod.gateway_tls_key(certs, i)),
            "identity-ca": str(certs / certs_mod.CA_CRT)}


class MaskFleet:
    """Gateways ``nodes``; ``dead`` ones answer nothing (dropped out); ``log`` lists (type, node) sent."""

    def __init__(self, nodes: list[int], tmp_path: Path, overrides: tuple[str, ...] = (),
                 certs: Path | None = None) -> None:
        """``certs``: an ``iiotfl certs`` directory; gateway i (in ``nodes`` order) gets gateway-<i>'s identity."""
        self.cfg = compose(["strategy=mask", f"fleet.gateways={len(nodes)}", *overrides])
        run_config = to_run_config(self.cfg, tmp_path)
        self.contexts = {n: Context(run_id=RUN, node_id=n, node_config=identity_config(certs, i) if certs else {},
                                    state=RecordDict(), run_config=run_config) for i, n in enumerate(nodes)}
        self.dead: set[int] = set()
        self.log: list[tuple[str, int]] = []

    # -- the Grid the strategy talks to ----------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ARG002
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.log.append((msg.metadata.message_type, node))
            if node in self.dead:
                continue
            handler = mask_keys if msg.metadata.message_type == wire.QUERY_MASK_KEYS else mask_unmask
            try:
                out.append(handler(msg, self.contexts[node]))
            except MaskError as err:
                out.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        return out

    # -- the server and the gateways' train replies -------------------------------------------------
    def strategy(self, **kwargs) -> MaskFedAvg:
        st = self.cfg["strategy"]
        args = dict(threshold=float(st["threshold"]), min_cohort=min_cohort(self.cfg), codec=get_codec(None),
                    fraction_train=1.0, min_available_nodes=1, min_aggregate=int(st["min_aggregate"]),
                    initial_range=0.02, **server_step(self.cfg))
        return MaskFedAvg(**{**args, **kwargs})

    def configure(self, strategy: MaskFedAvg, server_round: int) -> dict[int, Message]:
        arrays = ArrayRecord({k: Array(v) for k, v in VIEW.items()})
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), self)
        return {m.metadata.dst_node_id: m for m in messages}

    def reply(self, msg: Message, update: np.ndarray, examples: int = 10, seed: int = 0) -> Message:
        node = msg.metadata.dst_node_id
        records, _ = masked_update(self.contexts[node], wire.config_record(msg.content, "config"), update, VIEW,
                                   self.cfg, np.random.default_rng([seed, node]), RUN)
        metrics = MetricRecord({wire.NUM_EXAMPLES: examples, "partition": node})
        return Message(RecordDict({**records, "metrics": metrics}), reply_to=msg)
