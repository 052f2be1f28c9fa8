"""Update codecs: what a model update looks like on the wire.

A codec turns one flat float32 vector (a model update: new weights minus the weights the
gateway started from, concatenated over all tensors) into a few small numpy arrays that
travel in an ``ArrayRecord``, and back. The server decodes before it aggregates.

=========  ==================================================  ==========================
codec      wire format                                         error of one element
=========  ==================================================  ==========================
``none``   float32                                             0
``fp16``   float16                                             ≤ 2^-11·|x| (+ 2^-24)
``int8``   stochastic rounding to 255 levels, one float32      < scale = max|chunk| / 127
           scale per chunk of ``chunk`` elements
``int4``   as int8 with 15 levels (two per byte)               < scale = max|chunk| / 7
``topk``   the ``k_fraction`` largest |x|: position as a        < max|x| / 127 if kept;
           uint8 gap to the previous one, value stochastically  the dropped elements (kept
           rounded to int8 with a float32 scale per chunk       on the device by
                                                                :class:`ErrorFeedback`)
=========  ==================================================  ==========================

Stochastic rounding rounds ``x / scale`` up with probability equal to its fractional
part, so ``E[decode(encode(x))] = x``: quantisation adds zero-mean noise, it does not
bias the average the server computes.

Composition: differential-privacy noise is added to the update *before* encoding (the
codec is post-processing), and encrypted aggregation reuses :func:`quantise`.

One class per codec, subclasses of :class:`Codec`, and one entry each in :data:`CODECS`
(config name -> class). A codec states how it is built from its config section
(``from_config``), which keys of that section it checks (``validate``, one-line
:class:`~iiotfl.configs.ConfigError`), what it puts on the wire (``describe``, for the
reports) and its error (``error_bound``). :func:`get_codec` builds the configured one,
:func:`validate_codec` checks the ``codec`` section. A new codec is one class and one
registry entry; nothing else compares codec names.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import numpy as np

from iiotfl.configs import ConfigError, choice, flag, integer, number, require

Encoded = dict[str, np.ndarray]

DOWNLINKS = ("full", "delta")  # codec.downlink: the whole global model each round | its change, encoded
DEFAULT_CHUNK = 256            # codec.chunk: values per float32 scale
DEFAULT_K_FRACTION = 0.1       # codec.k_fraction: share of the values top-k keeps


# -- flat vectors <-> named tensors ------------------------------------------------------
def flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate tensors (in their mapping order) into one float32 vector."""
    return np.concatenate([np.asarray(t, dtype=np.float32).ravel() for t in tensors.values()])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split ``vector`` back into tensors shaped like ``like``."""
    out, pos = {}, 0
    for name, t in like.items():
        n = int(np.prod(t.shape))
        out[name] = vector[pos : pos + n].reshape(t.shape).astype(np.float32)
        pos += n
    if pos != vector.size:
        raise ValueError(f"update has {vector.size} values, the model {pos}; the sender uses another model")
    return out


def weights_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """A digest of the values themselves (the seeded start: gateway and server built the same model)."""
    return hashlib.sha256(flatten(tensors).tobytes()).hexdigest()[:32]


# -- stochastic quantisation (shared with encrypted aggregation) ------------------------
def quantise(x: np.ndarray, levels: int, chunk: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased stochastic rounding of ``x`` to integers in [-levels, levels].

    Returns ``(q, scales)``: ``q`` int8 of ``x.size`` (padded to whole chunks), one
    float32 scale per chunk with ``x ≈ q * scale``.
    """
    n = x.size
    pad = (-n) % chunk
    xp = np.concatenate([x.astype(np.float32), np.zeros(pad, np.float32)]).reshape(-1, chunk)
    scales = (np.abs(xp).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    y = xp / safe
    low = np.floor(y)
    q = low + (rng.random(y.shape) < (y - low))
    q = np.clip(q, -levels, levels).astype(np.int8)
    return q.ravel(), scales


def dequantise(q: np.ndarray, scales: np.ndarray, size: int) -> np.ndarray:
    chunk = q.size // max(scales.size, 1)
    return (q.reshape(-1, chunk).astype(np.float32) * scales[:, None]).ravel()[:size]


def _pack4(q: np.ndarray) -> np.ndarray:
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # [-7, 7] -> [1, 15]
    if u.size % 2:
        u = np.append(u, np.uint8(8))
    return (u[0::2] << 4) | u[1::2]


def _unpack4(packed: np.ndarray, size: int) -> np.ndarray:
    u = np.empty(packed.size * 2, np.int16)
    u[0::2], u[1::2] = packed >> 4, packed & 0x0F
    return (u[:size] - 8).astype(np.int8)


# -- codecs ----------------------------------------------------------------------------
def _section(path: str, codec_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``codec_cfg`` nested under the dotted ``path``, so the config checkers name the full key."""
    root: Any = codec_cfg
    for part in reversed(path.split(".")):
        root = {part: root}
    return root


@dataclass(frozen=True)
class Codec(ABC):
    """One codec: ``encode`` a float32 vector to wire arrays, ``decode`` them back.

    Contract: ``decode(encode(x, rng), x.size)`` is a float32 vector of ``x.size`` values
    within ``error_bound(x)`` of ``x`` (element-wise), and equal to it in expectation;
    :func:`wire_bytes` of the encoded arrays is the payload on the wire. ``decode`` raises
    ``ValueError`` (never another error) on arrays that do not fit ``size``.
    """

    name: ClassVar[str]  # the config name (codec.name), the key in CODECS
    form: ClassVar[str]  # what the values are, in the privacy ledger's words ("int8-quantised")
    sparsifies: ClassVar[bool] = False  # sends a subset of the values (each gateway its own largest)

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        return self._encode(np.asarray(x, dtype=np.float32).ravel(), rng)

    def decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        """The update a gateway sent; ValueError for a malformed one (the strategy leaves that gateway out of the
        round and names it): missing arrays, or values that are not finite (one NaN would spread to every
        plant's model through the average)."""
        try:
            out = self._decode(enc, size)
        except KeyError as err:
            raise ValueError(f"array {err} missing for codec {self.name}") from None
        bad = int(np.count_nonzero(~np.isfinite(out)))
        if bad:
            raise ValueError(f"{bad} of its {out.size} decoded values are not finite (NaN or inf)")
        return out

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """Per-element bound on |decode(encode(x)) - x| (top-k: the dropped magnitude)."""
        return self._error_bound(np.asarray(x, dtype=np.float32).ravel())

    @abstractmethod
    def describe(self) -> str:
        """What goes on the wire, in a few words (reports, ledger)."""

    def for_round(self, server_round: int) -> Codec:  # noqa: ARG002
        """The codec a gateway encodes this round's update with (a warm-up may change it by round)."""
        return self

    def for_downlink(self) -> Codec:
        """The codec of the server's delta downlink."""
        return self

    @classmethod
    def from_config(cls, codec_cfg: Mapping[str, Any]) -> Codec:
        """The codec a validated ``codec`` config section describes."""
        return cls()

    @classmethod
    def validate(cls, codec_cfg: Mapping[str, Any], path: str = "codec") -> None:
        """Check this codec's keys of ``codec_cfg`` (found at ``path``); raise ConfigError on the first bad one."""
        choice(_section(path, codec_cfg), f"{path}.downlink", DOWNLINKS)

    @abstractmethod
    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded: ...

    @abstractmethod
    def _decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray: ...

    @abstractmethod
    def _error_bound(self, x: np.ndarray) -> np.ndarray: ...


def _decode_values(enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    out = np.asarray(enc["values"]).astype(np.float32)
    if out.size != size:
        raise ValueError(f"{out.size} values, expected {size}")
    return out


@dataclass(frozen=True)
class NoneCodec(Codec):
    """Float32 as it is: the reference."""

    name: ClassVar[str] = "none"
    form: ClassVar[str] = "float32"

    def describe(self) -> str:
        return "float32 values"

    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        return {"values": x}

    def _decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        return _decode_values(enc, size)

    def _error_bound(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)


@dataclass(frozen=True)
class Fp16Codec(Codec):
    """Float16: half the bytes, relative error ≤ 2^-11."""

    name: ClassVar[str] = "fp16"
    form: ClassVar[str] = "float16"

    def describe(self) -> str:
        return "float16 values"

    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        return {"values": x.astype(np.float16)}

    def _decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        return _decode_values(enc, size)

    def _error_bound(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x) * 2.0**-11 + 2.0**-24


@dataclass(frozen=True)
class QuantCodec(Codec):
    """Stochastic rounding to ``2 * levels + 1`` integers, one float32 scale per ``chunk`` values."""

    levels: ClassVar[int]
    chunk: int = DEFAULT_CHUNK

    @classmethod
    def from_config(cls, codec_cfg: Mapping[str, Any]) -> Codec:
        return cls(chunk=int(codec_cfg.get("chunk", DEFAULT_CHUNK)))

    @classmethod
    def validate(cls, codec_cfg: Mapping[str, Any], path: str = "codec") -> None:
        super().validate(codec_cfg, path)
        integer(_section(path, codec_cfg), f"{path}.chunk", 8)

    def _pack(self, q: np.ndarray) -> np.ndarray:
        return q

    def _unpack(self, q: np.ndarray, size: int) -> np.ndarray:
        return q

    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        q, scales = quantise(x, self.levels, self.chunk, rng)
        return {"q": self._pack(q), "scales": scales}

    def _decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        q, scales = np.asarray(enc["q"]), np.asarray(enc["scales"], dtype=np.float32)
        padded = scales.size * self.chunk
        q = self._unpack(q, padded)
        if q.size != padded or padded < size or padded - size >= self.chunk:
            raise ValueError(f"{q.size} codes and {scales.size} scales do not fit {size} values")
        return dequantise(q, scales, size)

    def _error_bound(self, x: np.ndarray) -> np.ndarray:
        pad = (-x.size) % self.chunk
        xp = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, self.chunk)
        scale = np.abs(xp).max(axis=1, keepdims=True) / self.levels
        return np.broadcast_to(scale, xp.shape).ravel()[: x.size] * (1 + 1e-5)


@dataclass(frozen=True)
class Int8Codec(QuantCodec):
    """255 levels, one byte per value."""

    name: ClassVar[str] = "int8"
    form: ClassVar[str] = "int8-quantised"
    levels: ClassVar[int] = 127

    def describe(self) -> str:
        return f"int8 per {self.chunk}-element chunk + fp32 scale"


@dataclass(frozen=True)
class Int4Codec(QuantCodec):
    """15 levels, two values per byte."""

    name: ClassVar[str] = "int4"
    form: ClassVar[str] = "int4-quantised"
    levels: ClassVar[int] = 7

    def describe(self) -> str:
        return f"int4 (two per byte) per {self.chunk}-element chunk + fp32 scale"

    def _pack(self, q: np.ndarray) -> np.ndarray:
        return _pack4(q)

    def _unpack(self, q: np.ndarray, size: int) -> np.ndarray:
        return _unpack4(q.astype(np.uint8), size)


def _top_k(x: np.ndarray, k_fraction: float) -> np.ndarray:
    """Sorted positions (int64) of the ``k_fraction`` largest |x|: at least one, at most all."""
    k = min(x.size, max(1, int(np.ceil(k_fraction * x.size))))
    return np.sort(np.argpartition(np.abs(x), -k)[-k:]).astype(np.int64)


def _top_k_bound(x: np.ndarray, k_fraction: float, step: np.floating) -> np.ndarray:
    """Per-element error bound of a top-k codec: a kept value is off by under ``step``; a dropped one by its own
    magnitude (what the device's error feedback keeps). ``step`` in x's dtype keeps the bound in it."""
    kth = np.abs(x[_top_k(x, k_fraction)]).min()
    return np.where(np.abs(x) >= kth, step * (1 + 1e-5), np.maximum(np.abs(x), step * (1 + 1e-5)))


def _gaps(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions as gaps to the previous one, a gap over 255 bridged by zero-valued filler entries."""
    gaps = np.diff(idx, prepend=-1)
    fill = (gaps - 1) // 255
    if fill.any():
        extra = np.concatenate([idx[i] - 255 * np.arange(fill[i], 0, -1) for i in np.nonzero(fill)[0]])
        idx = np.union1d(idx, extra)
        gaps = np.diff(idx, prepend=-1)
    return idx, gaps


@dataclass(frozen=True)
class TopKCodec(Codec):
    """The ``k_fraction`` largest |x|: uint8 position gaps, values as int8 with a float32 scale per chunk."""

    name: ClassVar[str] = "topk"
    form: ClassVar[str] = "top-k sparsified"
    sparsifies: ClassVar[bool] = True
    k_fraction: float = DEFAULT_K_FRACTION
    chunk: int = DEFAULT_CHUNK

    @classmethod
    def from_config(cls, codec_cfg: Mapping[str, Any]) -> Codec:
        return cls(k_fraction=float(codec_cfg.get("k_fraction", DEFAULT_K_FRACTION)),
                   chunk=int(codec_cfg.get("chunk", DEFAULT_CHUNK)))

    @classmethod
    def validate(cls, codec_cfg: Mapping[str, Any], path: str = "codec") -> None:
        super().validate(codec_cfg, path)
        root = _section(path, codec_cfg)
        number(root, f"{path}.k_fraction", 0.0, 1.0, low_open=True)
        if codec_cfg.get("error_feedback") is not None:
            flag(root, f"{path}.error_feedback")
        if require(root, f"{path}.downlink") == "delta":
            raise ConfigError(f"config: {path}.downlink=delta with {path}=topk would lose what top-k drops on the "
                              f"way down; use {path}.downlink=full")

    def describe(self) -> str:
        return (f"top {self.k_fraction * 100:g}% of values: uint8 position gap + int8 value per "
                f"{self.chunk}-element chunk + fp32 scale")

    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        idx, gaps = _gaps(_top_k(x, self.k_fraction))
        q, scales = quantise(x[idx], 127, self.chunk, rng)
        return {"gaps": gaps.astype(np.uint8), "q": q, "scales": scales}

    def _decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        gaps = np.asarray(enc["gaps"]).astype(np.int64)
        q, scales = np.asarray(enc["q"]), np.asarray(enc["scales"], dtype=np.float32)
        if gaps.size == 0 or q.size != scales.size * self.chunk or not gaps.size <= q.size < gaps.size + self.chunk:
            raise ValueError("positions and values do not match")
        idx = np.cumsum(gaps) - 1
        if idx.min() < 0 or idx.max() >= size or (gaps[1:] == 0).any():
            raise ValueError("positions fall outside the model")
        out = np.zeros(size, np.float32)
        out[idx] = dequantise(q, scales, gaps.size)
        return out

    def _error_bound(self, x: np.ndarray) -> np.ndarray:
        # kept values are int8-quantised against the largest kept magnitude of their chunk;
        # bound it by the largest overall (chunks of kept values are not the input's chunks)
        return _top_k_bound(x, self.k_fraction, np.abs(x).max() / 127)



# -- bit streams: Rice codes of position gaps, fixed-width value codes --------------------
def _put_bits(values: np.ndarray, width: int) -> np.ndarray:
    """``values`` (non-negative, < 2^width) as ``width`` bits each, most significant first: a 0/1 uint8 array."""
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8).ravel()


def _get_bits(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """The inverse of :func:`_put_bits` for ``count`` values."""
    if width == 0:
        return np.zeros(count, np.int64)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return (bits[: count * width].reshape(count, width).astype(np.int64) << shifts).sum(axis=1)


def rice_encode(gaps: np.ndarray, param: int) -> np.ndarray:
    """Golomb-Rice code of non-negative ``gaps``: ``gap >> param`` ones, a zero, then the low ``param`` bits.
    Near the entropy of geometric gaps (top-k positions of a dense vector) for ``param`` ≈ log2(mean gap).
    Returns 0/1 bits (uint8)."""
    gaps = gaps.astype(np.int64)
    quot = gaps >> param
    lengths = quot + 1 + param
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    bits = np.zeros(int(lengths.sum()), np.uint8)
    if quot.any():  # the unary parts
        first = np.repeat(starts, quot)
        bits[first + np.arange(first.size) - np.repeat(np.cumsum(quot) - quot, quot)] = 1
    if param:
        low = _put_bits(gaps & ((1 << param) - 1), param).reshape(-1, param)
        bits[(starts + quot + 1)[:, None] + np.arange(param)] = low
    return bits


def rice_decode(bits: np.ndarray, count: int, param: int, limit: int) -> tuple[np.ndarray, int]:
    """``count`` gaps from the front of ``bits``; (gaps, bits read). ValueError when the stream ends early
    or a gap exceeds ``limit`` (a position outside the model)."""
    zeros = np.flatnonzero(bits == 0)
    gaps = np.empty(count, np.int64)
    pos = 0
    for i in range(count):
        j = int(np.searchsorted(zeros, pos))
        if j >= zeros.size or zeros[j] + 1 + param > bits.size:
            raise ValueError(f"the position stream ends after {i} of {count} positions")
        end = int(zeros[j])
        gap = ((end - pos) << param) | int(_get_bits(bits[end + 1 :], 1, param)[0])
        if gap > limit:
            raise ValueError("a position falls outside the model")
        gaps[i], pos = gap, end + 1 + param
    return gaps, pos


SPARSE_HEADER = 8  # bytes: kept values (uint32), Rice parameter, value bits, two reserved


@dataclass(frozen=True)
class SparseCodec(Codec):
    """Top-k sparsification with entropy-coded positions and low-bit values, one byte stream.

    Keeps the ``k_fraction`` largest |x|. Positions: Golomb-Rice codes of the gaps between
    them (about log2(1/k_fraction) + 1.5 bits each). Values, per chunk of ``chunk`` kept
    values with one float32 scale: ``bits=1`` the sign, decoded as ± the chunk's mean
    magnitude (as in sparse ternary compression; biased, which the device's error feedback
    corrects); ``bits`` 2-8 unbiased stochastic rounding to ``2^(bits-1) - 1`` levels either
    side. The whole update is one array of raw bytes (no numpy header on the wire).

    The downlink (``downlink=delta``) is the server's change since the model the gateways
    hold, encoded by :meth:`for_downlink` (``down_k_fraction``, ``down_bits``); what it
    leaves out stays in the next round's change (the server's view, ``codec_fedavg.py``), so
    nothing is lost, only delayed. ``warmup_rounds``: the first rounds keep 4×, 16×, ...
    more values (capped at all of them), as deep gradient compression warms up its sparsity.
    """

    name: ClassVar[str] = "sparse"
    form: ClassVar[str] = "top-k sparsified, low-bit"
    sparsifies: ClassVar[bool] = True
    k_fraction: float = 0.04
    bits: int = 4
    chunk: int = DEFAULT_CHUNK
    down_k_fraction: float = 0.15
    down_bits: int = 8
    warmup_rounds: int = 0

    @classmethod
    def from_config(cls, codec_cfg: Mapping[str, Any]) -> Codec:
        return cls(**{f: type(getattr(cls, f))(codec_cfg[f]) for f in
                      ("k_fraction", "bits", "chunk", "down_k_fraction", "down_bits", "warmup_rounds")
                      if codec_cfg.get(f) is not None})

    @classmethod
    def validate(cls, codec_cfg: Mapping[str, Any], path: str = "codec") -> None:
        super().validate(codec_cfg, path)
        root = _section(path, codec_cfg)
        for key in ("k_fraction", "down_k_fraction"):
            number(root, f"{path}.{key}", 0.0, 1.0, low_open=True)
        for key in ("bits", "down_bits"):
            integer(root, f"{path}.{key}", 1, 8)
        integer(root, f"{path}.chunk", 8)
        integer(root, f"{path}.warmup_rounds", 0, 100)
        if codec_cfg.get("error_feedback") is not None:
            flag(root, f"{path}.error_feedback")
        number(root, f"{path}.momentum", 0.0, 0.99)

    def describe(self) -> str:
        values = "sign × chunk mean" if self.bits == 1 else f"{self.bits}-bit stochastic"
        return (f"top {self.k_fraction * 100:g}% of values: Rice-coded positions + {values} values, fp32 scale per "
                f"{self.chunk} kept")

    def for_round(self, server_round: int) -> SparseCodec:
        """This round's codec: ``k_fraction`` × 4^(rounds of warm-up left), at most every value."""
        left = self.warmup_rounds - server_round + 1
        if left <= 0:
            return self
        return replace(self, k_fraction=min(1.0, self.k_fraction * 4.0**left))

    def for_downlink(self) -> SparseCodec:
        return replace(self, k_fraction=self.down_k_fraction, bits=self.down_bits, warmup_rounds=0)

    def _levels(self) -> int:
        return max(1, 2 ** (self.bits - 1) - 1)

    def _encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        idx = _top_k(x, self.k_fraction)
        k = idx.size
        gaps = np.diff(idx, prepend=-1) - 1
        param = int(max(0, np.floor(np.log2(max(float(gaps.mean()), 1.0)))))
        vals = x[idx]
        pad = (-k) % self.chunk
        vp = np.concatenate([vals, np.zeros(pad, np.float32)]).reshape(-1, self.chunk)
        if self.bits == 1:
            counts = np.minimum(self.chunk, k - self.chunk * np.arange(vp.shape[0]))
            scales = (np.abs(vp).sum(axis=1) / counts).astype(np.float32)
            codes = (vals >= 0).astype(np.int64)
        else:
            q, scales = quantise(vals, self._levels(), self.chunk, rng)
            codes = q[:k].astype(np.int64) + self._levels()
        header = np.array([k], "<u4").view(np.uint8)
        meta = np.array([param, self.bits, 0, 0], np.uint8)
        stream = np.packbits(np.concatenate([rice_encode(gaps, param), _put_bits(codes, self.bits)]))
        return {"sparse": np.concatenate([header, meta, scales.astype("<f4").view(np.uint8), stream])}

    def _decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        raw = np.asarray(enc["sparse"]).astype(np.uint8, copy=False).ravel()
        if raw.size < SPARSE_HEADER:
            raise ValueError(f"{raw.size} bytes, shorter than the {SPARSE_HEADER}-byte header")
        k, param, bits = int(raw[:4].view("<u4")[0]), int(raw[4]), int(raw[5])
        if not 0 < k <= size or param > 40:
            raise ValueError(f"header says {k} values with Rice parameter {param} for a model of {size}")
        if bits != self.bits:
            raise ValueError(f"values of {bits} bits, this run's codec uses {self.bits}")
        nscales = -(-k // self.chunk)
        body = SPARSE_HEADER + 4 * nscales
        if raw.size < body:
            raise ValueError(f"{raw.size} bytes cannot hold {nscales} scales")
        scales = raw[SPARSE_HEADER:body].view("<f4").astype(np.float32)
        stream = np.unpackbits(raw[body:])
        gaps, used = rice_decode(stream, k, param, size)
        idx = np.cumsum(gaps + 1) - 1
        if idx[-1] >= size:
            raise ValueError("a position falls outside the model")
        if stream.size - used < k * bits:
            raise ValueError(f"the value stream holds fewer than {k} values")
        codes = _get_bits(stream[used:], k, bits)
        per = np.repeat(scales, self.chunk)[:k]
        out = np.zeros(size, np.float32)
        out[idx] = (np.where(codes == 1, per, -per) if bits == 1 else (codes - self._levels()) * per)
        return out

    def _error_bound(self, x: np.ndarray) -> np.ndarray:
        # kept: within one step of the largest kept magnitude (sign codes: of the kept mean and the largest)
        step = np.abs(x).max() * (2.0 if self.bits == 1 else 1.0 / self._levels())
        return _top_k_bound(x, self.k_fraction, step)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, Fp16Codec, Int8Codec, Int4Codec, TopKCodec,
                                                       SparseCodec)}


def wire_bytes(enc: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoded update (scales and indices included)."""
    return int(sum(np.asarray(a).nbytes for a in enc.values()))


class ErrorFeedback:
    """Device-side error feedback: what the codec dropped is added to the next update.

    ``residual`` is the running difference between what the gateway wanted to send and
    what the server could decode; it never leaves the device. With ``momentum`` (deep gradient
    compression's momentum correction) the gateway accumulates a velocity of its updates,
    ``v = momentum * v + update``, adds it to the residual instead of the bare update, and
    clears the velocity where values were sent (momentum-factor masking), so a value that
    waited several rounds is sent with the momentum it would have had.
    """

    def __init__(self, codec: Codec, residual: np.ndarray | None = None, velocity: np.ndarray | None = None,
                 momentum: float = 0.0) -> None:
        self.codec = codec
        self.residual = residual
        self.velocity = velocity
        self.momentum = momentum

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        x = np.asarray(x, dtype=np.float32).ravel()
        if self.residual is None or self.residual.size != x.size:
            self.residual = np.zeros_like(x)
        if self.momentum:
            if self.velocity is None or self.velocity.size != x.size:
                self.velocity = np.zeros_like(x)
            self.velocity = (self.momentum * self.velocity + x).astype(np.float32)
            x = self.velocity
        target = x + self.residual
        enc = self.codec.encode(target, rng)
        sent = self.codec.decode(enc, x.size)
        self.residual = target - sent
        if self.momentum:
            assert self.velocity is not None
            self.velocity[sent != 0] = 0.0
        return enc


def get_codec(cfg: Mapping[str, Any] | None) -> Codec:
    """The codec the ``codec`` config section names (no section: ``none``, float32)."""
    if not cfg:
        return NoneCodec()
    name = str(cfg.get("name", "none"))
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; pick one of {list(CODECS)}")
    return CODECS[name].from_config(cfg)


def validate_codec(cfg: Mapping[str, Any]) -> None:
    """Check the ``codec`` section of the whole config ``cfg``; raise ConfigError on the first bad value."""
    name = choice(cfg, "codec.name", tuple(CODECS), group="codec")
    CODECS[name].validate(cfg["codec"])
