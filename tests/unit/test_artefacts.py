"""Protected model artefacts: encrypted + signed checkpoints, key handling, the signed int8 export."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from iiotfl.security import artefacts
from iiotfl.security.artefacts import (
    AES_FILE,
    SIGNING_FILE,
    VERIFY_FILE,
    ArtefactError,
    Keys,
    ensure_keys,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from iiotfl.server.export import load_export, quantise, save_export, script_bytes
from iiotfl.tasks.moments import combine
from iiotfl.tasks.predictive_maintenance.model import RulCNN


@pytest.fixture(autouse=True)
def key_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own key directory; the real ~/.config is never touched."""
    path = tmp_path / "keys"
    monkeypatch.setenv(artefacts.KEYS_ENV, str(path))
    return path


@pytest.fixture
def model() -> RulCNN:
    torch.manual_seed(0)
    return RulCNN()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


def test_checkpoint_roundtrip_is_encrypted_and_keys_are_made_0600(model, run_dir, key_dir):
    sums = np.arange(12.0).reshape(2, 6)
    path = save_checkpoint(run_dir / "model.ckpt", model.state_dict(), sums, 3)
    ck = load_checkpoint(path)
    assert ck.round == 3 and np.array_equal(ck.norm_sums, sums)
    assert all(torch.equal(ck.model[k], v) for k, v in model.state_dict().items())
    (run_dir / "metrics.json").write_text('{"run_uid": "", "final_round": 3}')
    assert load_model_state(run_dir).keys() == model.state_dict().keys()
    blob = path.read_bytes()
    assert blob.startswith(b"IIOTFL\x02\x01") and b"checkpoint:model.ckpt|run=;round=3;model=" in blob
    weights = model.state_dict()["head.1.weight"].numpy().tobytes()
    assert weights[:64] not in blob  # no plaintext weights at rest
    for name in (AES_FILE, SIGNING_FILE, VERIFY_FILE):
        assert stat.S_IMODE((key_dir / name).stat().st_mode) == 0o600, name
    assert len((key_dir / AES_FILE).read_bytes()) == 32


