"""codec=sparse: Rice-coded positions, low-bit values in one byte stream; error feedback with momentum
correction; the warm-up; hostile streams; the seeded start of the delta downlink; the local optimiser."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from iiotfl.clients.app import _start_view
from iiotfl.clients.training import optimiser
from iiotfl.configs import compose
from iiotfl.server.launch import validate
from iiotfl.strategies import build_strategy, wire
from iiotfl.strategies.codec_fedavg import RAW, encoded_record, record_arrays
from iiotfl.strategies.codecs import (
    SPARSE_HEADER,
    ErrorFeedback,
    SparseCodec,
    TopKCodec,
    get_codec,
    rice_decode,
    rice_encode,
    weights_digest,
)


def _update(n, seed=0):
    return (np.random.default_rng(seed).standard_t(3, n) * 1e-3).astype(np.float32)


# -- the byte stream --------------------------------------------------------------------------
@pytest.mark.parametrize("param", [0, 1, 4, 9])
def test_rice_codes_round_trip_and_approach_the_entropy_of_geometric_gaps(param):
    rng = np.random.default_rng(param)
    gaps = np.concatenate([[0, 0, 5000], rng.geometric(1 / 25, 2000) - 1])
    bits = rice_encode(gaps, param)
    back, used = rice_decode(bits, gaps.size, param, 10**6)
    assert used == bits.size and np.array_equal(back, gaps)
    if param == 4:  # mean gap 25: entropy of the geometric law ~6.1 bits; Rice is within ~0.1 of it
        assert bits.size / gaps.size < 6.5


def test_sparse_update_is_64x_smaller_than_float32_positions_and_scales_included():
    """k=4%, 4-bit values: the whole stream (header, scales, positions, values) against 4 bytes a value."""
    for n in (1_505, 3_300, 41_000):  # the three tasks' model sizes
        x = _update(n)
        raw = SparseCodec().encode(x, np.random.default_rng(0))["sparse"]
        assert raw.dtype == np.uint8 and raw.ndim == 1
        assert raw.nbytes / (4 * n) <= 1 / 64, (n, raw.nbytes)
    # on the wire: the raw bytes and the key, no numpy header
    record = encoded_record({"sparse": raw})
    assert record["sparse"].stype == RAW and record.count_bytes() == raw.nbytes + len("sparse")
    assert np.array_equal(record_arrays(record)["sparse"], raw)


def test_sparse_keeps_the_largest_values_and_unbiased_values_among_them():
    x = _update(4_000, seed=2)
    codec = SparseCodec(k_fraction=0.05, bits=4, chunk=64)
    k = 200
    kept = np.sort(np.argsort(-np.abs(x))[:k])
    rng = np.random.default_rng(5)
    draws = [codec.decode(codec.encode(x, rng), x.size) for _ in range(1500)]
    assert all(np.array_equal(np.flatnonzero(d != 0), kept[np.abs(x[kept]) > 0]) or
               set(np.flatnonzero(d)) <= set(kept) for d in draws)
    mean = np.mean(draws, axis=0)
    step = np.abs(x).max() / 7
    assert np.max(np.abs(mean[kept] - x[kept])) < 0.12 * step  # one draw errs by up to a step
    assert np.max(np.abs(draws[0][kept] - x[kept])) > 0.3 * step


def test_sign_values_decode_to_the_chunk_mean_magnitude():
    x = np.array([0.0, 3.0, -1.0, 0.5, 0.0, -2.0], np.float32)
    y = SparseCodec(k_fraction=0.5, bits=1, chunk=8).decode(SparseCodec(k_fraction=0.5, bits=1, chunk=8).encode(
        x, np.random.default_rng(0)), x.size)
    assert np.allclose(y, [0, 2, -2, 0, 0, -2])  # the three largest, each ± their mean magnitude (2)


def test_warm_up_sends_more_in_the_first_rounds():
    codec = SparseCodec(k_fraction=0.02, warmup_rounds=2)
    assert [codec.for_round(r).k_fraction for r in (1, 2, 3, 9)] == [0.32, 0.08, 0.02, 0.02]
    assert SparseCodec(k_fraction=0.2, warmup_rounds=3).for_round(1).k_fraction == 1.0
    down = codec.for_downlink()
    assert (down.k_fraction, down.bits, down.warmup_rounds) == (0.15, 8, 0)


# -- hostile streams: a clear ValueError, never another error, never a wrong-sized vector -----------
def test_malformed_sparse_streams_are_refused_with_a_value_error():
    codec, n = SparseCodec(), 3_000
    raw = codec.encode(_update(n), np.random.default_rng(0))["sparse"]
    cases = {
        "short header": raw[:5],
        "truncated": raw[: raw.size // 2],
        "too many values": np.concatenate([np.array([n + 1], "<u4").view(np.uint8), raw[4:]]),
        "zero values": np.concatenate([np.array([0], "<u4").view(np.uint8), raw[4:]]),
        "other value bits": np.concatenate([raw[:5], [np.uint8(2)], raw[6:]]),
        "huge Rice parameter": np.concatenate([raw[:4], [np.uint8(200)], raw[5:]]),
        "NaN scale": np.concatenate([raw[:SPARSE_HEADER], np.array([np.nan], "<f4").view(np.uint8),
                                     raw[SPARSE_HEADER + 4:]]),
        "all ones": np.full(raw.size, 255, np.uint8),
    }
    for what, bad in cases.items():
        with pytest.raises(ValueError):
            codec.decode({"sparse": bad}, n)
        assert what
    with pytest.raises(ValueError, match="array 'sparse' missing"):
        codec.decode({"q": raw}, n)


def test_random_and_mutated_streams_never_raise_anything_but_value_error():
    codec, n = SparseCodec(k_fraction=0.1), 500
    good = codec.encode(_update(n), np.random.default_rng(0))["sparse"]
    rng = np.random.default_rng(1)
    for i in range(400):
        bad = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8) if i % 2 else good.copy()
        if i % 2 == 0:
            bad[rng.integers(0, bad.size, 3)] ^= rng.integers(1, 256, 3, dtype=np.uint8)
        try:
            out = codec.decode({"sparse": bad}, n)
        except ValueError:
            continue
        assert out.shape == (n,) and np.isfinite(out).all()


def test_a_record_in_another_serialisation_is_a_value_error():
    record = ArrayRecord({"sparse": Array(dtype="uint8", shape=(3,), stype="pickle", data=b"abc")})
    with pytest.raises(ValueError, match="cannot be read"):
        record_arrays(record)


# -- error feedback with momentum correction ------------------------------------------------------
def _descend(feedback: ErrorFeedback | None, codec, steps=300) -> float:
    """SGD on a problem where 40 coordinates carry large zero-mean noise every step and 460 a small,
    steady gradient: top-k of the bare update picks the noise every time and the steady part never
    moves; error feedback accumulates it until it is sent. Returns the distance to the target left."""
    rng = np.random.default_rng(0)
    target = np.zeros(500, np.float32)
    target[40:] = 1.0
    w = np.zeros(500, np.float32)
    for step in range(steps):
        grad = w - target
        grad[:40] = rng.normal(0.0, 5.0, 40)  # noise on coordinates whose target is 0
        update = -0.05 * grad
        enc = feedback.encode(update, rng) if feedback else codec.encode(update, rng)
        w = w + codec.decode(enc, w.size)
    return float(np.linalg.norm((w - target)[40:]) / np.linalg.norm(target[40:]))


@pytest.mark.parametrize("codec", [SparseCodec(k_fraction=0.04, bits=4), TopKCodec(k_fraction=0.04)],
                         ids=["sparse", "topk"])
def test_error_feedback_with_momentum_correction_converges_where_plain_top_k_stalls(codec):
    assert _descend(None, codec) > 0.99  # plain top-k: the steady coordinates never move
    assert _descend(ErrorFeedback(codec), codec) < 0.3  # with error feedback they get most of the way
    assert _descend(ErrorFeedback(codec, momentum=0.5), codec) < 0.3


def test_momentum_factor_masking_clears_the_velocity_where_values_were_sent():
    codec = SparseCodec(k_fraction=0.25, bits=8)
    feedback = ErrorFeedback(codec, momentum=0.9)
    x = np.array([4.0, 0.1, 0.2, 0.3, 0.01, 0.02, 0.03, 0.04], np.float32)
    sent = codec.decode(feedback.encode(x, np.random.default_rng(0)), x.size)
    assert feedback.velocity is not None and feedback.residual is not None
    assert np.all(feedback.velocity[sent != 0] == 0) and np.allclose(feedback.velocity[sent == 0], x[sent == 0])
    assert np.allclose(feedback.residual + sent, x, atol=1e-6)  # nothing lost: sent + kept = the update


# -- the delta downlink starts from the seeded model ---------------------------------------------------
def _train_message(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=1, message_type="train")


def _seeded(codec: str, gateways: int):
    """A fresh run's strategy (quality control, ``codec``) that starts from the task's seeded model: (cfg, strategy,
    task, the model's arrays, a grid of ``gateways``, gateway 1's empty context)."""
    from iiotfl.tasks import get_task

    cfg = compose([f"codec={codec}", "task=quality_control"])
    validate(cfg)
    strategy = build_strategy(cfg)
    task = get_task(cfg["task"], cfg["seed"])
    model = {k: v.numpy() for k, v in task.build_model().state_dict().items()}
    strategy.seeded_start = weights_digest(model)
    grid = SimpleNamespace(get_node_ids=lambda: list(range(1, gateways + 1)))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return cfg, strategy, task, model, grid, context


def test_the_first_round_sends_the_seeded_models_digest_and_the_gateway_builds_it(serverapp_identity):
    cfg, strategy, task, model, grid, context = _seeded("sparse", 4)
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    assert messages and all(not m.content.array_records for m in messages)  # no model on the wire
    config = messages[0].content.config_records["config"]
    assert config[wire.SEEDED_START] == weights_digest(model)
    view = _start_view(_train_message(messages[0].content), context, get_codec(cfg["codec"]), task.build_model)
    assert weights_digest(view) == config[wire.SEEDED_START]

    def other_model():  # a gateway whose build differs (another version): refused, never trained on
        m = task.build_model()
        with torch.no_grad():
            next(m.parameters()).add_(1e-3)
        return m

    with pytest.raises(RuntimeError, match="seeded initial model differs"):
        _start_view(_train_message(messages[0].content), context, get_codec(cfg["codec"]), other_model)
    # a model that is not the seeded one (a resumed run) goes in full
    strategy2 = build_strategy(cfg)
    strategy2.seeded_start = "0" * 32
    full = list(strategy2.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    assert all("arrays" in m.content.array_records for m in full)


def test_a_delta_message_sent_again_after_an_outage_starts_from_the_same_view(serverapp_identity):
    """The round's message comes twice (the first reply was lost while the SuperLink saw the gateway offline):
    the delta is applied once, the second delivery starts from the same view, and an older delta still fails."""
    cfg, strategy, task, model, grid, context = _seeded("int8", 2)
    codec = get_codec(cfg["codec"])
    first = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in model.items()}),
                                          ConfigRecord({}), grid))
    _start_view(_train_message(first[0].content), context, codec, task.build_model)
    strategy.current = {1, 2}  # both answered round 1
    moved = {k: v + np.float32(0.01) for k, v in model.items()}
    second = list(strategy.configure_train(2, ArrayRecord({k: Array(v) for k, v in moved.items()}),
                                           ConfigRecord({}), grid))
    assert "delta" in second[0].content.array_records
    once = _start_view(_train_message(second[0].content), context, codec, task.build_model)
    again = _start_view(_train_message(second[0].content), context, codec, task.build_model)
    assert weights_digest(again) == weights_digest(once) != weights_digest(model)
    assert max(float(np.max(np.abs(once[k] - moved[k]))) for k in moved) < 1e-3  # int8 downlink: close, lossy
    stale = RecordDict({"delta": second[0].content.array_records["delta"],
                        "config": ConfigRecord({**second[0].content.config_records["config"],
                                                wire.BASE_ROUND: 1, wire.SERVER_ROUND: 3})})
    with pytest.raises(RuntimeError, match="delta against round 1, but this gateway holds round 2"):
        _start_view(_train_message(stale), context, codec, task.build_model)  # another round's delta: refused


def test_the_local_optimiser_is_adam_or_sgd_with_momentum():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(optimiser(params, "adam", 0.01, 0.0), torch.optim.Adam)
    sgd = optimiser(params, "sgd", 0.01, 0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="train.optimizer='lbfgs'"):
        optimiser(params, "lbfgs", 0.01, 0.0)
