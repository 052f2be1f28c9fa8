"""Protected model artefacts: checkpoints encrypted at rest (AES-256-GCM) and signed (Ed25519).

Every global model the ServerApp writes (``model.ckpt``, ``checkpoints/round-N.ckpt``)
and every on-device export (``iiotfl export``) is an *artefact file*; readers go through
:func:`read_artefact` (here: :func:`load_checkpoint`, :func:`load_model_state`,
``server.export.load_export``), which checks the signature before anything is decrypted
or unpickled. A changed byte, a file signed with other keys, a file renamed/swapped
for another artefact, another run's artefact or an older one than the reader expects is
refused with one :class:`ArtefactError` line naming the file.

File format, version 2 (integers unsigned, big-endian)::

    offset  size  field
    0       6     magic  b"IIOTFL"
    6       1     version  1
    7       1     flags  bit 0: payload encrypted (AES-256-GCM); other bits 0
    8       1     n = length of the purpose
    9       n     purpose, ASCII: "<kind>:<file name>|run=<run id>;round=<r>;model=<fingerprint>",
                  e.g. "checkpoint:round-3.ckpt|run=5f0c…;round=3;model=a41b…" (:class:`Binding`)
    9+n     12    nonce (random; only when encrypted)
    ...     ...   payload: AES-GCM ciphertext + 16-byte tag (encrypted), else the plain payload
    end-64  64    Ed25519 signature over every byte before it (header and payload)

The header (magic .. nonce) is the AES-GCM associated data, so kind, file name, run,
round and model are bound to the ciphertext as well as to the signature: ``round-2.ckpt``
copied over ``model.ckpt`` is refused, and so is another run's ``model.ckpt`` (run id), an
older ``round-3.ckpt`` where round 5 is expected (round) or a checkpoint of another model
architecture (the fingerprint of its parameter names and shapes). The run id is the one
``iiotfl run`` gives each run (``launch.json``, ``metrics.json``). Version-1 files (no
binding) are refused. Checkpoints are encrypted (they are derived from the plants'
data: weights and the fleet's normalisation sums); exports are signed only, so a device
needs nothing secret — just ``verify.pub`` — to check its model.

Keys live outside any run directory, in ``$IIOTFL_ARTEFACT_KEYS`` or else
``~/.config/iiotfl/artefact-keys/`` (directory 0700):

* ``artefact.aes`` — 32 random bytes, the AES-256-GCM key;
* ``signing.key`` — the Ed25519 private key (PKCS#8 PEM, unencrypted);
* ``verify.pub`` — its public key (SubjectPublicKeyInfo PEM); copy it to devices.

All three are 0600, created together on the first write (:func:`ensure_keys`) and never
overwritten; a partial set is an error, not a reason to make new keys (that would
make every earlier artefact unreadable). Files are written to a temporary name and
moved into place (``os.replace``; keys with ``os.link``, which refuses to replace).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"IIOTFL"
VERSION = 2
ENCRYPTED = 0x01
NONCE_BYTES = 12
SIGNATURE_BYTES = 64
KEYS_ENV = "IIOTFL_ARTEFACT_KEYS"
AES_FILE, SIGNING_FILE, VERIFY_FILE = "artefact.aes", "signing.key", "verify.pub"
FINAL_CHECKPOINT = "model.ckpt"


class ArtefactError(Exception):
    """A key or artefact file that cannot be used; the message is one line naming the file and the fix."""


# -- keys -------------------------------------------------------------------------
def keys_dir() -> Path:
    """``$IIOTFL_ARTEFACT_KEYS``, else ``~/.config/iiotfl/artefact-keys``."""
    env = os.environ.get(KEYS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "iiotfl" / "artefact-keys"


@dataclass(frozen=True)
class Keys:
    """The key files of one directory, each read (and checked) only when needed."""

    directory: Path

    def _read(self, name: str) -> bytes:
        path = self.directory / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ArtefactError(f"artefact key {path} is missing; set {KEYS_ENV} to the key directory the artefacts "
                                "were written with (keys are made on the first run that writes one)") from None
        except OSError as err:
            raise ArtefactError(f"artefact key {path} cannot be read ({err.strerror}); fix its permissions") from None

    def aes(self) -> bytes:
        key = self._read(AES_FILE)
        if len(key) != 32:
            raise ArtefactError(f"artefact key {self.directory / AES_FILE} is corrupt ({len(key)} bytes, not 32); "
                                "restore it from a backup")
        return key

    def signing(self) -> Ed25519PrivateKey:
        return self._pem(SIGNING_FILE, lambda b: serialization.load_pem_private_key(b, password=None),
                         Ed25519PrivateKey)

    def verify(self) -> Ed25519PublicKey:
        return self._pem(VERIFY_FILE, serialization.load_pem_public_key, Ed25519PublicKey)

    def _pem(self, name: str, parse: Callable[[bytes], Any], kind: type) -> Any:
        try:
            key = parse(self._read(name))
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, kind):
            raise ArtefactError(f"artefact key {self.directory / name} is corrupt (not an Ed25519 PEM key); "
                                "restore it from a backup")
        return key


def ensure_keys(directory: Path | None = None) -> Keys:
    """The key set in ``directory`` (default :func:`keys_dir`), created (0600) if there is none yet."""
    directory = Path(directory) if directory is not None else keys_dir()
    names = (AES_FILE, SIGNING_FILE, VERIFY_FILE)
    present = [n for n in names if (directory / n).exists()]
    if present and len(present) < len(names):
        missing = [str(directory / n) for n in names if n not in present]
        raise ArtefactError(f"artefact key set in {directory} is incomplete ({', '.join(missing)} missing); restore "
                            f"it from a backup, or point {KEYS_ENV} at an empty directory for a new key set")
    if not present:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        signing = Ed25519PrivateKey.generate()
        blobs = {
            AES_FILE: AESGCM.generate_key(bit_length=256),
            SIGNING_FILE: signing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()),
            VERIFY_FILE: signing.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo),
        }
        for name, blob in blobs.items():
            _write_new(directory / name, blob)
    return Keys(directory)


def _synced_temp(path: Path, data: bytes) -> str:
    """``data`` in a 0600 temporary file beside ``path``, flushed to disk; returns its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _write_new(path: Path, data: bytes) -> None:
    """Write a 0600 file that must not exist yet: temp file, then ``os.link`` (refuses to replace)."""
    tmp = _synced_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ArtefactError(f"artefact key {path} appeared while a new key set was being made (two first runs at "
                            f"once?); remove the keys made just now in {path.parent} and run again") from None
    finally:
        os.unlink(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- what an artefact is bound to ---------------------------------------------------
@dataclass(frozen=True)
class Binding:
    """The run, round and model an artefact belongs to; signed and authenticated with it."""

    run: str = ""     # the run id ("" only for artefacts written outside a run, e.g. tests)
    round: int = 0    # the global model's version within the run: the round that produced it
    model: str = ""   # :func:`model_fingerprint` of the state it holds

    def text(self) -> str:
        return f"run={self.run};round={self.round};model={self.model}"

    @classmethod
    def parse(cls, text: str) -> Binding:
        fields = dict(part.partition("=")[::2] for part in text.split(";"))
        return cls(fields.get("run", ""), int(fields.get("round") or 0), fields.get("model", ""))


def model_fingerprint(state: Mapping[str, Any]) -> str:
    """Which model a state belongs to: a digest of its parameter names, shapes and dtypes."""
    spec = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()) if hasattr(v, "shape"))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _check_binding(refuse: str, got: Binding, run: str | None, at_round: int | None, min_round: int | None,
                   model: str | None) -> None:
    if run is not None and got.run != run:
        raise ArtefactError(f"{refuse} it belongs to run {got.run or '(none)'!r}, not to this run {run!r} (another "
                            "run's artefact was copied here); restore this run's file")
    if at_round is not None and got.round != at_round:
        raise ArtefactError(f"{refuse} it holds the model of round {got.round}, not round {at_round} (rolled back "
                            "or swapped); restore the file of that round")
    if min_round is not None and got.round < min_round:
        raise ArtefactError(f"{refuse} it holds the model of round {got.round}, older than round {min_round} "
                            "already in use (a rollback); keep the newer model")
    if model is not None and got.model != model:
        raise ArtefactError(f"{refuse} it holds a model of another architecture (fingerprint {got.model}, "
                            f"expected {model}); use the task and model it was trained with")


