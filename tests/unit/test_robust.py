"""Robust aggregation (Flower's Krum / FedMedian / FedTrimmedAvg behind the codecs) and poisoned gateways."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from iiotfl.configs import ConfigError, compose
from iiotfl.server.launch import validate
from iiotfl.strategies import build_strategy
from iiotfl.strategies.codec_fedavg import CodecFedAvg, encoded_record
from iiotfl.strategies.codecs import flatten, get_codec
from tests.conftest import supernode_argv

FIVE = ["fleet.gateways=5"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy=krum"], r"strategy=krum with strategy.num_malicious_nodes=1 needs >= 2f\+3 = 5 updates per "
                            r"round, the fleet gives 4; raise fleet.gateways"),
        (["strategy=krum", *FIVE, "strategy.num_nodes_to_keep=5"], r"num_nodes_to_keep=5 would keep poisoned "
                                                                   r"updates.*keep at most 4"),
        (["strategy=median", "fleet.gateways=2"], r"strategy=median needs >= 3 updates per round"),
        (["strategy=median", "codec=sparse"], r"strategy=median with codec=sparse: every gateway sends its own "
                                              r"largest changes"),
        (["strategy=trimmed_mean"], r"trims int\(beta x 4\) = 0 updates per end, which is plain FedAvg; raise "
                                    r"strategy.beta to >= 0.25"),
        (["strategy=trimmed_mean", *FIVE, "strategy.beta=0.5"], r"strategy.beta=0.5 would trim everything"),
        (["strategy=median", "privacy=client"], r"strategy=median with privacy=client: .*reported epsilon would be "
                                                r"false; use privacy=sample .* or strategy=fedavg"),
        (["strategy=krum", *FIVE, "codec=topk"], r"strategy=krum with codec=topk: .*use codec=int8, int4, fp16 or "
                                                 r"none with it"),
        (["strategy=trimmed_mean", *FIVE, "codec=topk"], r"strategy=trimmed_mean with codec=topk"),
        (["fleet.poison.kind=scale"], r"fleet.poison.kind=scale poisons no gateway; name them, e.g. "
                                      r"fleet.poison.gateways=\[1\]"),
        (["fleet.poison.gateways=[4]", "fleet.poison.kind=scale"], r"fleet.poison.gateways=\[4\] must be a list of "
                                                                   r"gateway indices in 0-3"),
        (["fleet.poison.gateways=[1]", "fleet.poison.kind=flip"], r"fleet.poison.kind='flip' is unknown; set "
                                                                  r"fleet.poison.kind to one of"),
        (["fleet.poison.gateways=[1]", "fleet.poison.kind=scale", "fleet.poison.factor=0"],
         r"fleet.poison.factor=0 is invalid"),
    ],
)
def test_impossible_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose(overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, flower", [
    (["strategy=krum", *FIVE], Krum),
    (["strategy=krum", *FIVE, "strategy.num_nodes_to_keep=3"], MultiKrum),
    (["strategy=median", "codec=int8", "codec.downlink=delta"], FedMedian),
    (["strategy=trimmed_mean", *FIVE, "privacy=sample", "privacy.epsilon=8", "codec=fp16"], FedTrimmedAvg),
    (["strategy=median", "fleet.poison.gateways=[0]", "fleet.poison.kind=sign_flip"], FedMedian),
])
def test_valid_robust_configs_build_flowers_strategy_behind_the_codecs(overrides, flower, serverapp_identity):
    cfg = compose(overrides)
    validate(cfg)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, flower) and isinstance(strategy, CodecFedAvg)
    assert strategy.codec.name == cfg["codec"]["name"]
    grid = SimpleNamespace(get_node_ids=lambda: list(range(1, int(cfg["fleet"]["gateways"]) + 1)))
    arrays = ArrayRecord({"w": Array(np.zeros(8, np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))  # CodecFedAvg's sampling
    assert len(messages) == int(cfg["fleet"]["gateways"])




def _reply(node: int, content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)


def _round(strategy, codec: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Four honest updates near +0.01 and one poisoned (honest x scale); returns (aggregate - view, honest mean)."""
    rng = np.random.default_rng(0)
    view = {"w": rng.normal(0, 1, (40, 50)).astype(np.float32), "b": np.zeros(50, np.float32)}
    strategy.view = view
    size = flatten(view).size
    honest = [0.01 + rng.normal(0, 0.001, size) for _ in range(5)]
    c = get_codec({"name": codec})
    replies = []
    for node, update in enumerate(honest, start=11):
        poisoned = node == 13
        sent = update * scale if poisoned else update
        replies.append(_reply(node, RecordDict({
            "update": encoded_record(c.encode(sent, rng)),
            "metrics": MetricRecord({"num-examples": 100, "train_loss": 1.0, **({"poisoned": 1} if poisoned else {})}),
        })))
    arrays, _ = strategy.aggregate_train(1, replies)
    got = flatten({k: v.numpy() for k, v in arrays.items()}) - flatten(view)
    return got, np.mean([u for i, u in enumerate(honest) if i != 2], axis=0)


