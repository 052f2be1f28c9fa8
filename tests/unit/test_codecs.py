"""Update codecs: error bounds, unbiased stochastic rounding, top-k with error feedback,
the registry, the wire bytes pinned, and the codec section's config checks."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from iiotfl.configs import CONFIG_DIR, ConfigError
from iiotfl.strategies.codecs import (
    CODECS,
    Codec,
    ErrorFeedback,
    Fp16Codec,
    Int4Codec,
    Int8Codec,
    NoneCodec,
    SparseCodec,
    TopKCodec,
    flatten,
    get_codec,
    unflatten,
    validate_codec,
    wire_bytes,
)

ALL = [NoneCodec(), Fp16Codec(), Int8Codec(), Int4Codec(), TopKCodec(k_fraction=0.1), SparseCodec(),
       SparseCodec(bits=1), SparseCodec(bits=2, k_fraction=0.5), SparseCodec(bits=8, k_fraction=1.0)]


def _update(n=10_001, seed=0):
    rng = np.random.default_rng(seed)
    # heavy-tailed like a real model delta, with some exact zeros
    x = (rng.standard_t(3, n) * 1e-3).astype(np.float32)
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
def test_round_trip_within_stated_bound(codec):
    x = _update()
    enc = codec.encode(x, np.random.default_rng(1))
    y = codec.decode(enc, x.size)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.abs(y - x) <= codec.error_bound(x))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_quantisation_is_unbiased(name):
    codec = CODECS[name](chunk=64)
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
    base = wire_bytes(NoneCodec().encode(x, np.random.default_rng(0)))
    ratio = {c.name: wire_bytes(c.encode(x, np.random.default_rng(0))) / base for c in ALL}
    assert ratio["fp16"] == pytest.approx(0.5, abs=1e-3)
    assert ratio["int8"] <= 0.27
    assert ratio["int4"] <= 0.145
    assert ratio["topk"] <= 0.052


def test_malformed_update_is_rejected():
    codec = Int8Codec()
    enc = codec.encode(_update(1000), np.random.default_rng(0))
    with pytest.raises(ValueError, match="do not fit"):
        codec.decode(enc, 5000)
    with pytest.raises(ValueError, match="missing"):
        codec.decode({"q": enc["q"]}, 1000)
    top = TopKCodec().encode(_update(1000), np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside the model"):
        TopKCodec().decode(top, 500)
    with pytest.raises(ValueError, match="do not match"):
        TopKCodec().decode({**top, "gaps": np.ones(top["q"].size + 300, np.uint8)}, 1000)


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
    codec = TopKCodec(k_fraction=1 / d)
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


# -- the bytes on the wire, pinned: computed with the codecs before they became classes --------
def _digest(enc, *more):
    h = hashlib.sha256()
    for key, a in enc.items():  # key order is wire order (the ArrayRecord's)
        a = np.ascontiguousarray(a)
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    for a in more:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


PINNED = [  # (codec config, values, seed, wire bytes, digest of the arrays + decoded + error bound)
    ({"name": "none"}, 10_001, 0, 40004, "0282f32dbeb897f8"),
    ({"name": "fp16"}, 10_001, 0, 20002, "b37d168891f6f526"),
    ({"name": "int8"}, 10_001, 0, 10400, "92d28f355170d33b"),
    ({"name": "int4"}, 10_001, 0, 5280, "5d3d887d9cf7fe2b"),
    ({"name": "topk", "k_fraction": 0.1}, 10_001, 0, 2041, "b2565b625497d95a"),
    ({"name": "int8", "chunk": 64}, 1_001, 3, 1088, "91a53856cafec4c8"),
    ({"name": "int4", "chunk": 64}, 1_001, 3, 576, "088410e0c4c5b123"),
    ({"name": "int4", "chunk": 9}, 1_001, 3, 952, "f6541dbc6ae2d968"),  # odd codes: a padding nibble
    ({"name": "topk", "k_fraction": 0.09, "chunk": 64}, 1_001, 3, 227, "076199774bbc1561"),
    ({"name": "topk", "k_fraction": 0.001}, 10_001, 5, 304, "c70ad6f8dc7de79f"),  # gaps > 255: filler entries
]


@pytest.mark.parametrize("cfg, n, seed, nbytes, digest", PINNED, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_wire_bytes_and_decoded_values_are_pinned(cfg, n, seed, nbytes, digest):
    codec = get_codec(cfg)
    x = _update(n, seed)
    enc = codec.encode(x, np.random.default_rng(seed + 1))
    assert wire_bytes(enc) == nbytes
    assert _digest(enc, codec.decode(enc, n), codec.error_bound(x)) == digest


def test_error_feedback_is_pinned():
    ef = ErrorFeedback(get_codec({"name": "topk", "k_fraction": 0.09, "error_feedback": True}))
    rng = np.random.default_rng(11)
    got = [_digest(ef.encode(_update(2_000, r), rng), ef.residual) for r in range(4)]
    assert got == ["f7eaa17d7f959ca7", "393c411e987fd710", "14b1697a01a0e833", "ed8e4add0b6ff95a"]


# -- the registry ---------------------------------------------------------------------------
def test_registry_lists_the_codecs_and_the_config_groups():
    assert list(CODECS) == ["none", "fp16", "int8", "int4", "topk", "sparse"]
    assert all(issubclass(cls, Codec) and cls.name == name for name, cls in CODECS.items())
    assert {p.stem for p in Path(CONFIG_DIR, "codec").glob("*.yaml")} == set(CODECS)


@pytest.mark.parametrize("name", ["none", "fp16", "int8", "int4", "topk", "sparse"])
def test_shipped_config_groups_validate_and_build(name):
    section = yaml.safe_load(Path(CONFIG_DIR, "codec", f"{name}.yaml").read_text())
    validate_codec({"codec": section})
    codec = get_codec(section)
    assert type(codec) is CODECS[name] and codec.name == name
    assert codec.describe() and "\n" not in codec.describe()


def test_get_codec_builds_what_the_config_says():
    assert get_codec(None) == get_codec({}) == NoneCodec()
    assert get_codec({"name": "int8", "chunk": 64}) == Int8Codec(chunk=64)
    assert get_codec({"name": "int4"}) == Int4Codec(chunk=256)
    assert get_codec({"name": "topk", "k_fraction": 0.09}) == TopKCodec(k_fraction=0.09, chunk=256)
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        get_codec({"name": "zip"})


def test_describe_says_what_goes_on_the_wire():
    assert NoneCodec().describe() == "float32 values"
    assert Fp16Codec().describe() == "float16 values"
    assert Int8Codec(chunk=64).describe() == "int8 per 64-element chunk + fp32 scale"
    assert Int4Codec().describe() == "int4 (two per byte) per 256-element chunk + fp32 scale"
    assert TopKCodec(k_fraction=0.09).describe() == (
        "top 9% of values: uint8 position gap + int8 value per 256-element chunk + fp32 scale")


# -- the codec section's checks: the one-line messages configs.validate gave ------------------
REFUSED = [
    ({"name": "zip", "downlink": "full"},
     "config: codec.name='zip' is unknown; pick codec=<one of ['none', 'fp16', 'int8', 'int4', 'topk', 'sparse']>"),
    ({"name": "none", "downlink": "half"},
     "config: codec.downlink='half' is unknown; set codec.downlink to one of ['full', 'delta']"),
    ({"name": "fp16"}, "config: codec.downlink is missing; add it or restore the config group's default"),
    ({"name": "int8", "chunk": 4, "downlink": "delta"},
     "config: codec.chunk=4 is invalid; it must be an integer >= 8 (e.g. codec.chunk=8)"),
    ({"name": "int4", "chunk": 16.0, "downlink": "full"},
     "config: codec.chunk=16.0 is invalid; it must be an integer >= 8 (e.g. codec.chunk=8)"),
    ({"name": "int4", "downlink": "full"},
     "config: codec.chunk is missing; add it or restore the config group's default"),
    ({"name": "topk", "k_fraction": 0, "downlink": "full"},
     "config: codec.k_fraction=0 is invalid; it must be a number in (0.0, 1.0]"),
    ({"name": "topk", "k_fraction": 1.5, "downlink": "full"},
     "config: codec.k_fraction=1.5 is invalid; it must be a number in (0.0, 1.0]"),
    ({"name": "topk", "k_fraction": 0.09, "downlink": "delta"},
     "config: codec.downlink=delta with codec=topk would lose what top-k drops on the way down; "
     "use codec.downlink=full"),
]


@pytest.mark.parametrize("section, message", REFUSED, ids=lambda v: "" if isinstance(v, str) else str(v))
def test_validate_refuses_each_bad_value_with_its_message(section, message):
    with pytest.raises(ConfigError) as err:
        validate_codec({"codec": section})
    assert str(err.value) == message
    if section["name"] in CODECS:  # the class states the same check on its own section
        with pytest.raises(ConfigError) as err:
            CODECS[section["name"]].validate(section)
        assert str(err.value) == message


def test_validate_names_the_key_where_the_section_sits():
    with pytest.raises(ConfigError, match=r"^config: fleet\.codec\.chunk=4 is invalid"):
        Int8Codec.validate({"chunk": 4, "downlink": "full"}, path="fleet.codec")
    validate_codec({"codec": {"name": "int8", "chunk": 8, "downlink": "delta"}})
    validate_codec({"codec": {"name": "topk", "k_fraction": 1.0, "downlink": "full"}})


@pytest.mark.parametrize("codec", [c for c in ALL if c.name != "sparse"], ids=lambda c: c.name)
def test_a_non_finite_update_is_malformed_for_every_codec(codec):
    """A rogue or diverged gateway's NaN or inf (in its values or in a chunk's scale) is refused at decoding, so the
    strategy leaves that gateway out instead of averaging NaN into every plant's model."""
    enc = codec.encode(_update(1000), np.random.default_rng(0))
    assert np.isfinite(codec.decode(enc, 1000)).all()
    floats = [key for key, arr in enc.items() if np.issubdtype(arr.dtype, np.floating) and arr.size]
    assert floats, f"{codec.name} sends no float array to poison"
    for key in floats:
        bad = {**enc, key: enc[key].copy()}
        bad[key].ravel()[0] = np.nan
        with pytest.raises(ValueError, match=r"decoded values are not finite \(NaN or inf\)"):
            codec.decode(bad, 1000)