# -- the file format ----------------------------------------------------------------
def _header(purpose: str, encrypted: bool, nonce: bytes = b"") -> bytes:
    tag = purpose.encode("ascii")
    return MAGIC + struct.pack(">BBB", VERSION, ENCRYPTED if encrypted else 0, len(tag)) + tag + nonce


def write_artefact(path: Path, payload: bytes, kind: str, keys: Keys, encrypt: bool = True,
                   binding: Binding = Binding()) -> None:
    """Sign (and, with ``encrypt``, AES-GCM encrypt) ``payload``, bound to ``binding``, into ``path``, atomically."""
    path = Path(path)
    purpose = f"{kind}:{path.name}|{binding.text()}"
    if len(purpose.encode("ascii")) > 255:
        raise ArtefactError(f"{path}: the artefact's purpose {purpose!r} is longer than 255 bytes; use a shorter "
                            "file name or run id")
    if encrypt:
        nonce = os.urandom(NONCE_BYTES)
        header = _header(purpose, True, nonce)
        body = header + AESGCM(keys.aes()).encrypt(nonce, payload, header)
    else:
        body = _header(purpose, False) + payload
    signature = keys.signing().sign(body)
    try:  # a file this writes must be readable with the same key set
        keys.verify().verify(signature, body)
    except InvalidSignature:
        raise ArtefactError(f"artefact key {keys.directory / VERIFY_FILE} does not belong to "
                            f"{keys.directory / SIGNING_FILE}; restore the matching pair from a backup") from None
    atomic_write(path, body + signature)


