"""Update codecs: error bounds, unbiased stochastic rounding, top-k with error feedback."""

import numpy as np
import pytest

from iiotfl.strategies.codecs import Codec, ErrorFeedback, flatten, unflatten, wire_bytes

CODECS = [Codec("none"), Codec("fp16"), Codec("int8"), Codec("int4"), Codec("topk", k_fraction=0.1)]


def _update(n=10_001, seed=0):
    rng = np.random.default_rng(seed)
    # heavy-tailed like a real model delta, with some exact zeros
    x = (rng.standard_t(3, n) * 1e-3).astype(np.float32)
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_round_trip_within_stated_bound(codec):
    x = _update()
    enc = codec.encode(x, np.random.default_rng(1))
    y = codec.decode(enc, x.size)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.abs(y - x) <= codec.error_bound(x))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_quantisation_is_unbiased(name):
    codec = Codec(name, chunk=64)
    x = _update(640, seed=3)
    rng = np.random.default_rng(7)
    draws = 4000
    mean = sum(codec.decode(codec.encode(x, rng), x.size).astype(np.float64) for _ in range(draws)) / draws
    bound = codec.error_bound(x)
    # one draw errs by up to a scale; the mean of n draws by ~scale/sqrt(n)
    assert np.max(np.abs(mean - x) / np.maximum(bound, 1e-12)) < 6 / np.sqrt(draws) * 2
    one = codec.decode(codec.encode(x, rng), x.size)
    assert np.mean(np.abs(one - x)) > 5 * np.mean(np.abs(mean - x))


def test_sizes_relative_to_float32():
    x = _update(41_000)
    base = wire_bytes(Codec("none").encode(x, np.random.default_rng(0)))
    ratio = {c.name: wire_bytes(c.encode(x, np.random.default_rng(0))) / base for c in CODECS}
    assert ratio["fp16"] == pytest.approx(0.5, abs=1e-3)
    assert ratio["int8"] <= 0.27
    assert ratio["int4"] <= 0.145
    assert ratio["topk"] <= 0.052


def test_malformed_update_is_rejected():
    codec = Codec("int8")
    enc = codec.encode(_update(1000), np.random.default_rng(0))
    with pytest.raises(ValueError, match="do not fit"):
        codec.decode(enc, 5000)
    with pytest.raises(ValueError, match="missing"):
        codec.decode({"q": enc["q"]}, 1000)
    top = Codec("topk").encode(_update(1000), np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside the model"):
        Codec("topk").decode(top, 500)
    with pytest.raises(ValueError, match="do not match"):
        Codec("topk").decode({**top, "gaps": np.ones(top["q"].size + 300, np.uint8)}, 1000)


def test_flatten_unflatten():
    like = {"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.float32)}
    back = unflatten(flatten(like), like)
    assert all(np.array_equal(back[k], like[k]) for k in like)
    with pytest.raises(ValueError, match="another model"):
        unflatten(np.zeros(11, np.float32), like)


def _toy(error_feedback: bool, rounds=300):
    """Gradient steps towards a target, sent through top-1: one coordinate carries a large
    oscillating disturbance (a noisy sensor channel) that plain top-k always picks."""
    d = 20
    target = np.linspace(1.0, 2.0, d).astype(np.float32)
    target[0] = 0.0
    x = np.zeros(d, np.float32)
    codec = Codec("topk", k_fraction=1 / d)
    ef = ErrorFeedback(codec)
    rng = np.random.default_rng(0)
    for r in range(rounds):
        update = 0.1 * (target - x)
        update[0] += 0.3 * (-1) ** r
        enc = ef.encode(update, rng) if error_feedback else codec.encode(update, rng)
        x = x + codec.decode(enc, d)
    return float(np.linalg.norm((x - target)[1:]) / np.linalg.norm(target[1:]))


def test_topk_error_feedback_converges_where_plain_topk_stalls():
    plain, with_ef = _toy(False), _toy(True)
    assert plain > 0.9      # the informative coordinates never get through
    assert with_ef < 0.15   # the residual accumulates until they do (floor set by the step size)
