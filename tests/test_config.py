import pytest

from configs import ConfigError, compose, from_run_config, to_run_config, validate
from tests.conftest import run_cli


def test_default_config_is_valid_and_survives_the_trip_through_flower(tmp_path):
    cfg = compose()
    validate(cfg)
    back, out = from_run_config(to_run_config(cfg, tmp_path))
    assert back == cfg and out == tmp_path.resolve()


def test_plain_flwr_run_uses_defaults_and_flat_keys():
    cfg, _ = from_run_config({"iiotfl-config": "", "num-server-rounds": 2, "lr": 0.01, "output-dir": ""})
    assert cfg["fleet"]["rounds"] == 2 and cfg["train"]["lr"] == 0.01
    assert cfg["task"]["name"] == "predictive_maintenance"


@pytest.mark.parametrize(
    "override, message",
    [
        ("fleet.rounds=-1", r"fleet.rounds=-1 is invalid; it must be an integer >= 1"),
        ("fleet.gateways=0", r"fleet.gateways=0 is invalid"),
        ("fleet.fraction_train=0", r"fleet.fraction_train=0 is invalid; it must be a number in \(0.0, 1.0\]"),
        ("task.name=turbine", r"task.name='turbine' is unknown; pick task=<one of \['predictive_maintenance'\]>"),
        ("train.lr=-0.1", r"train.lr=-0.1 is invalid"),
        ("task.data.source=csv", r"task.data.path is empty"),
        ("fleet.min_gateways=9", r"fleet.min_gateways=9 is invalid; it must be an integer between 1 and 4"),
    ],
)
def test_bad_values_are_named(override, message):
    cfg = compose([override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_cli_refuses_bad_config_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("run", "fleet.rounds=-1", f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: config: fleet.rounds=-1 is invalid; it must be an integer >= 1 (e.g. fleet.rounds=1)"]
    assert not (run_dir / "logs").exists() and not (run_dir / "flwr").exists()


def test_cli_names_an_unknown_config_group_option(tmp_path):
    proc = run_cli("run", "task=turbine", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'task/turbine'" in proc.stderr and "predictive_maintenance" in proc.stderr