def read_artefact(path: Path, kind: str, keys: Keys, *, run: str | None = None, at_round: int | None = None,
                  min_round: int | None = None, model: str | None = None) -> tuple[bytes, Binding]:
    """The payload of ``path`` and its binding: signature checked first, then kind, file name and
    binding (``run``, ``at_round``, ``min_round``, ``model``: each checked when given), then decrypted."""
    path = Path(path)
    refuse = f"refusing {path}:"
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ArtefactError(f"{path} does not exist; is this a finished run (or the right file)?") from None
    if len(blob) < len(MAGIC) + 3 + SIGNATURE_BYTES or not blob.startswith(MAGIC):
        raise ArtefactError(f"{refuse} not an iiotfl artefact (no {MAGIC.decode()} header); it is damaged or was "
                            "not written by iiotfl — restore it or write it again")
    body, signature = blob[:-SIGNATURE_BYTES], blob[-SIGNATURE_BYTES:]
    try:
        keys.verify().verify(signature, body)
    except InvalidSignature:
        raise ArtefactError(f"{refuse} signature check failed — the file was changed after it was written, or "
                            f"signed with other keys than {keys.directory / VERIFY_FILE}; restore it from a backup "
                            f"or set {KEYS_ENV} to the keys it was written with") from None
    version, flags, n = struct.unpack(">BBB", body[len(MAGIC):len(MAGIC) + 3])
    start = len(MAGIC) + 3
    purpose = body[start:start + n].decode("ascii", "replace")
    if version < VERSION:
        raise ArtefactError(f"{refuse} artefact format version {version} is not bound to a run and round; "
                            "write it again with this iiotfl (run again, or `iiotfl export` the run again)")
    if version != VERSION or flags & ~ENCRYPTED:
        raise ArtefactError(f"{refuse} artefact format version {version} (flags {flags:#x}) is not supported by "
                            f"this iiotfl (version {VERSION}); upgrade iiotfl")
    written_as, _, bound = purpose.partition("|")
    if written_as != f"{kind}:{path.name}":
        raise ArtefactError(f"{refuse} it was written as {written_as!r}, not {kind}:{path.name} (renamed or swapped "
                            "for another artefact); restore the original file name or file")
    binding = Binding.parse(bound)
    _check_binding(refuse, binding, run, at_round, min_round, model)
    if not flags & ENCRYPTED:
        return body[start + n:], binding
    header_end = start + n + NONCE_BYTES
    try:
        return AESGCM(keys.aes()).decrypt(body[start + n:header_end], body[header_end:], body[:header_end]), binding
    except InvalidTag:
        raise ArtefactError(f"{refuse} decryption failed although the signature is valid — "
                            f"{keys.directory / AES_FILE} is not the AES key it was written with; restore that "
                            "key") from None


