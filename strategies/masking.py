"""Masked sums of packed integer digits: the maths of ``strategy=mask`` (``mask_fedavg.py``).

A gateway's update is quantised to int8 steps exactly as under ``strategy=he``
(:func:`strategies.he.quantise_update`: per-tensor ranges every gateway shares, times its
FedAvg weight, stochastic rounding), and then, instead of being encrypted, *masked* in
the ring of integers modulo ``2^k``, where ``k`` is just wide enough for the sum of the
cohort's values (:func:`bits_for`: 8 bits and the headroom for ``n`` gateways, 12 bits for
10). The server adds the masked vectors modulo ``2^k``; the masks cancel or are removed,
and what is left is the sum of the digits. Nothing is encrypted on the uplink: the
update travels as ``k`` bits per value, 0.375 × float32 for 10 gateways.

Masks (the SecAgg construction of Bonawitz et al., CCS 2017, on ``k``-bit words):

* **pairwise**: gateways ``i`` and ``j`` agree on a secret once per run (X25519 key
  agreement, :class:`RunKeys`) and derive a fresh seed for each round from it (HKDF-SHA256
  over run, round and the pair, :func:`pair_seed`). ``i`` adds ``PRG(seed)``, ``j`` subtracts
  it; in the sum they cancel. The seeds of one round tell nothing about another's.
* **self mask**: a fresh random seed ``b`` per gateway and round (OS entropy), whose
  ``PRG(b)`` is added too. ``b`` is Shamir-shared (pycryptodome's ``Shamir`` over
  GF(2^128), two 16-byte chunks) with the *other* members of the cohort, ``t`` shares
  rebuilding it; each share is encrypted to its holder with AES-256-GCM under a key from
  the pair's X25519 secret (HKDF over run, round, sender and holder), so the server, which
  relays them, reads none.

PRG: the ChaCha20 key stream (``cryptography``), one 256-bit key per seed, read as
little-endian ``uint16`` words masked to ``k`` bits. Unmasking after the round (the one
extra exchange): each survivor returns its shares of the other survivors' self masks
and, for each gateway that dropped out, the pair's seed of *this round* (never the
X25519 secret). Why that resists a malicious server, and what it costs when a survivor
then drops too: ``mask_fedavg.py``.

Nothing here is a cipher or a field of its own: X25519, Ed25519, HKDF, AES-GCM and ChaCha20
are ``cryptography``'s, Shamir's scheme is pycryptodome's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from iiotfl.strategies.he import LEVELS

MAX_COHORT = 128          # 2 · 128 · 128 < 2^16: every sum fits a 16-bit word
SEED_BYTES = 32
SHARE_BYTES = 4 + SEED_BYTES          # holder index (uint32, little-endian) and two 16-byte Shamir chunks
SEALED_SHARE_BYTES = SHARE_BYTES + 16  # AES-GCM's tag (the nonce is fixed: every key seals one share)
KEY_BYTES = 32            # an X25519 or Ed25519 public key
SIGNATURE_BYTES = 64      # Ed25519
_PAIR = b"iiotfl mask pair v1"
_SHARE = b"iiotfl mask share v1"
_NONCE = bytes(12)


class MaskError(ValueError):
    """A masked contribution, share or request that fails a check: one line saying what and why."""


def bits_for(cohort: int) -> int:
    """Bits per masked word: room for the sum of ``cohort`` gateways' values (each at most 127 × its
    weight + 1 after stochastic rounding, the weights summing to ``cohort``), with its sign."""
    if not 1 <= cohort <= MAX_COHORT:
        raise MaskError(f"a masked cohort holds 1 to {MAX_COHORT} gateways, not {cohort}")
    return math.ceil(math.log2(2 * (LEVELS + 1) * cohort + 1))


def threshold_for(cohort: int, fraction: float) -> int:
    """Shares that rebuild a self mask: ``ceil(fraction × cohort)``, at least 2 and at most cohort − 1
    (a gateway never holds a share of its own mask)."""
    return min(max(2, math.ceil(fraction * cohort)), cohort - 1)


def min_survivors(cohort: int, fraction: float, min_aggregate: int, own: int = 0) -> int:
    """The fewest survivors whose sum is unmasked: t + 1 (a survivor's self mask is rebuilt from the
    *other* survivors' shares), the run's minimum and a gateway's own, whichever is largest."""
    return max(threshold_for(cohort, fraction) + 1, min_aggregate, own)


def packed_bytes(values: int, bits: int) -> int:
    return -(-values * bits // 8)


# -- words on the wire ---------------------------------------------------------------------
def pack(words: np.ndarray, bits: int) -> np.ndarray:
    """``k``-bit words (0 ≤ w < 2^k, k ≤ 16) → bytes, big-endian bit order, the last byte zero-padded."""
    w = np.asarray(words, dtype=np.uint16)
    as_bits = np.unpackbits(w.astype(">u2").view(np.uint8).reshape(-1, 2), axis=1)[:, 16 - bits:]
    return np.packbits(as_bits.ravel())


def unpack(payload: np.ndarray, values: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack` (``values`` words; padding bits ignored). Eight words fill ``bits`` bytes:
    read a row of them at a time, each word from the (at most) three bytes it spans."""
    groups = -(-values // 8)
    raw = np.zeros(groups * bits + 2, dtype=np.int64)
    raw[: np.size(payload)] = np.asarray(payload, dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(raw, shape=(groups, bits + 2), strides=(bits * 8, 8))
    out = np.empty((groups, 8), dtype=np.int64)
    for i in range(8):
        b, o = divmod(i * bits, 8)
        window = (rows[:, b] << 16) | (rows[:, b + 1] << 8) | rows[:, b + 2]
        out[:, i] = (window >> (24 - o - bits)) & ((1 << bits) - 1)
    return out.ravel()[:values]


def prg(seed: bytes, values: int, bits: int) -> np.ndarray:
    """``values`` pseudo-random ``k``-bit words from a 32-byte seed: the ChaCha20 key stream."""
    if len(seed) != SEED_BYTES:
        raise MaskError(f"a mask seed has {SEED_BYTES} bytes, not {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(2 * values))
    return (np.frombuffer(stream, dtype="<u2").astype(np.int64)) & ((1 << bits) - 1)


def signed(words: np.ndarray, bits: int) -> np.ndarray:
    """A sum modulo 2^k read back as a signed integer in [−2^(k−1), 2^(k−1))."""
    full, half = 1 << bits, 1 << (bits - 1)
    return ((np.asarray(words, dtype=np.int64) + half) % full) - half


# -- keys ----------------------------------------------------------------------------------
def _raw(public) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class RunKeys:
    """One gateway's keys for one run: X25519 (pairwise secrets, share sealing) and Ed25519 (signing
    its contributions). Made on the gateway from OS entropy when the run first asks; kept in the run's
    ``context.state``; never sent, only their public halves."""

    agree: bytes   # X25519 private key, raw
    sign: bytes    # Ed25519 private key, raw

    @classmethod
    def generate(cls) -> "RunKeys":
        return cls(X25519PrivateKey.generate().private_bytes_raw(), Ed25519PrivateKey.generate().private_bytes_raw())

    @property
    def agree_public(self) -> bytes:
        return _raw(X25519PrivateKey.from_private_bytes(self.agree).public_key())

    @property
    def sign_public(self) -> bytes:
        return _raw(Ed25519PrivateKey.from_private_bytes(self.sign).public_key())

    def shared(self, peer_public: bytes) -> bytes:
        """The X25519 secret with a peer (32 bytes); MaskError for a key that is not one."""
        try:
            peer = X25519PublicKey.from_public_bytes(peer_public)
            secret = X25519PrivateKey.from_private_bytes(self.agree).exchange(peer)
        except ValueError as err:
            raise MaskError(f"a peer's key agreement key is not an X25519 public key ({err})") from None
        return secret

    def signature(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.sign).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- gateway identities: the fleet's certificates vouch for run keys ----------------------------
_VOUCH = b"iiotfl mask run keys v1"


def _vouched(run_id: int, node: int, agree: bytes, sign: bytes) -> bytes:
    return _VOUCH + struct.pack(">QQ", run_id, node) + agree + sign


@dataclass(frozen=True)
class Identity:
    """A gateway's certificate from the fleet's CA (``gateways/gateway-<i>.crt``, its TLS client certificate),
    its key, and the CA: the gateway signs its run keys with the key, and accepts a peer's run keys only
    under a certificate the CA issued. The server relays them and can neither make nor alter one."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, ca: str | Path) -> "Identity":
        paths = {"identity-cert": cert, "identity-key": key, "identity-ca": ca}
        for name, path in paths.items():
            if not Path(path).is_file():
                raise MaskError(f"{name} {path} not found; give the gateway its gateways/gateway-<i>.crt, "
                                "gateway-<i>.tls.key and ca.crt from `iiotfl certs`")
        try:
            crt = x509.load_pem_x509_certificate(Path(cert).read_bytes())
            ca_crt = x509.load_pem_x509_certificate(Path(ca).read_bytes())
            private = serialization.load_pem_private_key(Path(key).read_bytes(), None)
        except (ValueError, TypeError) as err:
            raise MaskError(f"identity {cert} / {key} / {ca} cannot be read ({err}); use the PEM files "
                            "`iiotfl certs` wrote") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.public_key() != crt.public_key():
            raise MaskError(f"identity key {key} is not the key of {cert}; give the gateway one pair")
        identity = cls(crt, private, ca_crt)
        identity.check(crt.public_bytes(serialization.Encoding.DER))
        return identity

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.cert)

    def vouch(self, run_id: int, node: int, agree: bytes, sign: bytes) -> tuple[bytes, bytes]:
        """(this certificate, DER; the key's ECDSA signature over the run keys, the run and the node)."""
        proof = self.key.sign(_vouched(run_id, node, agree, sign), ec.ECDSA(hashes.SHA384()))
        return self.cert.public_bytes(serialization.Encoding.DER), proof

    def check(self, cert_der: bytes) -> x509.Certificate:
        """A certificate this fleet's CA issued, valid now, else MaskError."""
        try:
            crt = x509.load_der_x509_certificate(cert_der)
            crt.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise MaskError("a run key comes with a certificate the fleet's CA did not issue") from None
        now = dt.datetime.now(dt.timezone.utc)
        if not crt.not_valid_before_utc <= now <= crt.not_valid_after_utc:
            raise MaskError(f"a run key comes with a certificate not valid now ({crt.subject.rfc4514_string()})")
        return crt

    def verify(self, cert_der: bytes, proof: bytes, run_id: int, node: int, agree: bytes, sign: bytes) -> str:
        """The identity (SHA-256 of the certificate's public key) vouching for a peer's run keys, else MaskError."""
        crt = self.check(cert_der)
        public = crt.public_key()
        try:
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise InvalidSignature
            public.verify(proof, _vouched(run_id, node, agree, sign), ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise MaskError(f"gateway {node}'s run keys are not signed by the certificate sent with them "
                            f"({crt.subject.rfc4514_string()}): substituted or another run's") from None
        return _fingerprint(crt)


def _fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of a certificate's public key: one identity, whatever certificates carry it."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _context(label: bytes, run_id: int, server_round: int, *nodes: int) -> bytes:
    return label + struct.pack(f">QQ{len(nodes)}Q", run_id, server_round, *nodes)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def pair_seed(keys: RunKeys, peer_public: bytes, run_id: int, server_round: int, me: int, peer: int) -> bytes:
    """The pair's mask seed for this run and round (the same on both sides)."""
    low, high = sorted((me, peer))
    return _hkdf(keys.shared(peer_public), _context(_PAIR, run_id, server_round, low, high))


def _share_key(keys: RunKeys, peer_public: bytes, run_id: int, server_round: int, src: int,
               dst: int) -> tuple[bytes, bytes]:
    info = _context(_SHARE, run_id, server_round, src, dst)
    return _hkdf(keys.shared(peer_public), info), info


def seal_share(keys: RunKeys, peer_public: bytes, share: bytes, run_id: int, server_round: int, src: int,
               dst: int) -> bytes:
    """A Shamir share from ``src`` sealed for ``dst`` (AES-256-GCM; run, round and both nodes authenticated)."""
    key, info = _share_key(keys, peer_public, run_id, server_round, src, dst)
    return AESGCM(key).encrypt(_NONCE, share, info)


def open_share(keys: RunKeys, peer_public: bytes, sealed: bytes, run_id: int, server_round: int, src: int,
               dst: int) -> bytes:
    """A share sealed for this gateway, else MaskError (another run, round, sender or tampered)."""
    key, info = _share_key(keys, peer_public, run_id, server_round, src, dst)
    try:
        share = AESGCM(key).decrypt(_NONCE, sealed, info)
    except InvalidTag:
        raise MaskError(f"the share from gateway {src} does not open for this run and round "
                        "(tampered, replayed or not sealed for this gateway)") from None
    if len(share) != SHARE_BYTES:
        raise MaskError(f"the share from gateway {src} has {len(share)} bytes, not {SHARE_BYTES}")
    return share


# -- Shamir shares of a self-mask seed --------------------------------------------------------
def split_seed(seed: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` shares (index 1..holders) of a 32-byte seed, any ``threshold`` of which rebuild it."""
    chunks = [Shamir.split(threshold, holders, seed[i:i + 16], ssss=False) for i in (0, 16)]
    return [struct.pack("<I", a[0]) + a[1] + b[1] for a, b in zip(*chunks)]


def combine_seed(shares: Sequence[bytes]) -> bytes:
    """The seed from at least its threshold of distinct shares (more are fine; too few give a wrong seed)."""
    index = [struct.unpack("<I", s[:4])[0] for s in shares]
    if len(set(index)) != len(index):
        raise MaskError("two shares of one self mask carry the same index")
    return b"".join(Shamir.combine([(i, s[4 + 16 * c: 20 + 16 * c]) for i, s in zip(index, shares)], ssss=False)
                    for c in (0, 1))


def fresh_seed() -> bytes:
    return os.urandom(SEED_BYTES)


# -- one gateway's masked vector ---------------------------------------------------------------
def mask(values: np.ndarray, bits: int, self_seed: bytes, pair_seeds: dict[int, bytes], me: int) -> np.ndarray:
    """``values`` (signed integers) plus ``PRG(self_seed)`` plus, per peer, ``±PRG(pair seed)``
    (+ towards a higher node id, − towards a lower), modulo 2^k: the words this gateway sends."""
    size = int(np.size(values))
    out = np.asarray(values, dtype=np.int64) + prg(self_seed, size, bits)
    for peer, seed in pair_seeds.items():
        out += prg(seed, size, bits) if me < peer else -prg(seed, size, bits)
    return out & ((1 << bits) - 1)


def pair_correction(survivor: int, dropped: int, seed: bytes, size: int, bits: int) -> np.ndarray:
    """What ``survivor`` added for its pair with a ``dropped`` gateway (to subtract from the sum)."""
    m = prg(seed, size, bits)
    return m if survivor < dropped else -m
