"""Homomorphic aggregation: keys, packing, the decrypted sum, and bad updates (real SEAL/TenSEAL)."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import RecordDict as RD

from iiotfl.clients.app import _encrypted, _he_update, he_decrypt
from iiotfl.configs import compose, from_run_config, to_run_config
from iiotfl.strategies import he
from iiotfl.strategies.codecs import flatten, get_codec
from iiotfl.strategies.he_fedavg import Contribution, HEFedAvg, decrypt_request, digest


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("he")
    he.KeySet.generate().write(d)
    return d


def test_key_files_split_secret_and_public(keydir):
    device, server = keydir / he.DEVICE_FILE, keydir / he.SERVER_FILE
    assert stat.S_IMODE(device.stat().st_mode) == 0o600
    dev, srv = he.KeySet.load(device), he.KeySet.load(server)
    assert dev.can_decrypt and not srv.can_decrypt
    assert dev.fingerprint == srv.fingerprint
    with pytest.raises(he.HEError, match="already holds"):
        he.KeySet.generate().write(keydir)
    assert he.KeySet.load(device).fingerprint == dev.fingerprint  # nothing was overwritten


def test_server_material_cannot_decrypt(keydir):
    dev, srv = he.KeySet.load(keydir / he.DEVICE_FILE), he.KeySet.load(keydir / he.SERVER_FILE)
    values = np.arange(-500, 500, dtype=np.int64)
    payload = srv.encrypt_slots(values)  # the server can encrypt (public key) ...
    assert np.array_equal(dev.decrypt_slots(payload)[: values.size], values)
    with pytest.raises(he.HEError, match="cannot decrypt"):  # ... but holds no secret key
        srv.decrypt_slots(payload)
    # SEAL itself: a decryptor under any other secret key of the same parameters reads noise
    other = seal.KeyGenerator(srv.context).secret_key()
    plain = seal.Plaintext()
    seal.Decryptor(srv.context, other).decrypt(srv.ciphertexts(payload)[0], plain)
    guessed = np.asarray(seal.BatchEncoder(srv.context).decode_int64(plain))[: values.size]
    assert np.mean(guessed == values) < 0.01


def test_coefficient_addition_equals_seal_evaluator(keydir):
    dev = he.KeySet.load(keydir / he.DEVICE_FILE)
    a, b = dev.encrypt_slots(np.full(10, 7)), dev.encrypt_slots(np.full(10, -3))
    ours = dev.ciphertexts(dev.add([a, b]))[0]
    theirs = dev.ciphertexts(a)[0]
    seal.Evaluator(dev.context).add_inplace(theirs, dev.ciphertexts(b)[0])
    assert dev._to_bytes(ours) == dev._to_bytes(theirs)
    assert np.all(dev.decrypt_slots(dev._to_bytes(ours))[:10] == 4)


def test_decrypted_aggregate_is_weighted_fedavg_within_the_bound(keydir):
    dev, srv = he.KeySet.load(keydir / he.DEVICE_FILE), he.KeySet.load(keydir / he.SERVER_FILE)
    rng = np.random.default_rng(1)
    n = 40_000
    counts = np.array([12, 3000, 450, 90, 1700.0])  # uneven example counts
    weights = counts * len(counts) / counts.sum()
    updates = [rng.normal(0, 0.01, n).astype(np.float32) for _ in counts]
    ranges = np.full(n, 0.03)
    payloads = [he.encrypt_update(dev, u, ranges, w, rng)[0] for u, w in zip(updates, weights)]
    assert len(payloads[0]) == he.ciphertext_count(n) * he.CT_BYTES
    total = srv.add(payloads, he.ciphertext_count(n))
    mean = he.decode_sum(dev.decrypt_slots(total), n, ranges, weights.sum())
    expected = sum(c * np.clip(u, -0.03, 0.03) for c, u in zip(counts / counts.sum(), updates))
    bound = he.error_bound(ranges, len(counts), weights.sum())
    assert np.all(np.abs(mean - expected) <= bound + 1e-7)
    assert np.abs(mean - expected).max() > 0  # it is quantised: the check is not vacuous


def test_statistics_limbs_sum_exactly(keydir):
    dev = he.KeySet.load(keydir / he.DEVICE_FILE)
    parts = [np.array([[1234.5, 6.02e9, -17.25]]) * k for k in (1, 3, 7)]
    payloads = [dev.encrypt_slots(he.to_limbs(p)) for p in parts]
    total = he.from_limbs(dev.decrypt_slots(dev.add(payloads)), 3, 3)
    assert np.allclose(total, sum(parts).ravel(), rtol=0, atol=3 * 2.0 ** -20)


# -- binding a ciphertext to its run, round and gateway ------------------------------------
def test_the_binding_key_is_the_gateways_alone_and_survives_a_reload(keydir, tmp_path):
    generated = he.KeySet.generate()
    generated.write(tmp_path)
    loaded, server = he.KeySet.load(tmp_path / he.DEVICE_FILE), he.KeySet.load(tmp_path / he.SERVER_FILE)
    payload = b"\x01" * he.CT_BYTES
    tag = generated.bind("update", 2**64 - 1, 3, 2**63 + 5, payload)
    assert loaded.bind("update", 2**64 - 1, 3, 2**63 + 5, payload) == tag  # every gateway makes the same tag
    assert loaded.is_bound(tag, "update", 2**64 - 1, 3, 2**63 + 5, payload)
    for other in (("stats", 2**64 - 1, 3, 2**63 + 5, payload), ("update", 1, 3, 2**63 + 5, payload),
                  ("update", 2**64 - 1, 4, 2**63 + 5, payload), ("update", 2**64 - 1, 3, 1, payload),
                  ("update", 2**64 - 1, 3, 2**63 + 5, payload[:-1] + b"\x02")):
        assert not loaded.is_bound(tag, *other)
    assert not he.KeySet.load(keydir / he.DEVICE_FILE).is_bound(tag, "update", 2**64 - 1, 3, 2**63 + 5, payload)
    with pytest.raises(he.HEError, match="only a gateway can bind"):
        server.bind("update", 1, 1, 1, payload)


def test_decrypted_sums_are_checked_for_length_and_range(keydir):
    dev = he.KeySet.load(keydir / he.DEVICE_FILE)
    rng = np.random.default_rng(0)
    size = 20_000
    z = [he.quantise_update(rng.normal(0, 0.01, size), np.full(size, 0.02), 1.0, rng)[0] for _ in range(3)]
    slots = dev.decrypt_slots(dev.add([dev.encrypt_slots(he.pack(v)) for v in z]))
    he.check_update_sum(slots, size)  # a real sum passes
    with pytest.raises(he.HEError, match="where an update of 40000 values has"):
        he.check_update_sum(slots, 40_000)
    with pytest.raises(he.HEError, match="out of the quantisation range"):
        he.check_update_sum(slots, size - 4)  # non-zero values past the update's end
    garbage = rng.integers(-(2**55), 2**55, slots.size)
    with pytest.raises(he.HEError, match="out of the quantisation range"):
        he.check_update_sum(garbage, size)
    limbs = dev.decrypt_slots(dev.add([dev.encrypt_slots(he.to_limbs(np.array([1.5, -2e6]))) for _ in range(3)]))
    he.check_limb_sum(limbs, 2, 3)
    with pytest.raises(he.HEError, match="out of range for a sum of 1 devices"):
        he.check_limb_sum(limbs, 2, 1)
    with pytest.raises(he.HEError, match="where 9000 statistics have"):
        he.check_limb_sum(limbs, 9000, 3)


# -- the strategy, with a grid whose gateways are the real ClientApp handlers -----------------
RUN = 7


class _Grid:
    """Gateways holding device.he, each with its own Flower Context (state kept between messages, as the
    SuperNode keeps it per run); ``query.he_decrypt`` is answered by the ClientApp's own handler."""

    def __init__(self, run_config: dict, key: Path, nodes) -> None:
        self.contexts = {n: Context(run_id=RUN, node_id=n, node_config={"he-key": str(key)}, state=RD(),
                                    run_config=run_config) for n in nodes}
        self.asked: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.asked.append(msg.metadata.dst_node_id)
            out.append(he_decrypt(msg, self.contexts[msg.metadata.dst_node_id]))
        return out