# -- checkpoints --------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A global model and what is needed to use it: the fleet's normalisation sums."""

    model: dict[str, torch.Tensor]
    norm_sums: np.ndarray | None = None
    round: int | None = None
    binding: Binding = Binding()


def save_checkpoint(path: Path, model: Mapping[str, torch.Tensor], norm_sums: np.ndarray | None = None,
                    server_round: int | None = None, keys: Keys | None = None, run_dir: Path | None = None,
                    run_id: str = "") -> Path:
    """Encrypt and sign a model ``state_dict`` (+ normalisation sums) into ``path``, bound to run
    ``run_id``, its round and the model's fingerprint.

    Refuses keys inside ``run_dir`` (default: the checkpoint's directory): they must live apart from the run.
    """
    path = Path(path)
    run_dir = Path(run_dir) if run_dir is not None else path.parent
    key_dir = keys.directory if keys is not None else keys_dir()
    if key_dir.resolve() == run_dir.resolve() or run_dir.resolve() in key_dir.resolve().parents:
        raise ArtefactError(f"artefact keys {key_dir} are inside the run directory {run_dir}; set "
                            f"{KEYS_ENV} to a directory outside it")
    keys = keys or ensure_keys(key_dir)
    content: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in model.items()}}
    if norm_sums is not None:
        content["norm_sums"] = torch.as_tensor(np.asarray(norm_sums, dtype=np.float64))
    if server_round is not None:
        content["round"] = int(server_round)
    buf = io.BytesIO()
    torch.save(content, buf)
    binding = Binding(run_id, int(server_round or 0), model_fingerprint(content["model"]))
    write_artefact(path, buf.getvalue(), "checkpoint", keys, binding=binding)
    return path


def load_checkpoint(path: Path, keys: Keys | None = None, *, run: str | None = None, at_round: int | None = None,
                    model: str | None = None) -> Checkpoint:
    """Verify, decrypt and load a checkpoint written by :func:`save_checkpoint`; with ``run``,
    ``at_round`` or ``model`` (a :func:`model_fingerprint`) refuse one bound to anything else."""
    payload, binding = read_artefact(Path(path), "checkpoint", keys or Keys(keys_dir()), run=run, at_round=at_round,
                                     model=model)
    content = torch.load(io.BytesIO(payload), weights_only=True)
    sums = content.get("norm_sums")
    return Checkpoint(content["model"], None if sums is None else sums.numpy(), content.get("round"), binding)


def finished_run(run_dir: str | Path) -> tuple[str, int]:
    """The run id and final round a finished run's ``metrics.json`` records (what ``model.ckpt`` must be bound to)."""
    path = Path(run_dir) / "metrics.json"
    try:
        summary = json.loads(path.read_text())
        return str(summary["run_uid"]), int(summary["final_round"])
    except FileNotFoundError:
        raise ArtefactError(f"{path} does not exist; pass the directory of a finished `iiotfl run`") from None
    except (ValueError, KeyError, TypeError):
        raise ArtefactError(f"{path} names no run_uid and final_round (damaged, or written by an older iiotfl); "
                            "run again") from None


def load_final(run_dir: str | Path, keys: Keys | None = None) -> Checkpoint:
    """A finished run's final checkpoint (``RUN_DIR/model.ckpt``): verified, bound to this run and
    its final round (another run's or an older model is refused), then decrypted."""
    run, final_round = finished_run(run_dir)
    return load_checkpoint(Path(run_dir) / FINAL_CHECKPOINT, keys, run=run, at_round=final_round)


def load_model_state(run_dir: str | Path, keys: Keys | None = None) -> dict[str, torch.Tensor]:
    """The final global model of a finished run, as :func:`load_final` checks it."""
    return load_final(run_dir, keys).model
