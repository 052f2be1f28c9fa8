"""A rogue gateway's update: too large, not finite or malformed is left out with the gateway named;
the honest updates are still aggregated and the round's row says why."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from iiotfl.configs import ConfigError, compose
from iiotfl.server.launch import validate
from iiotfl.strategies import build_strategy
from iiotfl.strategies.codec_fedavg import encoded_record
from iiotfl.strategies.codecs import flatten, get_codec


def _reply(node: int, update: RecordDict | ArrayRecord) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=RecordDict({
        "update": update, "metrics": MetricRecord({"num-examples": 100, "train_loss": 1.0})}))


@pytest.mark.parametrize("strategy_name", ["fedavg", "median"])
def test_oversized_non_finite_and_malformed_updates_are_left_out_and_named(strategy_name):
    strategy = build_strategy(compose([f"strategy={strategy_name}", "fleet.gateways=5", "fleet.max_update_norm=10"]))
    rng = np.random.default_rng(0)
    view = {"w": rng.normal(0, 1, (20, 10)).astype(np.float32)}
    strategy.view = view
    size = flatten(view).size
    codec = get_codec({"name": "none"})
    honest = [np.full(size, 0.01) for _ in range(3)]
    replies = [_reply(n, encoded_record(codec.encode(u, rng))) for n, u in zip((11, 12, 13), honest)]
    replies.append(_reply(14, encoded_record(codec.encode(np.full(size, 1e3), rng))))   # norm ~1.4e4
    bad = np.full(size, 0.01)
    bad[3] = np.nan
    replies.append(_reply(15, encoded_record(codec.encode(bad, rng))))
    replies.append(_reply(16, ArrayRecord({"not-an-update": Array(np.zeros(3, np.float32))})))
    arrays, _ = strategy.aggregate_train(1, replies)
    got = flatten({k: v.numpy() for k, v in arrays.items()}) - flatten(view)
    assert np.allclose(got, 0.01, atol=1e-6), "only the honest updates were aggregated"
    assert set(strategy.rejected) == {14, 15, 16}
    assert "above fleet.max_update_norm=10" in strategy.rejected[14]
    assert "not finite" in strategy.rejected[15]
    assert all("\n" not in why for why in strategy.rejected.values())


def test_the_norm_bound_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="fleet.max_update_norm"):
        validate(compose(["fleet.max_update_norm=-1"]))
    validate(compose(["fleet.max_update_norm=null"]))