def _reply(node: int, content: RecordDict) -> Message:
    from flwr.app import Metadata

    meta = Metadata(run_id=RUN, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)


def test_bad_updates_are_rejected_by_name_and_the_rest_aggregate(keydir, tmp_path, serverapp_identity):
    cfg = compose(["strategy=he", f"strategy.keys={keydir}"])
    run_config = to_run_config(cfg, tmp_path)
    strategy = HEFedAvg(keys=keydir / he.SERVER_FILE, codec=get_codec(None), fraction_train=1.0,
                        min_available_nodes=1)
    view = {"a": np.zeros((30, 700), np.float32), "b": np.zeros(500, np.float32)}
    strategy.view, strategy.sent_ranges = view, [0.02, 0.02]
    nodes = [11, 12, 13, 14, 15]
    strategy.grid = grid = _Grid(run_config, keydir / he.DEVICE_FILE, nodes)
    strategy.weights = {n: 1.0 for n in nodes}
    dev = he.KeySet.load(keydir / he.DEVICE_FILE)
    stranger = he.KeySet.generate()
    settings = from_run_config(run_config)
    rng = np.random.default_rng(0)
    size = flatten(view).size
    updates = {n: rng.normal(0, 0.005, size) for n in nodes}
    replies = []
    for n in nodes:
        config = ConfigRecord({"server-round": 1, "he-fingerprint": dev.fingerprint, "he-ranges": [0.02, 0.02],
                               "he-weight": 1.0})
        if n == 13:  # a gateway holding another key set
            payload, _ = he.encrypt_update(stranger, updates[n], np.full(size, 0.02), 1.0, rng)
            records = _encrypted(payload, stranger, "he-update", grid.contexts[n], "update", 1, size)
        else:
            records, _ = _he_update(settings, grid.contexts[n], config, updates[n], view, rng)
        payload = records["he-update"]["ct"].numpy().tobytes()
        if n == 14:  # tampered in transit: one byte flipped
            payload = payload[:100] + bytes([payload[100] ^ 0xFF]) + payload[101:]
        if n == 15:  # wrong length: one ciphertext short
            payload = payload[: -he.CT_BYTES]
            records["he"]["digest"] = digest(payload)
        records["he-update"] = ArrayRecord({"ct": Array(np.frombuffer(payload, np.uint8))})
        replies.append(_reply(n, RecordDict({**records, "metrics": MetricRecord({"num-examples": 10})})))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert set(strategy.rejected) == {13, 14, 15}
    assert "key set" in strategy.rejected[13]
    assert "digest" in strategy.rejected[14]
    assert "ciphertexts where the model needs" in strategy.rejected[15]
    assert strategy.current == {11, 12}
    got = flatten({k: v.numpy() for k, v in arrays.items()})
    expected = (np.clip(updates[11], -0.02, 0.02) + np.clip(updates[12], -0.02, 0.02)) / 2
    assert np.abs(got - expected).max() <= he.error_bound(np.full(size, 0.02), 2, 2.0)[0] + 1e-7
    assert strategy.grid.asked == [11]


