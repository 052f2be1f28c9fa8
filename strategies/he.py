"""Homomorphic encryption for aggregation: packed BFV ciphertexts that add up on the server.

What a device sends is the model update quantised to integers on a scale every device
shares, packed several per ciphertext slot, encrypted under the fleet's public key. The
server adds ciphertexts (it has no secret key: it cannot decrypt, and SEAL refuses to).
One device decrypts the *sum* and returns it; the server divides by the total weight.

Parameters (128-bit security, SEAL's ``TC128`` check at load time)
-----------------------------------------------------------------
==================  ==============================================================
scheme              BFV (exact integers; addition only, so no relinearisation or
                    Galois keys exist at all)
N                   4096 (polynomial degree = slots per ciphertext)
q                   two 40-bit primes (80 bits; 128-bit security allows ≤ 109)
t                   a 57-bit prime ≡ 1 (mod 2N) (batching)
digits per slot     4, each 14 bits, balanced (signed): slot = Σ_k d_k · 2^(14k)
value               an int8 step (±127) times the device's weight (≈ 1)
==================  ==============================================================

Headroom: a digit holds ±8191, so the *sum* of up to ``MAX_DEVICES`` = 64 devices'
values (64 · 127.5 ≤ 8160) never carries into its neighbour; |slot| < 2^56 < t/2.
Noise: a fresh ciphertext keeps ≈ 11 bits of noise budget, 64 additions spend 6.

Bytes: a ciphertext is 2 polynomials × 2 primes × 4096 coefficients. Every coefficient
is below its 40-bit prime, so it travels as 5 bytes: 81,920 B for 4 · 4096 = 16,384
values, 5.0 B per value = **1.25 × float32**. (SEAL's own zstd serialisation of the same
ciphertext is 1.38×; CKKS N=8192 as NVFLARE configures it is ~15×, see bench/he.py.)

Quantisation: value = clip(x, −r, r) · w / step with step = r / 127, stochastically
rounded (unbiased). The decrypted aggregate differs from plaintext weighted FedAvg of the
clipped updates by at most ``step · D / (2 · Σ w)`` per element for deterministic
rounding; stochastic rounding has the same bound of one step per device in the worst
case and zero mean (:func:`error_bound`).

Binding: a gateway tags each ciphertext with HMAC-SHA256 over (key set, kind, run, round,
node, SHA-256 of the bytes), keyed by HKDF-SHA256 of the secret key (:meth:`KeySet.bind`):
every gateway can make and check a tag, the server (public key only) can do neither. What
a decrypted sum must look like to be returned: :func:`check_update_sum`, :func:`check_limb_sum`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

POLY_DEGREE = 4096
COEFF_BITS = (40, 40)
PLAIN_BITS = 57
DIGIT_BITS = 14
DIGITS = 4
LEVELS = 127  # int8 steps
MAX_DEVICES = 64
COEFF_BYTES = 5  # every coefficient < 2^40
CT_COEFFS = 2 * len(COEFF_BITS) * POLY_DEGREE
CT_BYTES = CT_COEFFS * COEFF_BYTES
VALUES_PER_CT = POLY_DEGREE * DIGITS

BINDING_KINDS = ("update", "stats", "centred")  # what a bound ciphertext may hold (wire.HE_KIND_*)
BINDING_INFO = b"iiotfl he binding v1"  # HKDF label: the binding key is used for nothing else

DEVICE_FILE = "device.he"   # parameters, public key, secret key (0600; devices only)
SERVER_FILE = "server.he"   # parameters, public key (the server's material)


class HEError(ValueError):
    """A key file or ciphertext that cannot be used; the message says what and how to fix it."""


def _tmp_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _parameters() -> seal.EncryptionParameters:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(POLY_DEGREE)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(POLY_DEGREE, list(COEFF_BITS)))
    parms.set_plain_modulus(seal.PlainModulus.Batching(POLY_DEGREE, PLAIN_BITS))
    return parms


def _context(parms: seal.EncryptionParameters) -> seal.SEALContext:
    # no key-switching: the data level keeps both primes (addition needs nothing else)
    ctx = seal.SEALContext(parms, False, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise HEError(f"HE parameters rejected by SEAL: {ctx.parameters_error_message()}")
    return ctx


def _save(obj, name: str, work: Path) -> bytes:
    path = work / name
    obj.save(str(path))
    return path.read_bytes()


@dataclass
class KeySet:
    """The fleet's HE material. ``secret`` is None on the server: it can add, not decrypt."""

    parms: seal.EncryptionParameters
    context: seal.SEALContext
    public: seal.PublicKey
    secret: seal.SecretKey | None
    fingerprint: str  # parameters + public key; every ciphertext says which one it is under
    _prefix: bytes | None = None
    _binding: bytes | None = None

    # -- provisioning --------------------------------------------------------------------
    @classmethod
    def generate(cls) -> "KeySet":
        parms = _parameters()
        ctx = _context(parms)
        gen = seal.KeyGenerator(ctx)
        public = seal.PublicKey()
        gen.create_public_key(public)
        return cls._make(parms, ctx, public, gen.secret_key())

    @classmethod
    def _make(cls, parms, ctx, public, secret) -> "KeySet":
        with tempfile.TemporaryDirectory(dir=_tmp_dir()) as work:
            blob = _save(parms, "parms", Path(work)) + _save(public, "pk", Path(work))
        return cls(parms, ctx, public, secret, hashlib.sha256(blob).hexdigest()[:16])

    def write(self, directory: str | Path, force: bool = False) -> tuple[Path, Path]:
        """Write ``device.he`` (0600, with the secret key) and ``server.he`` (public only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        device, server = directory / DEVICE_FILE, directory / SERVER_FILE
        if not force and (device.exists() or server.exists()):
            raise HEError(f"{directory} already holds an HE key set; keep it, or pass --force to replace it "
                          "(devices holding the old key can no longer take part)")
        if self.secret is None:
            raise HEError("this key set has no secret key (it is the server's); provision with `iiotfl keys`")
        with tempfile.TemporaryDirectory(dir=_tmp_dir()) as work:
            parts = {"parms": _save(self.parms, "parms", Path(work)),
                     "public_key": _save(self.public, "pk", Path(work))}
            secret = _save(self.secret, "sk", Path(work))
        for path, members in ((server, parts), (device, {**parts, "secret_key": secret})):
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if path == device else 0o644)
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
            os.replace(tmp, path)
        os.chmod(device, 0o600)
        return device, server

    @classmethod
    def load(cls, path: str | Path) -> "KeySet":
        """Load ``device.he`` or ``server.he``; a secret key is loaded only if the file has one."""
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as zf:
                members = {n: zf.read(n) for n in zf.namelist()}
        except FileNotFoundError:
            raise HEError(f"HE key file {path} not found; create the key set with `iiotfl keys DIR`") from None
        except (zipfile.BadZipFile, OSError) as err:
            raise HEError(f"HE key file {path} is not an iiotfl key set ({err}); "
                          "re-create it with `iiotfl keys`") from None
        if "parms" not in members or "public_key" not in members:
            raise HEError(f"HE key file {path} lacks parameters or public key; re-create it with `iiotfl keys`")
        with tempfile.TemporaryDirectory(dir=_tmp_dir()) as work:
            w = Path(work)
            for name, data in members.items():
                (w / name).write_bytes(data)
            parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
            try:
                parms.load(str(w / "parms"))
                ctx = _context(parms)
                public = seal.PublicKey()
                public.load(ctx, str(w / "public_key"))
                secret = None
                if "secret_key" in members:
                    secret = seal.SecretKey()
                    secret.load(ctx, str(w / "secret_key"))
            except (RuntimeError, ValueError) as err:
                raise HEError(f"HE key file {path} is corrupt ({err}); re-create it with `iiotfl keys`") from None
        return cls._make(parms, ctx, public, secret)

    @property
    def can_decrypt(self) -> bool:
        return self.secret is not None

    @property
    def plain_modulus(self) -> int:
        return int(self.parms.plain_modulus().value())

    # -- ciphertext bytes ----------------------------------------------------------------
    # SEAL serialises a ciphertext as a header, 97 bytes of metadata (parameter id, size,
    # degree, …; the same for every ciphertext under these parameters) and the 16,384
    # coefficients as uint64, zstd-compressed. On the wire only the coefficients travel, 5
    # bytes each; the receiver puts the metadata back and lets SEAL load (and check) it.
    def _stream(self, ct: seal.Ciphertext) -> bytes:
        with tempfile.NamedTemporaryFile(dir=_tmp_dir()) as tmp:
            ct.save(tmp.name)
            data = Path(tmp.name).read_bytes()
        if data[4] == 0:  # saved without compression
            return data[16:]
        return zstandard.ZstdDecompressor().decompress(data[16:], max_output_size=1 << 22)

    def _to_bytes(self, ct: seal.Ciphertext) -> bytes:
        raw = self._stream(ct)
        coeffs = np.frombuffer(raw[len(raw) - CT_COEFFS * 8:], dtype="<u8")
        if coeffs.size != CT_COEFFS or int(coeffs.max()) >= 1 << (8 * COEFF_BYTES):
            raise HEError("unexpected ciphertext layout from SEAL")
        return coeffs.view(np.uint8).reshape(CT_COEFFS, 8)[:, :COEFF_BYTES].tobytes()

    def _template(self) -> bytes:
        if self._prefix is None:
            zero = seal.Ciphertext()
            seal.Encryptor(self.context, self.public).encrypt_zero(zero)
            raw = self._stream(zero)
            self._prefix = raw[: len(raw) - CT_COEFFS * 8]
        return self._prefix

    def _from_bytes(self, data: bytes) -> seal.Ciphertext:
        body = self._template() + self.coefficients(data, 1).astype("<u8").tobytes()
        header = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, 0, 0, 16 + len(body))
        ct = seal.Ciphertext()
        with tempfile.NamedTemporaryFile(dir=_tmp_dir()) as tmp:
            Path(tmp.name).write_bytes(header + body)
            try:
                ct.load(self.context, tmp.name)
            except (RuntimeError, ValueError) as err:
                raise HEError(f"ciphertext rejected by SEAL ({err}): tampered or under another key set") from None
        if not seal.is_valid_for(ct, self.context):
            raise HEError("ciphertext coefficients out of range for these parameters (tampered or another key set)")
        return ct

    # -- the operations ------------------------------------------------------------------
    def encrypt_slots(self, slots: np.ndarray) -> bytes:
        """Encrypt int64 slot values (|v| < t/2), ``POLY_DEGREE`` per ciphertext, as packed bytes."""
        encoder, encryptor = seal.BatchEncoder(self.context), seal.Encryptor(self.context, self.public)
        slots = np.asarray(slots, dtype=np.int64)
        pad = (-slots.size) % POLY_DEGREE
        slots = np.concatenate([slots, np.zeros(pad, np.int64)]).reshape(-1, POLY_DEGREE)
        out = []
        for row in slots:
            plain, ct = seal.Plaintext(), seal.Ciphertext()
            encoder.encode(row.tolist(), plain)
            encryptor.encrypt(plain, ct)
            out.append(self._to_bytes(ct))
        return b"".join(out)

    @property
    def moduli(self) -> np.ndarray:
        return np.array([m.value() for m in self.parms.coeff_modulus()], dtype=np.uint64)

    def coefficients(self, payload: bytes, expected: int | None = None) -> np.ndarray:
        """Packed ciphertext bytes → coefficients, shape (ciphertexts, 2 polys, primes, N).

        Checks what the server can check without a secret key: whole ciphertexts, the
        expected count, every coefficient below its prime."""
        if len(payload) % CT_BYTES or not payload:
            raise HEError(f"{len(payload)} bytes is not a whole number of {CT_BYTES}-byte ciphertexts")
        count = len(payload) // CT_BYTES
        if expected is not None and count != expected:
            raise HEError(f"{count} ciphertexts where the model needs {expected} (another model or a truncated update)")
        # each coefficient is the low 5 bytes of an (unaligned) 8-byte read at 5-byte steps
        padded = np.frombuffer(payload + bytes(8 - COEFF_BYTES), np.uint8)
        words = np.ndarray((count * CT_COEFFS,), dtype="<u8", buffer=padded, strides=(COEFF_BYTES,))
        coeffs = np.bitwise_and(words, np.uint64((1 << (8 * COEFF_BYTES)) - 1))
        coeffs = coeffs.reshape(count, 2, len(COEFF_BITS), POLY_DEGREE)
        if (coeffs.max(axis=(0, 1, 3)) >= self.moduli).any():
            raise HEError("ciphertext coefficients out of range for these parameters (tampered or another key set)")
        return coeffs

    @staticmethod
    def to_payload(coeffs: np.ndarray) -> bytes:
        return np.ascontiguousarray(coeffs, dtype="<u8").reshape(-1, 1).view(np.uint8)[:, :COEFF_BYTES].tobytes()

    def ciphertexts(self, payload: bytes, expected: int | None = None) -> list[seal.Ciphertext]:
        """Packed ciphertext bytes → SEAL ciphertexts (checked by SEAL as well)."""
        self.coefficients(payload, expected)
        return [self._from_bytes(payload[i * CT_BYTES:(i + 1) * CT_BYTES]) for i in range(len(payload) // CT_BYTES)]

    def add(self, payloads: list[bytes], expected: int | None = None) -> bytes:
        """Homomorphic sum of several devices' ciphertexts; needs no secret key.

        BFV addition is coefficient-wise addition modulo each prime (what SEAL's
        ``Evaluator.add`` does; ``tests/unit/test_he.py`` checks they agree), done here on
        all ciphertexts of an update at once."""
        total = self.coefficients(payloads[0], expected).copy()
        for payload in payloads[1:]:  # < 2^40 each: 2^23 devices fit a uint64 before reducing
            total += self.coefficients(payload, total.shape[0])
        total %= self.moduli[None, None, :, None]
        return self.to_payload(total)

    # -- binding a ciphertext to its run, round and gateway --------------------------------
    def _binding_key(self) -> bytes:
        """HKDF-SHA256 of the secret key's coefficients: material every gateway holds and the server does not."""
        if self.secret is None:
            raise HEError("this key set holds no secret key: only a gateway can bind a ciphertext or check a binding")
        if self._binding is None:
            data = self.secret.data()
            coeffs = np.fromiter((data.data(i) for i in range(data.coeff_count())), dtype="<u8")
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=BINDING_INFO)
            self._binding = hkdf.derive(coeffs.tobytes())
        return self._binding

    def bind(self, kind: str, run_id: int, server_round: int, node_id: int, payload: bytes) -> str:
        """HMAC-SHA256 tag over (key set, kind, run, round, node, SHA-256 of the ciphertext bytes)."""
        if kind not in BINDING_KINDS:
            raise HEError(f"cannot bind a ciphertext of kind {kind!r}; kinds are {', '.join(BINDING_KINDS)}")
        fields = ("iiotfl-he-binding", self.fingerprint, kind, str(int(run_id)), str(int(server_round)),
                  str(int(node_id)), hashlib.sha256(payload).hexdigest())
        return hmac.new(self._binding_key(), "\x1f".join(fields).encode(), hashlib.sha256).hexdigest()

    def is_bound(self, tag: str, kind: str, run_id: int, server_round: int, node_id: int, payload: bytes) -> bool:
        """Whether ``tag`` binds ``payload`` to this kind, run, round and node (constant-time compare)."""
        return hmac.compare_digest(self.bind(kind, run_id, server_round, node_id, payload).encode(), str(tag).encode())

    def decrypt_slots(self, payload: bytes) -> np.ndarray:
        if self.secret is None:
            raise HEError("this key set holds no secret key: the server cannot decrypt")
        decryptor, encoder = seal.Decryptor(self.context, self.secret), seal.BatchEncoder(self.context)
        out = []
        for ct in self.ciphertexts(payload):
            if decryptor.invariant_noise_budget(ct) <= 0:
                raise HEError("ciphertext noise budget exhausted (more devices than the parameters allow)")
            plain = seal.Plaintext()
            decryptor.decrypt(ct, plain)
            out.append(np.asarray(encoder.decode_int64(plain), dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)


# -- packing integers into slots ---------------------------------------------------------
def ciphertext_count(values: int) -> int:
    return -(-values // VALUES_PER_CT)


def pack(z: np.ndarray) -> np.ndarray:
    """Integers (|z| < 2^13) → slot values, DIGITS balanced digits of DIGIT_BITS each."""
    z = np.asarray(z, dtype=np.int64)
    pad = (-z.size) % VALUES_PER_CT
    z = np.concatenate([z, np.zeros(pad, np.int64)]).reshape(-1, DIGITS)
    weights = np.int64(1) << (DIGIT_BITS * np.arange(DIGITS, dtype=np.int64))
    return z @ weights


def unpack(slots: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`pack` for a sum of packed vectors (each digit sum stays in ±2^13)."""
    x = np.asarray(slots, dtype=np.int64).copy()
    half, full = np.int64(1 << (DIGIT_BITS - 1)), np.int64(1 << DIGIT_BITS)
    digits = []
    for _ in range(DIGITS):
        low = ((x + half) % full) - half
        digits.append(low)
        x = (x - low) >> DIGIT_BITS
    return np.stack(digits, axis=1).ravel()[:size]


# -- updates -----------------------------------------------------------------------------
def steps(ranges: np.ndarray) -> np.ndarray:
    return np.asarray(ranges, dtype=np.float64) / LEVELS


def element_ranges(per_tensor, tensors) -> np.ndarray:
    """The per-tensor ranges the server sends, one per element of the flattened update."""
    return np.repeat(np.asarray(per_tensor, dtype=np.float64), [np.size(v) for v in tensors.values()])


def quantise_update(update: np.ndarray, ranges: np.ndarray, weight: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """``round(clip(update, ±ranges) · weight / step)``, stochastically; and the clipped fraction.

    ``ranges`` is per element (the server sends one per tensor, expanded by the caller);
    ``weight`` is this device's share of the round times the number sampled (≈ 1)."""
    if not np.isfinite(update).all():  # NaN would become INT64_MIN and decrypt to finite, wrong sums
        raise HEError(f"the update has {int(np.count_nonzero(~np.isfinite(update)))} non-finite values (NaN or inf): "
                      "local training diverged; check this plant's data")
    r = np.asarray(ranges, dtype=np.float64)
    clipped = np.clip(update.astype(np.float64), -r, r)
    saturated = float(np.mean(np.abs(update) > r)) if update.size else 0.0
    y = clipped * weight / steps(r)
    low = np.floor(y)
    z = (low + (rng.random(y.shape) < (y - low))).astype(np.int64)
    if np.abs(z).max(initial=0) > LEVELS * MAX_DEVICES:
        raise HEError(f"weight {weight:.3f} too large for the digit headroom")
    return z, saturated


def encrypt_update(keys: KeySet, update: np.ndarray, ranges: np.ndarray, weight: float,
                   rng: np.random.Generator) -> tuple[bytes, float]:
    z, saturated = quantise_update(update, ranges, weight, rng)
    return keys.encrypt_slots(pack(z)), saturated


def check_update_sum(slots: np.ndarray, size: int) -> None:
    """A decrypted sum of packed updates of ``size`` values, or HEError: the slot count of that many
    ciphertexts, every slot a packable integer (balanced digits, nothing above the top one), zeros past ``size``."""
    slots = np.asarray(slots, dtype=np.int64)
    expected = ciphertext_count(size) * POLY_DEGREE
    if slots.size != expected:
        raise HEError(f"decrypted {slots.size} slots where an update of {size} values has {expected}; "
                      "refused (not this task's update)")
    digits = unpack(slots, slots.size * DIGITS)
    if not np.array_equal(pack(digits), slots) or digits[size:].any():
        raise HEError(f"decrypted update sum is out of the quantisation range (balanced {DIGIT_BITS}-bit digits, "
                      f"{size} values); refused (tampered, another key set or not an update)")


def decode_sum(slots: np.ndarray, size: int, ranges: np.ndarray, total_weight: float) -> np.ndarray:
    """The weighted mean update from the decrypted slot sums."""
    return decode_digits(unpack(slots, size), ranges, total_weight)


def decode_digits(digits: np.ndarray, ranges: np.ndarray, total_weight: float) -> np.ndarray:
    """The weighted mean update from the summed quantised values (any secure sum's, unpacked)."""
    return (np.asarray(digits, dtype=np.float64) * steps(ranges) / total_weight).astype(np.float32)


def error_bound(ranges: np.ndarray, devices: int, total_weight: float) -> np.ndarray:
    """Largest difference (per element) between decoded aggregate and weighted FedAvg of the
    clipped updates: each device's rounding moves its integer by < 1."""
    return steps(ranges) * devices / total_weight


# -- exact secure sums of real numbers (normalisation statistics) -------------------------
FRACTION_BITS = 20
_OFFSET = 1 << 62


def to_limbs(values: np.ndarray) -> np.ndarray:
    """Fixed point (2^-20) int64, offset to be non-negative, split into two 31-bit limbs.

    A sum of up to 2^25 devices' limbs stays far below t/2, so the sum is exact; |value|
    must stay below 2^41 (4.4e12)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise HEError("statistic is not finite (NaN or inf) and cannot be summed securely; check this plant's data")
    if np.abs(v).max(initial=0) >= 2.0 ** 41:
        raise HEError("statistic too large for the fixed-point secure sum (|value| ≥ 2^41)")
    z = (np.round(v * 2.0 ** FRACTION_BITS).astype(np.int64) + _OFFSET).astype(np.uint64)
    mask = np.uint64((1 << 31) - 1)
    return np.stack([(z & mask), (z >> np.uint64(31)) & mask, z >> np.uint64(62)], axis=1).astype(np.int64).ravel()


def limb_ciphertext_count(values: int) -> int:
    """Ciphertexts of ``values`` statistics: three limbs each, ``POLY_DEGREE`` limbs per ciphertext."""
    return -(-3 * values // POLY_DEGREE)


def check_limb_sum(slots: np.ndarray, size: int, devices: int) -> None:
    """A decrypted sum of ``devices`` devices' limbs of ``size`` statistics, or HEError: the slot count,
    every limb sum within ``devices`` times a limb's range, zeros past the limbs."""
    slots = np.asarray(slots, dtype=np.int64)
    expected = limb_ciphertext_count(size) * POLY_DEGREE
    if slots.size != expected:
        raise HEError(f"decrypted {slots.size} slots where {size} statistics have {expected}; "
                      "refused (not this task's statistics)")
    limbs = slots[: 3 * size].reshape(size, 3)
    top = devices * np.array([(1 << 31) - 1, (1 << 31) - 1, 1], dtype=np.int64)
    if (limbs < 0).any() or (limbs > top).any() or slots[3 * size:].any():
        raise HEError(f"decrypted statistics are out of range for a sum of {devices} devices' limbs; "
                      "refused (tampered, another key set or not statistics)")


def from_limbs(limb_sums: np.ndarray, size: int, devices: int) -> np.ndarray:
    """Exact sum of ``devices`` devices' values from the summed limbs."""
    limbs = np.asarray(limb_sums, dtype=np.int64)[: size * 3].reshape(size, 3)
    out = np.empty(size, dtype=np.float64)
    for i, (a, b, c) in enumerate(limbs.tolist()):
        total = int(a) + (int(b) << 31) + (int(c) << 62) - devices * _OFFSET
        out[i] = total / 2.0 ** FRACTION_BITS
    return out