@pytest.mark.parametrize("strategy_name", ["krum", "median", "trimmed_mean"])
@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("scale", [10.0, -10.0])
def test_a_scaled_or_sign_flipped_update_is_dropped_or_neutralised(strategy_name, codec, scale):
    cfg = compose([f"strategy={strategy_name}", *FIVE, f"codec={codec}"])
    got, honest = _round(build_strategy(cfg), codec, scale)
    fedavg, _ = _round(build_strategy(compose([*FIVE, f"codec={codec}"])), codec, scale)
    bad = np.linalg.norm(fedavg - honest)
    good = np.linalg.norm(got - honest)
    # FedAvg is pulled to (4 + scale)/5 x the honest mean; the robust rules stay among the honest updates
    assert bad > 1.5 * np.linalg.norm(honest)
    assert good < 0.15 * bad
    assert np.all(np.abs(got.mean() - 0.01) < 0.002)


def test_replies_whose_metric_keys_differ_still_aggregate():
    """Flower's strategies refuse replies with different metric keys; the decoding keeps the common ones."""
    strategy = build_strategy(compose(["strategy=median"]))
    got, honest = _round(strategy, "none", 10.0)
    assert np.linalg.norm(got - honest) < 0.2 * np.linalg.norm(honest)


def _model_and_view():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    view = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training"
        for p in model.parameters():
            p.add_(0.5)
    trained = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return model, view, trained


@pytest.mark.parametrize("kind, scale", [("scale", 10.0), ("sign_flip", -10.0)])
def test_a_poisoned_gateway_sends_factor_times_its_update(kind, scale):
    from iiotfl.clients.poison import poison as _poison

    cfg = compose(["fleet.gateways=5", "fleet.poison.gateways=[2]", f"fleet.poison.kind={kind}"])
    for partition, node_config, poisoned in [(2, {}, True), (1, {}, False),
                                             (0, {"poison": kind, "poison-factor": 10.0}, True)]:
        model, view, trained = _model_and_view()
        metrics = _poison(model, view, cfg, SimpleNamespace(node_config=node_config), partition)
        sent = flatten({k: v.detach().numpy() for k, v in model.state_dict().items()}) - flatten(view)
        expected = (trained - flatten(view)) * (scale if poisoned else 1.0)
        floats = np.array([np.issubdtype(v.dtype, np.floating) for v in view.values()
                           for _ in range(v.size)])
        np.testing.assert_allclose(sent[floats], expected[floats], atol=1e-5)
        assert metrics == {"poisoned": int(poisoned)}


def test_the_fleet_tells_poisoned_gateways_through_their_node_config(tmp_path):
    from iiotfl.compat.flower import parse_config_args, supernode_parser
    from iiotfl.server.launch import Deployment

    dep = Deployment(compose(["fleet.gateways=3", "engine.insecure=true", "fleet.poison.gateways=[1]",
                              "fleet.poison.kind=sign_flip", "fleet.poison.factor=4"]), tmp_path)
    configs = [parse_config_args([supernode_parser().parse_args(supernode_argv(dep, i, "127.0.0.1:1")[1:])
                                  .node_config]) for i in range(3)]
    assert configs[1]["poison"] == "sign_flip" and configs[1]["poison-factor"] == 4.0
    assert "poison" not in configs[0] and "poison" not in configs[2]


# --- end to end: a poisoned gateway against FedAvg and against Flower's median / Krum ---------------------------

SCENARIO = ["engine=sim", "fleet.gateways=5", "fleet.rounds=4", "task.data.units_min=6", "task.data.units_max=8"]
POISON = ["fleet.poison.gateways=[2]", "fleet.poison.kind=sign_flip", "fleet.poison.factor=10"]
