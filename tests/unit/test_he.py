"""Homomorphic aggregation: keys, packing, the decrypted sum, and bad updates (real SEAL/TenSEAL)."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import RecordDict as RD

from iiotfl.configs import compose, to_run_config
from iiotfl.strategies import he
from iiotfl.strategies.codecs import flatten
from iiotfl.strategies.he_fedavg import HEFedAvg, digest


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


# -- the strategy, with a grid whose gateways are the real ClientApp handlers -----------------
class _Grid:
    """Answers ``query.he_decrypt`` with the ClientApp's own handler on a gateway holding device.he."""

    def __init__(self, run_config: dict, key: Path) -> None:
        self.run_config, self.key = run_config, key
        self.asked: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):
        from iiotfl.clients.app import he_decrypt

        out = []
        for msg in messages:
            self.asked.append(msg.metadata.dst_node_id)
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={"he-key": str(self.key)},
                              state=RD(), run_config=self.run_config)
            out.append(he_decrypt(msg, context))
        return out


def _reply(node: int, content: RecordDict) -> Message:
    from flwr.app import Metadata

    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)




def test_bad_updates_are_rejected_by_name_and_the_rest_aggregate(keydir, tmp_path, serverapp_identity):
    cfg = compose(["strategy=he", f"strategy.keys={keydir}"])
    run_config = to_run_config(cfg, tmp_path)
    strategy = HEFedAvg(keys=keydir / he.SERVER_FILE, codec=__import__("iiotfl.strategies.codecs").strategies.codecs.get_codec(None),
                        fraction_train=1.0, min_available_nodes=1)
    view = {"a": np.zeros((30, 700), np.float32), "b": np.zeros(500, np.float32)}
    strategy.view, strategy.sent_ranges = view, [0.02, 0.02]
    strategy.grid = _Grid(run_config, keydir / he.DEVICE_FILE)
    nodes = [11, 12, 13, 14, 15]
    strategy.weights = {n: 1.0 for n in nodes}
    dev = he.KeySet.load(keydir / he.DEVICE_FILE)
    stranger = he.KeySet.generate()
    rng = np.random.default_rng(0)
    size = flatten(view).size
    updates = {n: rng.normal(0, 0.005, size) for n in nodes}
    ranges = np.full(size, 0.02)
    replies = []
    for n in nodes:
        keys = stranger if n == 13 else dev
        payload, _ = he.encrypt_update(keys, updates[n], ranges, 1.0, rng)
        meta = {"fingerprint": keys.fingerprint, "digest": digest(payload)}
        if n == 14:  # tampered in transit: one byte flipped
            payload = payload[:100] + bytes([payload[100] ^ 0xFF]) + payload[101:]
        if n == 15:  # wrong length: one ciphertext short
            payload = payload[: -he.CT_BYTES]
            meta["digest"] = digest(payload)
        replies.append(_reply(n, RecordDict({
            "he-update": ArrayRecord({"ct": Array(np.frombuffer(payload, np.uint8))}),
            "he": ConfigRecord(meta), "metrics": MetricRecord({"num-examples": 10})})))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert set(strategy.rejected) == {13, 14, 15}
    assert "key set" in strategy.rejected[13]
    assert "digest" in strategy.rejected[14]
    assert "ciphertexts where the model needs" in strategy.rejected[15]
    assert strategy.current == {11, 12}
    got = flatten({k: v.numpy() for k, v in arrays.items()})
    expected = (np.clip(updates[11], -0.02, 0.02) + np.clip(updates[12], -0.02, 0.02)) / 2
    assert np.abs(got - expected).max() <= he.error_bound(ranges, 2, 2.0)[0] + 1e-7
    assert strategy.grid.asked == [11]


def test_a_gateway_refuses_to_decrypt_a_single_update(keydir, tmp_path, serverapp_identity):
    cfg = compose(["strategy=he", f"strategy.keys={keydir}"])
    grid = _Grid(to_run_config(cfg, tmp_path), keydir / he.DEVICE_FILE)
    payload = he.KeySet.load(keydir / he.SERVER_FILE).encrypt_slots(np.arange(5))
    msg = Message(content=RecordDict({
        "sum": ArrayRecord({"ct": Array(np.frombuffer(payload, np.uint8))}),
        "config": ConfigRecord({"contributors": 1, "min-aggregate": 2, "fingerprint": "x", "digest": digest(payload),
                                "server-round": 1})}), dst_node_id=3, message_type="query.he_decrypt")
    with pytest.raises(he.HEError, match="decrypts only sums of at least 2"):
        grid.send_and_receive([msg])


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