@pytest.mark.parametrize("where", ["header", "ciphertext", "signature"])
def test_a_changed_byte_is_refused(model, run_dir, where):
    path = save_checkpoint(run_dir / "model.ckpt", model.state_dict())
    size = path.stat().st_size
    _flip(path, {"header": 10, "ciphertext": size // 2, "signature": size - 3}[where])
    with pytest.raises(ArtefactError, match="signature check failed") as err:
        load_checkpoint(run_dir / "model.ckpt")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_or_foreign_file_is_refused(run_dir):
    (run_dir / "model.ckpt").write_bytes(b"PK\x03\x04 a plain torch zip")
    with pytest.raises(ArtefactError, match="not an iiotfl artefact"):
        load_checkpoint(run_dir / "model.ckpt")


def test_other_keys_are_refused(model, run_dir, tmp_path):
    save_checkpoint(run_dir / "model.ckpt", model.state_dict())
    with pytest.raises(ArtefactError, match="signature check failed"):
        load_checkpoint(run_dir / "model.ckpt", ensure_keys(tmp_path / "other-keys"))
    # same signing pair, other AES key: the signature passes, decryption must not
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in (SIGNING_FILE, VERIFY_FILE):
        (mixed / name).write_bytes((tmp_path / "keys" / name).read_bytes())
    (mixed / AES_FILE).write_bytes(os.urandom(32))
    with pytest.raises(ArtefactError, match="decryption failed"):
        load_checkpoint(run_dir / "model.ckpt", Keys(mixed))


def test_a_swapped_checkpoint_is_refused(model, run_dir):
    save_checkpoint(run_dir / "checkpoints" / "round-1.ckpt", model.state_dict(), run_dir=run_dir)
    (run_dir / "checkpoints" / "round-1.ckpt").rename(run_dir / "model.ckpt")
    with pytest.raises(ArtefactError, match="written as 'checkpoint:round-1.ckpt'"):
        load_checkpoint(run_dir / "model.ckpt")


def test_keys_are_never_overwritten(key_dir):
    ensure_keys()
    before = {n: (key_dir / n).read_bytes() for n in (AES_FILE, SIGNING_FILE, VERIFY_FILE)}
    ensure_keys()
    assert {n: (key_dir / n).read_bytes() for n in before} == before
    (key_dir / AES_FILE).unlink()
    with pytest.raises(ArtefactError, match="incomplete") as err:
        ensure_keys()
    assert str(key_dir / AES_FILE) in str(err.value)
    assert not (key_dir / AES_FILE).exists()  # a partial set is not "repaired" with a new key
    assert (key_dir / SIGNING_FILE).read_bytes() == before[SIGNING_FILE]


@pytest.mark.parametrize("name, content, message", [
    (AES_FILE, b"short", "not 32"),
    (SIGNING_FILE, b"-----BEGIN PRIVATE KEY-----\ngarbage\n", "corrupt"),
    (VERIFY_FILE, b"", "corrupt"),
])
def test_a_corrupt_key_names_the_file(model, run_dir, key_dir, name, content, message):
    ensure_keys()
    (key_dir / name).write_bytes(content)
    with pytest.raises(ArtefactError, match=message) as err:
        save_checkpoint(run_dir / "model.ckpt", model.state_dict())
    assert str(key_dir / name) in str(err.value) and "\n" not in str(err.value)
    assert not (run_dir / "model.ckpt").exists()


def test_mismatched_key_pair_is_refused_before_writing(model, run_dir, key_dir, tmp_path):
    ensure_keys()
    (key_dir / VERIFY_FILE).write_bytes(ensure_keys(tmp_path / "other").directory.joinpath(VERIFY_FILE).read_bytes())
    with pytest.raises(ArtefactError, match="does not belong to"):
        save_checkpoint(run_dir / "model.ckpt", model.state_dict())


def test_reading_without_keys_names_the_missing_file_and_makes_none(model, run_dir, key_dir, tmp_path, monkeypatch):
    save_checkpoint(run_dir / "model.ckpt", model.state_dict())
    monkeypatch.setenv(artefacts.KEYS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ArtefactError, match=f"{tmp_path / 'nowhere' / VERIFY_FILE} is missing"):
        load_checkpoint(run_dir / "model.ckpt")
    assert not (tmp_path / "nowhere").exists()


def test_keys_inside_the_run_directory_are_refused(model, run_dir, monkeypatch):
    monkeypatch.setenv(artefacts.KEYS_ENV, str(run_dir / "keys"))
    with pytest.raises(ArtefactError, match="inside the run directory"):
        save_checkpoint(run_dir / "checkpoints" / "round-1.ckpt", model.state_dict(), run_dir=run_dir)
    assert not (run_dir / "keys").exists()


def test_a_failed_write_leaves_the_old_file_whole(model, run_dir, monkeypatch):
    path = save_checkpoint(run_dir / "model.ckpt", model.state_dict(), server_round=1)
    before = path.read_bytes()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(artefacts.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model.state_dict(), server_round=2)
    assert path.read_bytes() == before and load_checkpoint(path).round == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["model.ckpt"]  # no temporary file left


def test_export_is_int8_torchscript_close_to_float_smaller_and_signed(model, tmp_path, key_dir):
    scripted, layers = quantise(model)
    assert layers == ["head.1", "head.3"]
    path = tmp_path / "model-int8.ts.signed"
    int8_bytes = save_export(path, scripted)
    assert int8_bytes < 0.6 * len(script_bytes(model))
    # a device holds only the public key
    device = tmp_path / "device"
    device.mkdir()
    (device / VERIFY_FILE).write_bytes((key_dir / VERIFY_FILE).read_bytes())
    loaded = load_export(path, Keys(device))
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert [w.dtype for w in _packed_weights(loaded)] == [torch.qint8, torch.qint8]
    x = torch.randn(64, 30, 14)
    with torch.no_grad():
        ref, out = model(x), loaded(x)
        other = RulCNN()(x)  # differently initialised: far off
    bound = 0.02 * float(ref.abs().max())
    assert float((out - ref).abs().max()) < bound < float((other - ref).abs().max())
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(ArtefactError, match=f"refusing {path}: signature check failed"):
        load_export(path, Keys(device))


def _packed_weights(module: torch.jit.ScriptModule) -> list[torch.Tensor]:
    """The int8 weights inside the scripted dynamic-quantised Linear layers."""
    weights = []
    for _, sub in module.named_modules():
        packed = getattr(sub, "_packed_params", None)
        if isinstance(packed, torch.ScriptObject):
            weights.append(torch.ops.quantized.linear_unpack(packed)[0])
    return weights


def test_export_run_writes_signed_model_figures_and_report(model, run_dir, capsys):
    from iiotfl.configs import compose
    from iiotfl.server.cli import main
    from iiotfl.tasks import get_task

    cfg = compose(["fleet.gateways=2"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    task = get_task(cfg["task"], cfg["seed"])
    sums = combine([task.feature_sums(task.gateway_data(i)[0]) for i in range(2)])
    save_checkpoint(run_dir / "model.ckpt", task.build_model().state_dict(), sums, 1, run_id="run-a")
    (run_dir / "metrics.json").write_text('{"run_uid": "run-a", "final_round": 1}')

    assert main(["export", str(run_dir)]) == 0
    assert "int8 TorchScript" in capsys.readouterr().out
    ex = yaml.safe_load((run_dir / "export" / "export.json").read_text())
    assert ex["int8_bytes"] < ex["float32_bytes"] and ex["latency_us"]["int8"] > 0
    f32, i8 = ex["metrics"]["float32"], ex["metrics"]["int8"]
    assert f32["num-examples"] == i8["num-examples"] > 0
    assert abs(i8["rmse"] - f32["rmse"]) < 0.01 * f32["rmse"]
    assert isinstance(load_export(run_dir / ex["file"], run="run-a", newer_than=0), torch.jit.ScriptModule)
    report = (run_dir / "report.md").read_text()
    assert "## On-device model" in report and f"| int8 | {ex['int8_bytes']} |" in report

    _flip(run_dir / "model.ckpt", 200)
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: refusing {run_dir / 'model.ckpt'}: signature check failed") and "\n" not in err
