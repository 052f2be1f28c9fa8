"""SCAFFOLD: the server's control variate update by hand, the gateway's correction, and less drift than FedAvg."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from iiotfl.clients import scaffold
from iiotfl.clients.training import train_local, train_local_dp
from iiotfl.configs import ConfigError, compose
from iiotfl.privacy.ledger import form_of
from iiotfl.server.launch import validate
from iiotfl.strategies import build_strategy, wire
from iiotfl.strategies.codec_fedavg import encoded_record
from iiotfl.strategies.codecs import get_codec

W = {"w": np.array([[1.0, -1.0]], np.float32), "b": np.array([0.5], np.float32)}


def _reply(node: int, update: np.ndarray, delta: dict | None, n: int = 100) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({"update": encoded_record(get_codec({"name": "none"}).encode(update, None)),
                          "metrics": MetricRecord({"num-examples": n})})
    if delta is not None:
        content[wire.CONTROL_DELTA] = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in delta.items()})
    return Message(metadata=meta, content=content)


@pytest.mark.usefixtures("serverapp_identity")
def test_the_server_sends_c_and_moves_it_by_the_answering_share_of_the_mean_control_change():
    cfg = compose(["strategy=scaffold", "fleet.gateways=4"])
    validate(cfg)
    strategy = build_strategy(cfg)
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2, 3, 4])
    messages = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in W.items()}), ConfigRecord({}),
                                             grid))
    assert all(np.all(m.content[wire.CONTROL]["w"].numpy() == 0) for m in messages)  # c starts at zero
    d1 = {"w": np.array([[0.4, 0.0]]), "b": np.array([0.2])}
    d2 = {"w": np.array([[0.0, -0.8]]), "b": np.array([0.2])}
    bad = {"w": np.array([[np.nan, 0.0]]), "b": np.array([0.0])}
    replies = [_reply(1, np.full(3, 0.1), d1), _reply(2, np.full(3, 0.3), d2), _reply(3, np.full(3, 9.0), bad),
               _reply(4, np.full(3, 9.0), None)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # the updates of the two valid replies averaged (FedAvg); the malformed ones are left out and named
    np.testing.assert_allclose(arrays["b"].numpy(), W["b"] + 0.2, rtol=1e-6)
    assert set(strategy.rejected) == {3, 4} and "control-delta" in strategy.rejected[3]
    # c += |S|/N x mean(delta): 2 of 4 answered with a control change
    np.testing.assert_allclose(strategy.control["w"], 0.5 * np.array([[0.2, -0.4]]), rtol=1e-6)
    np.testing.assert_allclose(strategy.control["b"], 0.5 * np.array([0.2]), rtol=1e-6)
    again = list(strategy.configure_train(2, arrays, ConfigRecord({}), grid))
    np.testing.assert_allclose(again[0].content[wire.CONTROL]["w"].numpy(), strategy.control["w"])


def _data(optimum: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    return x, (x @ optimum).astype(np.float32)[:, None]


@pytest.mark.usefixtures("serverapp_identity")
def test_the_gateway_moves_by_c_minus_ci_every_step_and_replies_its_mean_step_less_c():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x, y = _data(np.array([2.0, -1.0]), 0)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    c = {k: np.full(tuple(p.shape), 0.01, np.float32) for k, p in model.named_parameters()}
    msg = Message(content=RecordDict({wire.CONTROL: ArrayRecord({k: Array(v) for k, v in c.items()})}),
                  dst_node_id=1, message_type="train")
    x0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    first = scaffold.start(msg, context, model)
    assert first is not None
    for corr, (k, _) in zip(first.correction, model.named_parameters()):
        np.testing.assert_allclose(corr.numpy(), c[k])  # c - c_i, c_i = 0 at first
    # with lr 0 the optimiser does not move: every one of the K steps moves the weights by -(c - c_i) alone
    steps = train_local(model, x, y, epochs=1, batch_size=64, lr=0.0, seed=0, optimizer="sgd",
                        correction=first.correction)["local_steps"]
    assert steps == 4  # 200 examples in batches of 64
    for k, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), x0[k].numpy() - 4 * c[k], rtol=1e-5)
    scaffold.finish(first, context, model, steps)
    for k in c:  # c_i+ - c_i = (x - y_i) / K - c: the path's own mean step, here none
        np.testing.assert_allclose(first.delta[k], 0, atol=1e-7)
    # a real round: c_i+ (the state) is the mean step taken with the correction taken out
    second = scaffold.start(msg, context, model)
    for corr, (k, _) in zip(second.correction, model.named_parameters()):
        np.testing.assert_allclose(corr.numpy(), c[k], atol=1e-7)  # c_i is still 0
    x1 = {k: p.detach().numpy().copy() for k, p in model.named_parameters()}
    plain = torch.nn.Linear(2, 1)
    plain.load_state_dict(model.state_dict())
    train_local(plain, x, y, epochs=1, batch_size=64, lr=0.05, seed=1, optimizer="sgd")
    steps = train_local(model, x, y, epochs=1, batch_size=64, lr=0.05, seed=1, optimizer="sgd",
                        correction=second.correction)["local_steps"]
    scaffold.finish(second, context, model, steps)
    held = wire.array_record(context.state, scaffold.STATE)
    for k, p in model.named_parameters():
        # the server rebuilds it from the float32 update, K and its own c: it carries nothing beyond the update
        mean_step = (x1[k] - p.detach().numpy()) / steps
        np.testing.assert_allclose(second.delta[k], mean_step - c[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(held[k].numpy(), second.delta[k], rtol=1e-6)  # c_i+ = 0 + delta
        assert not np.allclose(p.detach().numpy(), dict(plain.named_parameters())[k].detach().numpy())
    wrong = Message(content=RecordDict({wire.CONTROL: ArrayRecord({"other": Array(np.zeros(2, np.float32))})}),
                    dst_node_id=1, message_type="train")
    with pytest.raises(ValueError, match="control variate names"):
        scaffold.start(wrong, context, model)
    assert scaffold.start(Message(content=RecordDict({}), dst_node_id=1, message_type="train"), context,
                          model) is None


@pytest.mark.usefixtures("serverapp_identity")
def test_scaffold_drifts_less_than_fedavg_on_plants_with_opposite_optima():
    """Two plants whose data pull a linear model to opposite optima; many local steps per round. FedAvg's average
    stalls away from the fleet's optimum (client drift); SCAFFOLD's corrected steps get close to it, with SGD and
    with Adam (the correction is applied outside the optimiser)."""
    plants = [_data(np.array([3.0, 1.0]), 1), _data(np.array([-1.0, -3.0]), 2)]
    xs, ys = np.concatenate([p[0] for p in plants]), np.concatenate([p[1] for p in plants])
    best = np.linalg.lstsq(xs, ys, rcond=None)[0].ravel()  # the pooled optimum (no bias in the data)

    def run(scaffolded: bool, optimizer: str, lr: float) -> float:
        torch.manual_seed(0)
        glob = torch.nn.Linear(2, 1, bias=False)
        server = {"weight": np.zeros((1, 2), np.float32)}
        contexts = [Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={})
                    for i in range(len(plants))]
        for rnd in range(8):
            models, deltas = [], []
            msg = Message(content=RecordDict({wire.CONTROL: ArrayRecord({k: Array(v) for k, v in server.items()})}),
                          dst_node_id=1, message_type="train")
            for i, (x, y) in enumerate(plants):
                local = torch.nn.Linear(2, 1, bias=False)
                local.load_state_dict(glob.state_dict())
                control = scaffold.start(msg, contexts[i], local) if scaffolded else None
                stats = train_local(local, x, y, epochs=5, batch_size=8, lr=lr, seed=rnd, optimizer=optimizer,
                                    correction=control.correction if control else None)
                scaffold.finish(control, contexts[i], local, stats["local_steps"])
                if control is not None:
                    deltas.append(control.delta)
                models.append(local.weight.detach().clone())
            with torch.no_grad():
                glob.weight.copy_(torch.stack(models).mean(0))
            if scaffolded:
                server = {k: v + np.mean([d[k] for d in deltas], axis=0) for k, v in server.items()}
        return float(np.linalg.norm(glob.weight.detach().numpy().ravel() - best))

    for optimizer, lr in (("sgd", 0.05), ("adam", 0.05)):
        fedavg, scaffolded = run(False, optimizer, lr), run(True, optimizer, lr)
        assert scaffolded < 0.5 * fedavg, (optimizer, fedavg, scaffolded)


def test_scaffold_composes_with_dp_sgd_and_refuses_client_level_dp():
    validate(compose(["strategy=scaffold", "privacy=sample"]))
    with pytest.raises(ConfigError, match="strategy=scaffold with privacy=client: .*sends no control variate"):
        validate(compose(["strategy=scaffold", "privacy=client"]))


def test_under_dp_sgd_the_correction_is_a_step_of_its_own_outside_the_noise():
    """lr 0: DP-SGD's noised steps move nothing, so the weights move by exactly K x (c - c_i): the correction
    depends on no example and never passes through the clipping."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x, y = _data(np.array([2.0, -1.0]), 0)
    start = [p.detach().clone() for p in model.parameters()]
    correction = [torch.full_like(p, 0.01) for p in model.parameters()]
    stats = train_local_dp(model, x, y, epochs=1, batch_size=50, lr=0.0, seed=0, noise_multiplier=1.0,
                           max_grad_norm=1.0, correction=correction)
    assert stats["steps"] == 4  # 200 examples, expected batches of 50
    for p, p0 in zip(model.parameters(), start):
        np.testing.assert_allclose(p.detach().numpy(), p0.numpy() - 4 * 0.01, rtol=1e-5)


def test_the_ledger_names_the_control_change_that_leaves_with_each_update():
    for privacy, noise in (("none", "plaintext"), ("sample", "DP-SGD noised on the device")):
        form = form_of(compose(["strategy=scaffold", f"privacy={privacy}"]))
        assert noise in form and "control change: the exact update over its step count" in form
    assert "control" not in form_of(compose(["strategy=fedavg"]))

