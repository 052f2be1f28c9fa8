"""Server optimisers (Flower's FedAvgM / FedAdam / FedYogi / FedAdagrad behind the codecs) against hand-computed steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from iiotfl.configs import ConfigError, compose
from iiotfl.server.launch import validate
from iiotfl.strategies import build_strategy, strategy_spec
from iiotfl.strategies.codec_fedavg import CodecFedAvg, encoded_record
from iiotfl.strategies.codecs import get_codec

GLOBAL = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
# two gateways' updates (new weights - the model they started from), 300 and 100 examples
UPDATES = [(np.array([0.4, 0.0, -0.2, 0.1], np.float32), 300), (np.array([0.0, 0.4, 0.2, -0.1], np.float32), 100)]
MEAN = (0.75 * UPDATES[0][0] + 0.25 * UPDATES[1][0]).astype(np.float64)  # [0.3, 0.1, -0.1, 0.05]


def _reply(node: int, update: np.ndarray, n: int) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({"update": encoded_record(get_codec({"name": "none"}).encode(update, None)),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(metadata=meta, content=content)


def _rounds(overrides: list[str], rounds: int = 2) -> list[np.ndarray]:
    """The global model after each of ``rounds`` rounds in which both gateways send ``UPDATES``."""
    cfg = compose([*overrides, "fleet.gateways=2"])
    validate(cfg)
    strategy = build_strategy(cfg)
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2])
    model, out = GLOBAL.copy(), []
    for rnd in range(1, rounds + 1):
        list(strategy.configure_train(rnd, ArrayRecord({"w": Array(model)}), ConfigRecord({}), grid))
        arrays, _ = strategy.aggregate_train(rnd, [_reply(i + 1, u, n) for i, (u, n) in enumerate(UPDATES)])
        model = arrays["w"].numpy().astype(np.float32)
        out.append(model.astype(np.float64))
    return out


@pytest.mark.usefixtures("serverapp_identity")
def test_fedavg_applies_the_weighted_mean_update():
    first, second = _rounds(["strategy=fedavg"])
    np.testing.assert_allclose(first, GLOBAL + MEAN, rtol=1e-6)
    np.testing.assert_allclose(second, GLOBAL + 2 * MEAN, rtol=1e-6)


@pytest.mark.usefixtures("serverapp_identity")
def test_fedavgm_steps_along_its_momentum():
    lr, beta = 0.5, 0.9
    first, second = _rounds(["strategy=fedavgm", f"strategy.server_lr={lr}", f"strategy.server_momentum={beta}"])
    # pseudo-gradient g = global - mean model = -MEAN; v1 = g, v2 = beta v1 + g; global -= lr v
    np.testing.assert_allclose(first, GLOBAL + lr * MEAN, rtol=1e-5)
    np.testing.assert_allclose(second, first + lr * (1 + beta) * MEAN, rtol=1e-5)


def _adam(yogi: bool, eta=0.01, b1=0.9, b2=0.99, tau=1e-3, rounds=2) -> list[np.ndarray]:
    x, m, v, out = GLOBAL.astype(np.float64), np.zeros(4), np.zeros(4), []
    for t in range(1, rounds + 1):
        d = MEAN  # the pseudo-gradient: the same mean update every round
        m = b1 * m + (1 - b1) * d
        v = v - (1 - b2) * d**2 * np.sign(v - d**2) if yogi else b2 * v + (1 - b2) * d**2
        step = eta if yogi else eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))  # Flower: Adam's bias correction
        x = x + step * m / (np.sqrt(v) + tau)
        out.append(x)
    return out


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("name, yogi", [("fedadam", False), ("fedyogi", True)])
def test_fedadam_and_fedyogi_take_adams_steps_on_the_mean_update(name, yogi):
    got = _rounds([f"strategy={name}", "strategy.eta=0.05"], rounds=3)
    want = _adam(yogi, eta=0.05, rounds=3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # every weight moves by about eta in the direction of the mean update, however small it is
    assert np.all(np.sign(got[0] - GLOBAL) == np.sign(MEAN))


@pytest.mark.usefixtures("serverapp_identity")
def test_fedadagrad_steps_shrink_with_the_sum_of_squares():
    eta, tau = 0.1, 1e-3
    got = _rounds(["strategy=fedadagrad", f"strategy.eta={eta}", f"strategy.tau={tau}"], rounds=2)
    v1 = MEAN**2  # Flower's FedAdagrad: m = d (beta_1 = 0), v += d**2
    first = GLOBAL + eta * MEAN / (np.sqrt(v1) + tau)
    second = first + eta * MEAN / (np.sqrt(2 * v1) + tau)
    np.testing.assert_allclose(got[0], first, rtol=1e-5)
    np.testing.assert_allclose(got[1], second, rtol=1e-5)


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("name, flower", [("fedavgm", FedAvgM), ("fedadam", FedAdam), ("fedyogi", FedYogi),
                                          ("fedadagrad", FedAdagrad)])
def test_each_optimiser_is_flowers_behind_the_codecs_and_does_not_resume(name, flower):
    cfg = compose([f"strategy={name}", "codec=int8", "codec.downlink=delta", "privacy=sample"])
    validate(cfg)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, flower) and isinstance(strategy, CodecFedAvg)
    assert strategy.codec.name == "int8"
    spec = strategy_spec(cfg)
    assert spec.uplink == "plaintext" and spec.client_dp is None and spec.resume_refusal


@pytest.mark.parametrize("overrides, message", [
    (["strategy=fedadam", "privacy=client"], r"strategy=fedadam with privacy=client: .*use privacy=sample"),
    (["strategy=fedavgm", "strategy.server_momentum=1.5"], r"strategy.server_momentum=1.5 is invalid"),
    (["strategy=fedyogi", "strategy.eta=0"], r"strategy.eta=0 is invalid"),
    (["strategy=fedadagrad", "strategy.tau=-1"], r"strategy.tau=-1 is invalid"),
])
def test_bad_optimiser_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose(overrides))
    assert "\n" not in str(err.value)


# -- FedProx: proximal-mu in every train message, the pull on the gateway ----------------------------------------
@pytest.mark.usefixtures("serverapp_identity")
def test_fedprox_sends_proximal_mu_and_aggregates_as_fedavg():
    cfg = compose(["strategy=fedprox", "strategy.proximal_mu=0.5", "fleet.gateways=2", "codec=int8"])
    validate(cfg)
    strategy = build_strategy(cfg)
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2])
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(GLOBAL)}), ConfigRecord({}), grid))
    assert [m.content.config_records["config"]["proximal-mu"] for m in messages] == [0.5, 0.5]
    assert _rounds(["strategy=fedprox"], rounds=1)[0] == pytest.approx(GLOBAL + MEAN, rel=1e-6)


def test_the_proximal_pull_is_sgds_step_on_the_proximal_term_and_bounds_the_drift():
    import torch

    from iiotfl.clients.training import proximal_pull, train_local

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    proximal_pull(model, start, 0.25)  # w - 0.25 (w - w0): the gradient step of mu/2 ||w - w0||^2, lr mu = 0.25
    for p, p0 in zip(model.parameters(), start):
        torch.testing.assert_close(p.detach(), p0 + 0.75)
    # local training on one plant's data: the larger mu, the closer the model stays to where the round started
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    y = (x @ np.array([3.0, -2.0, 1.0]) + 5.0).astype(np.float32)
    drift = {}
    for mu in (0.0, 1.0, 10.0):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        w0 = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        train_local(m, x, y[:, None], epochs=3, batch_size=32, lr=0.01, seed=0, optimizer="sgd", proximal_mu=mu)
        drift[mu] = float(torch.linalg.norm(torch.cat([p.detach().flatten() for p in m.parameters()]) - w0))
    assert drift[0.0] > drift[1.0] > drift[10.0] > 0


def test_fedprox_refuses_client_level_dp_and_a_negative_mu():
    with pytest.raises(ConfigError, match=r"strategy=fedprox with privacy=client: .*use privacy=sample"):
        validate(compose(["strategy=fedprox", "privacy=client"]))
    with pytest.raises(ConfigError, match=r"strategy.proximal_mu=-1 is invalid"):
        validate(compose(["strategy=fedprox", "strategy.proximal_mu=-1"]))


def test_the_proximal_pull_under_dp_sgd_keeps_the_model_near_the_rounds_start():
    import torch

    from iiotfl.clients.training import train_local_dp

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    y = (x @ np.array([3.0, -2.0, 1.0]) + 5.0).astype(np.float32)
    drift = {}
    for mu in (0.0, 90.0):  # lr x mu = 0.9: each step gives back 90 % of what it moved
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        w0 = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        out = train_local_dp(m, x, y[:, None], epochs=2, batch_size=32, lr=0.01, seed=0, noise_multiplier=1.0,
                             max_grad_norm=1.0, optimizer="sgd", proximal_mu=mu)
        assert out["steps"] > 0
        drift[mu] = float(torch.linalg.norm(torch.cat([p.detach().flatten() for p in m.parameters()]) - w0))
    assert drift[90.0] < 0.3 * drift[0.0]



@pytest.mark.parametrize("strategy", ["fedavgm", "he", "mask"])
def test_a_server_step_out_of_range_is_named(strategy):
    for bad, key in (("strategy.server_lr=0", "strategy.server_lr"), ("strategy.server_momentum=1.5",
                                                                       "strategy.server_momentum")):
        with pytest.raises(ConfigError, match=f"config: {key}=.* is invalid"):
            validate(compose([f"strategy={strategy}", bad]))
