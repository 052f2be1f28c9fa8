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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

Encoded = dict[str, np.ndarray]


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
@dataclass(frozen=True)
class Codec:
    """One codec: ``encode`` a float32 vector to wire arrays, ``decode`` them back."""

    name: str = "none"
    chunk: int = 256
    k_fraction: float = 0.1

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        x = np.asarray(x, dtype=np.float32).ravel()
        if self.name == "none":
            return {"values": x}
        if self.name == "fp16":
            return {"values": x.astype(np.float16)}
        if self.name in ("int8", "int4"):
            q, scales = quantise(x, 127 if self.name == "int8" else 7, self.chunk, rng)
            if self.name == "int4":
                q = _pack4(q)
            return {"q": q, "scales": scales}
        if self.name == "topk":
            k = max(1, int(np.ceil(self.k_fraction * x.size)))
            idx = np.sort(np.argpartition(np.abs(x), -k)[-k:]).astype(np.int64)
            # positions as uint8 gaps; a gap over 255 is bridged by zero-valued filler entries
            gaps = np.diff(idx, prepend=-1)
            fill = (gaps - 1) // 255
            if fill.any():
                extra = np.concatenate([idx[i] - 255 * np.arange(fill[i], 0, -1) for i in np.nonzero(fill)[0]])
                idx = np.union1d(idx, extra)
                gaps = np.diff(idx, prepend=-1)
            values = x[idx]
            q, scales = quantise(values, 127, self.chunk, rng)
            return {"gaps": gaps.astype(np.uint8), "q": q, "scales": scales}
        raise ValueError(f"unknown codec {self.name!r}")

    def decode(self, enc: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        try:
            if self.name in ("none", "fp16"):
                out = np.asarray(enc["values"]).astype(np.float32)
                if out.size != size:
                    raise ValueError(f"{out.size} values, expected {size}")
                return out
            if self.name in ("int8", "int4"):
                q, scales = np.asarray(enc["q"]), np.asarray(enc["scales"], dtype=np.float32)
                padded = scales.size * self.chunk
                if self.name == "int4":
                    q = _unpack4(q.astype(np.uint8), padded)
                if q.size != padded or padded < size or padded - size >= self.chunk:
                    raise ValueError(f"{q.size} codes and {scales.size} scales do not fit {size} values")
                return dequantise(q, scales, size)
            if self.name == "topk":
                gaps = np.asarray(enc["gaps"]).astype(np.int64)
                q, scales = np.asarray(enc["q"]), np.asarray(enc["scales"], dtype=np.float32)
                if gaps.size == 0 or q.size != scales.size * self.chunk or not gaps.size <= q.size < gaps.size + self.chunk:
                    raise ValueError("positions and values do not match")
                idx = np.cumsum(gaps) - 1
                if idx.min() < 0 or idx.max() >= size or (gaps[1:] == 0).any():
                    raise ValueError("positions fall outside the model")
                vals = dequantise(q, scales, gaps.size)
                out = np.zeros(size, np.float32)
                out[idx] = vals
                return out
        except KeyError as err:
            raise ValueError(f"array {err} missing for codec {self.name}") from None
        raise ValueError(f"unknown codec {self.name!r}")

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """Per-element bound on |decode(encode(x)) - x| (top-k: the dropped magnitude)."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if self.name == "none":
            return np.zeros_like(x)
        if self.name == "fp16":
            return np.abs(x) * 2.0**-11 + 2.0**-24
        if self.name in ("int8", "int4"):
            levels = 127 if self.name == "int8" else 7
            pad = (-x.size) % self.chunk
            xp = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, self.chunk)
            scale = np.abs(xp).max(axis=1, keepdims=True) / levels
            return np.broadcast_to(scale, xp.shape).ravel()[: x.size] * (1 + 1e-5)
        if self.name == "topk":
            k = max(1, int(np.ceil(self.k_fraction * x.size)))
            kth = np.partition(np.abs(x), -k)[-k]
            # kept values are int8-quantised against the largest kept magnitude of their chunk;
            # bound it by the largest overall (chunks of kept values are not the input's chunks)
            scale = np.abs(x).max() / 127
            return np.where(np.abs(x) >= kth, scale * (1 + 1e-5), np.maximum(np.abs(x), scale * (1 + 1e-5)))
        raise ValueError(f"unknown codec {self.name!r}")


def wire_bytes(enc: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoded update (scales and indices included)."""
    return int(sum(np.asarray(a).nbytes for a in enc.values()))


class ErrorFeedback:
    """Device-side error feedback: what the codec dropped is added to the next update.

    ``residual`` is the running difference between what the gateway wanted to send and
    what the server could decode; it never leaves the device.
    """

    def __init__(self, codec: Codec, residual: np.ndarray | None = None) -> None:
        self.codec = codec
        self.residual = residual

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        x = np.asarray(x, dtype=np.float32).ravel()
        if self.residual is None or self.residual.size != x.size:
            self.residual = np.zeros_like(x)
        target = x + self.residual
        enc = self.codec.encode(target, rng)
        self.residual = target - self.codec.decode(enc, x.size)
        return enc


def get_codec(cfg: Mapping[str, Any] | None) -> Codec:
    if not cfg:
        return Codec()
    return Codec(name=str(cfg.get("name", "none")), chunk=int(cfg.get("chunk", 256)),
                 k_fraction=float(cfg.get("k_fraction", 0.1)))
