"""Swapped, rolled-back and foreign artefacts are refused, and nothing already written is lost."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
import yaml

from iiotfl.configs import compose
from iiotfl.security import artefacts
from iiotfl.security.artefacts import ArtefactError, load_checkpoint, model_fingerprint, save_checkpoint
from iiotfl.server.cli import main
from iiotfl.server.export import load_export
from iiotfl.tasks import get_task
from iiotfl.tasks.moments import combine
from iiotfl.tasks.predictive_maintenance.model import RulCNN


@pytest.fixture(autouse=True)
def key_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(artefacts.KEYS_ENV, str(tmp_path / "keys"))
    return tmp_path / "keys"


def _finished_run(path, run_uid, final_round, seed=0):
    """A run directory as `iiotfl run` leaves it: config, final model bound to the run, metrics.json."""
    cfg = compose(["fleet.gateways=2"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    task = get_task(cfg["task"], cfg["seed"])
    torch.manual_seed(seed)
    sums = combine([task.feature_sums(task.gateway_data(i)[0]) for i in range(2)])
    save_checkpoint(path / "model.ckpt", task.build_model().state_dict(), sums, final_round, run_id=run_uid)
    (path / "metrics.json").write_text(json.dumps({"run_uid": run_uid, "final_round": final_round}))
    return path


def test_another_runs_final_model_is_refused_by_export_and_the_export_there_is_kept(tmp_path, capsys):
    ours = _finished_run(tmp_path / "ours", "run-ours", 3)
    theirs = _finished_run(tmp_path / "theirs", "run-theirs", 3, seed=1)
    assert main(["export", str(ours)]) == 0
    before = (ours / "export" / "model-int8.ts.signed").read_bytes()
    shutil.copy(theirs / "model.ckpt", ours / "model.ckpt")
    capsys.readouterr()
    assert main(["export", str(ours)]) == 2
    err = capsys.readouterr().err
    assert "belongs to run 'run-theirs', not to this run 'run-ours'" in err and len(err.strip().splitlines()) == 1
    assert (ours / "export" / "model-int8.ts.signed").read_bytes() == before


def test_an_older_final_model_of_the_same_run_is_refused(tmp_path):
    run = _finished_run(tmp_path / "run", "run-a", 5)
    model = RulCNN()
    save_checkpoint(run / "model.ckpt", model.state_dict(), None, 3, run_id="run-a")  # rolled back to round 3
    with pytest.raises(ArtefactError, match="holds the model of round 3, not round 5"):
        artefacts.load_final(run)


def test_resume_refuses_another_runs_or_an_older_checkpoint(tmp_path):
    run = tmp_path / "run"
    model = RulCNN()
    ckpt = save_checkpoint(run / "checkpoints" / "round-4.ckpt", model.state_dict(), None, 4, run_dir=run,
                           run_id="run-a")
    fingerprint = model_fingerprint(model.state_dict())
    assert load_checkpoint(ckpt, run="run-a", at_round=4, model=fingerprint).round == 4
    with pytest.raises(ArtefactError, match="belongs to run 'run-a', not to this run 'run-b'"):
        load_checkpoint(ckpt, run="run-b", at_round=4, model=fingerprint)
    older = save_checkpoint(tmp_path / "old" / "round-4.ckpt", model.state_dict(), None, 2, run_id="run-a")
    with pytest.raises(ArtefactError, match="holds the model of round 2, not round 4"):
        load_checkpoint(older, run="run-a", at_round=4)


def test_a_checkpoint_of_another_model_is_refused_before_it_is_loaded(tmp_path):
    small = {"w": torch.zeros(3, 3)}
    ckpt = save_checkpoint(tmp_path / "run" / "round-1.ckpt", small, None, 1, run_id="run-a")
    with pytest.raises(ArtefactError, match="another architecture"):
        load_checkpoint(ckpt, run="run-a", at_round=1, model=model_fingerprint(RulCNN().state_dict()))


def test_a_device_refuses_a_foreign_or_rolled_back_export(tmp_path):
    a3 = _finished_run(tmp_path / "a3", "run-a", 3)
    a5 = _finished_run(tmp_path / "a5", "run-a", 5)
    b9 = _finished_run(tmp_path / "b9", "run-b", 9)
    for run in (a3, a5, b9):
        assert main(["export", str(run)]) == 0
    exported = {run.name: run / "export" / "model-int8.ts.signed" for run in (a3, a5, b9)}
    assert isinstance(load_export(exported["a5"], run="run-a", newer_than=3), torch.jit.ScriptModule)
    with pytest.raises(ArtefactError, match="older than round 6 .*rollback"):
        load_export(exported["a3"], run="run-a", newer_than=5)
    with pytest.raises(ArtefactError, match="belongs to run 'run-b'"):
        load_export(exported["b9"], run="run-a", newer_than=5)


def test_an_unbound_version_1_artefact_is_refused(tmp_path, key_dir):
    """A file in the old format (purpose kind:name only), validly signed with the run's keys."""
    keys = artefacts.ensure_keys(key_dir)
    path = tmp_path / "model.ckpt"
    tag = b"checkpoint:model.ckpt"
    body = artefacts.MAGIC + struct.pack(">BBB", 1, 0, len(tag)) + tag + np.zeros(8).tobytes()
    path.write_bytes(body + keys.signing().sign(body))
    with pytest.raises(ArtefactError, match="version 1 is not bound to a run and round"):
        load_checkpoint(path)
