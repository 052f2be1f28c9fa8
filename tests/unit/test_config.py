import pytest

from iiotfl.configs import ConfigError, compose, from_run_config, to_run_config
from iiotfl.server.launch import validate
from tests.conftest import run_cli


def test_default_config_is_valid_and_survives_the_trip_through_flower(tmp_path):
    cfg = compose()
    validate(cfg)
    back = from_run_config(to_run_config(cfg, tmp_path))
    assert back.cfg == cfg and back.output_dir == tmp_path.resolve()
    assert back.resume_round == 0 and back.he_keys is None and not back.defaults


def test_the_launchers_settings_travel_as_run_config_not_inside_the_config(tmp_path):
    """A resumed round, a provisioned key directory and the run id reach the apps beside the composed config."""
    cfg = compose()
    run_config = to_run_config(cfg, tmp_path, resume_round=3, he_keys=tmp_path / "he-keys", run_uid="5f0c")
    back = from_run_config(run_config)
    assert back.resume_round == 3 and back.he_keys == (tmp_path / "he-keys").resolve() and back.run_uid == "5f0c"
    assert back.cfg == cfg  # nothing hidden was added to the config


def test_plain_flwr_run_uses_defaults_and_flat_keys():
    settings = from_run_config({"iiotfl-config": "", "num-server-rounds": 2, "lr": 0.01, "output-dir": ""})
    cfg = settings.cfg
    assert settings.defaults  # the ServerApp checks composed defaults itself
    assert cfg["fleet"]["rounds"] == 2 and cfg["train"]["lr"] == 0.01
    assert cfg["task"]["name"] == "predictive_maintenance"


@pytest.mark.parametrize(
    "override, message",
    [
        ("fleet.rounds=-1", r"fleet.rounds=-1 is invalid; it must be an integer >= 1"),
        ("fleet.gateways=0", r"fleet.gateways=0 is invalid"),
        ("fleet.fraction_train=0", r"fleet.fraction_train=0 is invalid; it must be a number in \(0.0, 1.0\]"),
        ("task.name=turbine", r"task.name='turbine' is unknown; pick task=<one of \['predictive_maintenance', 'energy_anomaly', 'quality_control'\]>"),
        ("train.lr=-0.1", r"train.lr=-0.1 is invalid"),
        ("task.data.source=csv", r"task.data.path is empty"),
        ("fleet.min_gateways=9", r"fleet.min_gateways=9 is invalid; it must be an integer between 1 and 4"),
        ("codec.name=zip", r"codec.name='zip' is unknown; pick codec=<one of"),
        ("+fleet.link_overrides.7=nb_iot", r"link_overrides names gateway 7, but the fleet has 0-3"),
        ("+fleet.link_overrides.1=carrier_pigeon", r"link profile 'carrier_pigeon' does not exist; use one of"),
        ("fleet.link_mix={lte_m:-1}", r"link_mix shares must be >= 0"),
        ("link.up_kbit=0", r"link profile 'ethernet' needs up_kbit and down_kbit > 0"),
        ("device.cpu_share=0", r"device profile 'gateway': cpu_share > 0"),
        ("fleet.min_replies=5", r"fleet.min_replies=5 is invalid"),
        ("fleet.outage.mode=sometimes", r"fleet.outage.mode='sometimes' is unknown"),
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


def test_topk_with_delta_downlink_is_refused():
    with pytest.raises(ConfigError, match="codec.downlink=full"):
        validate(compose(["codec=topk", "codec.downlink=delta"]))


def test_link_mix_splits_the_fleet_and_overrides_win():
    from iiotfl.links.profiles import gateway_profiles

    cfg = compose(["fleet.gateways=10", "fleet.link_mix={lte_m:0.7,nb_iot:0.3}", "+fleet.link_overrides.0=satellite",
                   "+fleet.device_overrides.9=sensor"])
    validate(cfg)
    profiles = gateway_profiles(cfg)
    names = [p.link.name for p in profiles]
    assert names == ["satellite"] + ["lte_m"] * 6 + ["nb_iot"] * 3
    assert profiles[7].link.up_kbit == 80 and profiles[7].link.rtt_ms == 400
    assert [p.device.name for p in profiles].count("sensor") == 1 and profiles[9].device.cpu_share == 0.3


def test_remote_engine_needs_an_address_and_a_ca_or_an_explicit_insecure():
    with pytest.raises(ConfigError, match=r"engine.superlink='superlink' is not host:port"):
        validate(compose(["engine=remote", "engine.superlink=superlink", "engine.ca=/c/ca.crt"]))
    with pytest.raises(ConfigError, match=r"engine=remote needs engine.ca .* or engine.insecure=true"):
        validate(compose(["engine=remote"]))
    validate(compose(["engine=remote", "engine.insecure=true"]))
    validate(compose(["engine=remote", "engine.ca=/c/ca.crt"]))


@pytest.mark.parametrize("overrides", [
    ["engine=remote", "engine.insecure='false'"],   # a string: before, any non-empty one turned TLS off
    ["engine=fleet", "engine.insecure='true'"],
    ["engine=remote", "engine.ca=/c/ca.crt", "engine.insecure=1"],
    ["codec=topk", "codec.error_feedback='no'"],
    ["task=quality_control", "task.derived_features='false'"],
])
def test_booleans_are_typed_never_strings(overrides):
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.* is invalid; it must be true or false, unquoted"):
        validate(compose(overrides))