def test_a_gateway_refuses_to_decrypt_a_single_update(keydir, tmp_path, serverapp_identity):
    cfg = compose(["strategy=he", f"strategy.keys={keydir}"])
    grid = _Grid(to_run_config(cfg, tmp_path), keydir / he.DEVICE_FILE, [3])
    dev = he.KeySet.load(keydir / he.DEVICE_FILE)
    payload = dev.encrypt_slots(he.to_limbs(np.arange(5.0)))
    records = _encrypted(payload, dev, "stats-he", grid.contexts[3], "stats", 0, 5)
    one = Contribution(3, payload, records["he"]["tag"])
    msg = Message(content=decrypt_request([one], 0, "stats", dev), dst_node_id=3, message_type="query.he_decrypt")
    msg.content["config"]["min-aggregate"] = 1  # what the server says does not count
    with pytest.raises(he.HEError, match="decrypts only sums of at least 2"):
        grid.send_and_receive([msg])
    fresh = _Grid(to_run_config(cfg, tmp_path), keydir / he.DEVICE_FILE, [3])  # has encrypted nothing this run
    with pytest.raises(he.HEError, match="encrypted nothing in this run"):
        fresh.send_and_receive([msg])


def test_bad_key_files_give_one_line_errors(tmp_path):
    with pytest.raises(he.HEError, match="not found; create the key set with `iiotfl keys"):
        he.KeySet.load(tmp_path / "missing.he")
    bad = tmp_path / "bad.he"
    bad.write_bytes(b"not a zip")
    with pytest.raises(he.HEError, match="not an iiotfl key set"):
        he.KeySet.load(bad)
    with pytest.raises(he.HEError, match="must be given server.he"):
        he.KeySet.generate().write(tmp_path / "k")
        HEFedAvg(keys=tmp_path / "k" / he.DEVICE_FILE, codec=None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_encoder_refuses_non_finite_values_before_they_become_int64_min(bad):
    """A NaN cast to int64 is INT64_MIN, whose abs() overflows past the headroom guard and decrypts to a finite,
    wrong sum: the encoders refuse it, for updates and for the normalisation statistics."""
    update = np.zeros(10, dtype=np.float32)
    update[3] = bad
    with pytest.raises(he.HEError, match=r"1 non-finite values \(NaN or inf\)"):
        he.quantise_update(update, np.full(10, 0.5), 1.0, np.random.default_rng(0))
    with pytest.raises(he.HEError, match=r"statistic is not finite"):
        he.to_limbs(np.array([1.0, bad]))
    z, _ = he.quantise_update(np.full(10, 0.2, np.float32), np.full(10, 0.5), 1.0, np.random.default_rng(0))
    assert np.all(np.abs(z) <= he.LEVELS)  # finite updates still encode
