"""Quality control (task=quality_control): AI4I 2020-style generator, metrics, a trained and a
federated model, config checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from iiotfl.clients.training import train_local
from iiotfl.configs import ConfigError, compose
from iiotfl.server.launch import validate
from iiotfl.tasks import get_task
from iiotfl.tasks.moments import combine
from iiotfl.tasks.quality_control import QualityControl
from iiotfl.tasks.quality_control.generator import (
    AI4I,
    LABELS,
    PUBLISHED_COUNTS,
    generate_plant,
    plant_operating_point,
    simulate,
)
from iiotfl.tasks.quality_control.loader import DataFormatError, load_csv, write_csv
from iiotfl.tasks.quality_control.metrics import average_precision, best_threshold, f1_at

SMALL = ["task=quality_control", "task.data.rows_min=1500", "task.data.rows_max=2500", "task.data.test_rows=2000",
         "task.data.calibration_rows=2000"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread, as on a gateway (train.torch_threads): a 3k-parameter MLP gains
    nothing from more, and on a shared machine their contention costs 50x per step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qc_cfg() -> dict:
    return compose(SMALL)


@pytest.fixture(scope="module")
def task(qc_cfg) -> QualityControl:
    return get_task(qc_cfg["task"], qc_cfg["seed"])


# -- generator -----------------------------------------------------------------------------
def test_generation_is_deterministic_per_seed_and_plant(task):
    a, b = task.local_data(1), task.local_data(1)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.product_id, b.product_id)
    other_seed = QualityControl(task.cfg, seed=task.seed + 1).local_data(1)
    assert len(other_seed) != len(a) or not np.array_equal(other_seed.features, a.features)
    # plants differ in their product mix (Dirichlet draw) and operating point
    mixes = [np.bincount(task.local_data(p).product_type, minlength=3) / len(task.local_data(p)) for p in range(4)]
    assert max(np.abs(mixes[i] - mixes[j]).max() for i in range(4) for j in range(i + 1, 4)) > 0.05
    ops = [plant_operating_point(task.seed, p) for p in range(4)]
    assert len({round(op.air_mean, 3) for op in ops}) == 4 and len({round(op.torque_mean, 3) for op in ops}) == 4
    assert plant_operating_point(task.seed, 2) == plant_operating_point(task.seed, 2)


def test_identifiers_are_never_features(task):
    data = task.local_data(0)
    names = {n.lower() for n in data.feature_names}
    assert not names & {"udi", "product id", "product_id", "productid"}
    assert len(np.unique(data.udi)) == len(data)  # ...but they are kept for traceability
    assert all(pid[0] in "LMH" and pid[1:].isdigit() for pid in data.product_id[:50])
    x, y = task.windows(data, task.normaliser(task.feature_sums(data)))
    assert x.dtype == np.float32 and x.shape == (len(data), len(data.feature_names)) and y.shape == (len(data), 6)
    with pytest.raises(ConfigError, match=r"task\.features.*identifier"):
        validate(compose([*SMALL, "engine=sim", "task.features=[UDI,torque_Nm]"]))


def test_fleet_normaliser_is_the_pooled_z_score(task):
    parts = [task.local_data(p) for p in range(3)]
    sums = [task.feature_sums(d) for d in parts]
    assert all(s.shape == (1, 1 + 2 * len(task.features)) for s in sums)
    normaliser = task.normaliser(combine(sums))
    pooled = np.concatenate([d.features for d in parts])
    assert np.allclose(normaliser.mean, pooled.mean(axis=0)) and np.allclose(normaliser.std, pooled.std(axis=0))
    x = np.concatenate([task.windows(d, normaliser)[0] for d in parts])
    assert np.allclose(x.mean(axis=0), 0, atol=1e-4) and np.allclose(x.std(axis=0), 1, atol=1e-3)
    # sums in reference units: far inside strategy=he's fixed-point range (2^41) even for big plants
    assert np.abs(sum(sums)).max() < 100 * len(pooled)


def test_failure_rates_match_the_published_data_set():
    """At the AI4I operating point the rules give the published failure counts (per 10,000)."""
    counts = np.zeros(6)
    reps = 8
    for r in range(reps):
        sim = simulate(10_000, np.random.default_rng([2020, r]), AI4I)
        counts += np.r_[sim["machine_failure"].sum(), sim["modes"].sum(axis=0)]
    per10k = dict(zip(LABELS, counts / reps))
    # published: machine failure 339, TWF 46, HDF 115, PWF 95, OSF 98, RNF 19 (its text: 5)
    bounds = {"machine_failure": (290, 400), "TWF": (30, 65), "HDF": (85, 150), "PWF": (70, 125), "OSF": (75, 130),
              "RNF": (4, 20)}
    for label, (low, high) in bounds.items():
        assert low <= per10k[label] <= high, (label, per10k[label], PUBLISHED_COUNTS[label])
    assert abs(per10k["machine_failure"] / 100 - 3.39) < 0.6  # percent
    sim = simulate(10_000, np.random.default_rng(1), AI4I)
    assert abs(sim["air"].mean() - 300) < 0.1 and abs(sim["air"].std() - 2) < 0.1
    assert abs((sim["process"] - sim["air"]).mean() - 10) < 0.1
    assert abs(sim["torque"].mean() - 40) < 0.5 and sim["torque"].min() >= 0
    assert 1450 < sim["speed"].mean() < 1620 and sim["speed"].max() <= 2886 + 100


def test_failure_rules_hold_row_by_row():
    sim = simulate(20_000, np.random.default_rng(5), AI4I)
    twf, hdf, pwf, osf, _ = sim["modes"].T
    power = sim["torque"] * sim["speed"] * 2 * np.pi / 60
    assert np.array_equal(hdf, ((sim["process"] - sim["air"]) < 8.6) & (sim["speed"] < 1380))
    assert np.array_equal(pwf, (power < 3500) | (power > 9000))
    limit = np.array([11_000, 12_000, 13_000])[sim["type"]]
    assert np.array_equal(osf, sim["wear"] * sim["torque"] > limit)
    assert sim["wear"][twf].min() >= 200 and sim["wear"].max() <= 245
    assert np.array_equal(sim["machine_failure"], sim["modes"].any(axis=1))
    # H / M / L add 5 / 3 / 2 min per process on the same tool
    step = np.diff(sim["wear"])
    same_tool = step > 0
    assert set(np.unique(step[same_tool])) <= {2.0, 3.0, 5.0}


def test_generated_plants_stay_near_the_published_rates(task):
    data = [generate_plant(0, p, 10_000, derived=True) for p in range(6)]
    rates = [d.labels[:, 0].mean() for d in data]
    assert all(0.01 < r < 0.09 for r in rates), rates  # shifted operating points, still a rare-event task
    assert len({round(r, 4) for r in rates}) == 6


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_against_hand_computed_values():
    y = np.array([1, 0, 1, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    # precision at each positive: 1/1, 2/3, 3/6 -> AP = (1 + 2/3 + 1/2) / 3
    assert average_precision(y, s) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert average_precision(np.zeros(5), np.arange(5)) != average_precision(np.zeros(5), np.arange(5))  # NaN
    assert average_precision(y, np.full(6, 0.5)) == pytest.approx(0.5)  # a constant score: the prevalence
    # F1 of the top k: 1/2, 2/5, 2/3, 4/7, 1/2, 2/3 -> the top 3, half-way between 0.7 and 0.3
    thr = best_threshold(y, s)
    assert thr == pytest.approx(0.5)
    assert f1_at(y, s, thr) == pytest.approx(2 / 3)
    assert f1_at(y, s, 1.1) == 0.0
    assert best_threshold(np.zeros(6), s) == 0.5  # no positive to calibrate on: the default


# -- model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet_data(task):
    splits = [task.gateway_data(p) for p in range(4)]
    normaliser = task.normaliser(combine([task.feature_sums(t) for t, _ in splits]))
    return splits, normaliser


def test_trained_model_scores_each_failure_mode_above_normal_rows(task, fleet_data):
    splits, normaliser = fleet_data
    x = np.concatenate([task.windows(t, normaliser)[0] for t, _ in splits])
    y = np.concatenate([task.windows(t, normaliser)[1] for t, _ in splits])
    torch.manual_seed(0)
    model = task.build_model()
    assert 1000 < sum(p.numel() for p in model.parameters()) < 10_000
    train_local(model, x, task.target(y), epochs=8, batch_size=64, lr=0.01, seed=0, loss_fn=task.loss())
    test = task.server_test_data(4)
    xt, yt = task.windows(test, normaliser)
    p = task.predict(model, xt)
    normal = yt[:, 0] == 0
    for j, label in enumerate(LABELS):
        pos = yt[:, j] == 1
        assert pos.sum() >= 3, label
        if label == "RNF":  # random failures carry no signal: the model must not separate them much
            assert p[pos, j].mean() < p[normal, j].mean() + 0.05
            continue
        assert p[pos, j].mean() > 2 * p[normal, j].mean() + 0.01, (label, p[pos, j].mean(), p[normal, j].mean())
    scores = task.evaluate(model, test, normaliser)
    assert scores[task.primary_metric] > 3 * scores["prevalence_machine"]
    for m in ("hdf", "pwf", "osf"):
        assert scores[f"pr_auc_{m}"] > 0.2, (m, scores)


def test_federated_model_beats_the_majority_baseline(task, fleet_data):
    """A few FedAvg rounds in-process, each gateway training with the task's loss."""
    splits, normaliser = fleet_data
    data = [task.windows(t, normaliser) for t, _ in splits]
    global_model = task.build_model()
    for rnd in range(3):
        states, weights = [], []
        for p, (x, y) in enumerate(data):
            local = copy.deepcopy(global_model)
            train_local(local, x, task.target(y), epochs=2, batch_size=64, lr=0.005, seed=100 * rnd + p,
                        loss_fn=task.loss())
            states.append(local.state_dict())
            weights.append(len(y))
        w = np.asarray(weights, dtype=float) / sum(weights)
        global_model.load_state_dict({k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]})
    test = task.server_test_data(4)
    scores = task.evaluate(global_model, test, normaliser)
    untrained = task.evaluate(task.build_model(), test, normaliser)  # extreme readings alone rank failures a bit
    assert scores["pr_auc_machine"] > untrained["pr_auc_machine"] + 0.1 and scores["f1_macro"] > untrained["f1_macro"]
    # majority class ("no failure" everywhere): F1 0, PR-AUC = prevalence
    prevalence = scores["prevalence_machine"]
    assert 0.01 < prevalence < 0.1
    assert scores["f1_machine"] > 0.3, scores
    assert scores["pr_auc_machine"] > 5 * prevalence, scores
    assert scores["pr_auc_macro"] > 0.2 and scores["f1_macro"] > 0.2, scores
    # ClientApp-side evaluation on a gateway's most recent processes, thresholds from its training records
    _, val = splits[0]
    local = task.evaluate(global_model, val, normaliser)
    assert local["num-examples"] == len(val) and local["pr_auc_machine"] > local["prevalence_machine"]


def test_dp_sgd_trains_with_the_task_loss(task, fleet_data):
    from iiotfl.clients.training import train_local_dp

    splits, normaliser = fleet_data
    x, y = task.windows(splits[0][0], normaliser)
    model = task.build_model()
    stats = train_local_dp(model, x[:600], task.target(y[:600]), epochs=1, batch_size=64, lr=0.01, seed=0,
                           noise_multiplier=1.0, max_grad_norm=1.0, loss_fn=task.loss())
    assert np.isfinite(stats["train_loss"]) and stats["steps"] > 0
    loss = task.loss()
    loss.reduction = "none"  # what Opacus' ghost clipping asks for: one loss per sample
    out = loss(torch.zeros(5, 6), torch.ones(5, 6))
    assert out.shape == (5,)


# -- data files and config --------------------------------------------------------------------
def test_csv_round_trip_in_the_ai4i_layout(tmp_path, task):
    data = generate_plant(0, 2, 300, derived=True)
    path = tmp_path / "plant_2.csv"
    write_csv(data, path)
    header = path.read_text().splitlines()[0]
    assert header.startswith("UDI,Product ID,Type,Air temperature [K]")
    back = load_csv(path, derived=True)
    assert np.allclose(back.features, data.features, atol=0.06) and np.array_equal(back.labels, data.labels)
    assert np.array_equal(back.product_id, data.product_id)
    cfg = compose([*SMALL, "task.data.source=csv", f"task.data.path='{tmp_path}/plant_{{partition}}.csv'"])
    csv_task = get_task(cfg["task"], 0)
    train, val = csv_task.gateway_data(2)
    assert len(train) + len(val) == 300
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().replace(",L,", ",X,", 1))
    with pytest.raises(DataFormatError, match=r"row \d+.*Type.*L/M/H"):
        load_csv(bad)


@pytest.mark.parametrize(
    "override, key",
    [
        ("task.data.rows_min=0", "task.data.rows_min"),
        ("task.data.rows_max=5", "task.data.rows_max"),
        ("task.pos_weight=-1", "task.pos_weight"),
        ("task.hidden=0", "task.hidden"),
        ("task.plants.ambient_shift=-2", "task.plants.ambient_shift"),
        ("task.data.local_val_fraction=1.5", "task.data.local_val_fraction"),
        ("task.features=[power_kW]", "task.features"),
        ("task.derived_features=maybe", "task.derived_features"),
        ("task.data.source=parquet", "task.data.source"),
        ("task.data.source=csv", "task.data.path"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override, key):
    cfg = compose([*SMALL, "engine=sim", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message and key in message, message


def test_default_config_validates():
    validate(compose(["task=quality_control", "engine=sim"]))
    validate(compose(["task=quality_control", "engine=sim", "privacy=sample"]))  # the MLP passes Opacus' checks


# End to end: the task=quality_control points of tests/e2e/test_sweeps_e2e.py::test_real_2x2_sweep_records_refused_points_and_reports
# are this use case's real `iiotfl run engine=sim` runs, with its metric checks.
