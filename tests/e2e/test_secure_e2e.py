"""Encrypted (HE) and masked (SecAgg+, strategy=mask) aggregation on the real local fleet (TLS and
node authentication), against plain FedAvg.

Same seed, fleet and link as the shared ``fleet_run`` (3 gateways, 3 rounds, plain
FedAvg). In round 3 gateway 2 fails after receiving its train message (``fleet.crash``):
a third of the sampled gateways drop mid-round and the round must still complete.
"""

from __future__ import annotations

import json
import stat

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def rounds_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _secure_run(tmp_path, strategy: str):
    run_dir = tmp_path / strategy
    proc = run_cli("run", f"strategy={strategy}", "fleet.gateways=3", "fleet.rounds=3", "fleet.crash.round=3",
                   "fleet.crash.gateways=[2]", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _compare_with_plain(run_dir, fleet_run):
    plain_dir, plain_proc = fleet_run
    assert plain_proc.returncode == 0
    plain, ours = rounds_of(plain_dir), rounds_of(run_dir)
    assert [r["round"] for r in ours] == [0, 1, 2, 3]
    for r in (1, 2):  # identical fleets until the crash: within 5% of plain FedAvg
        a, b = ours[r]["server"]["rmse"], plain[r]["server"]["rmse"]
        assert abs(a - b) <= 0.05 * b, (r, a, b)
        assert ours[r]["aggregated"] == 3
    last = ours[3]
    assert last["aggregated"] == 2  # the crashed gateway is out, the round completed
    # two non-IID plants average to a somewhat different model, but a wrongly unmasked or
    # decrypted sum would be noise: RMSE back near the untrained model's
    assert last["server"]["rmse"] < 1.2 * ours[2]["server"]["rmse"]
    assert last["server"]["rmse"] < 0.2 * ours[0]["server"]["rmse"]
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    return ledger


def test_he_trains_like_plain_fedavg_and_survives_a_mid_round_dropout(tmp_path, fleet_run):
    run_dir = _secure_run(tmp_path, "he")
    ledger = _compare_with_plain(run_dir, fleet_run)
    sent = [r for r in ledger if r["round"] >= 1 and r["status"] == "sent"]
    assert sent and all("encrypted" in r["form"] for r in sent)
    stats = [r for r in ledger if r["round"] == 0 and r["form"].startswith("feature statistics")]
    assert len(stats) == 3 and all("encrypted" in r["form"] and "plaintext" not in r["form"] for r in stats)
    # the other round-0 rows: each plant's plaintext metrics for the final model, its only other disclosure
    plants = [r for r in ledger if r["round"] == 0 and not r["form"].startswith("feature statistics")]
    assert sorted(r["gateway"] for r in plants) == [0, 1, 2] and all("final evaluation" in r["form"] for r in plants)
    device = run_dir / "he-keys" / "device.he"
    assert stat.S_IMODE(device.stat().st_mode) == 0o600
    # what each gateway sent: packed ciphertexts, 1.25 x float32 per value plus padding
    row = rounds_of(run_dir)[1]
    model_bytes = json.loads((run_dir / "metrics.json").read_text())["model_bytes"]
    assert all(c["bytes-up"] < 1.6 * model_bytes for c in row["clients"])


def test_secagg_trains_like_plain_fedavg_and_survives_a_mid_round_dropout(tmp_path, fleet_run):
    run_dir = _secure_run(tmp_path, "secagg")
    ledger = _compare_with_plain(run_dir, fleet_run)
    sent = [r for r in ledger if r["round"] >= 1 and r["status"] == "sent"]
    assert sent and all("masked (SecAgg+)" in r["form"] for r in sent)
    log = (run_dir / "logs" / "serverapp.log").read_text()
    assert "Secure aggregation completed" in log


def test_mask_trains_like_plain_fedavg_at_a_third_of_the_bytes(tmp_path, fleet_run):
    """strategy=mask on the shared fleet's 3 gateways (a cohort of 3: t = 2, no dropout to spare)."""
    run_dir = tmp_path / "mask"
    proc = run_cli("run", "strategy=mask", "fleet.gateways=3", "fleet.rounds=3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain, ours = rounds_of(fleet_run[0]), rounds_of(run_dir)
    for r in (1, 2, 3):
        a, b = ours[r]["server"]["rmse"], plain[r]["server"]["rmse"]
        assert abs(a - b) <= 0.05 * b, (r, a, b)
        assert ours[r]["aggregated"] == 3
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    sent = [r for r in ledger if r["round"] >= 1 and r["status"] == "sent"]
    assert len(sent) == 9 and all("masked in k-bit words" in r["form"] for r in sent)
    log = (run_dir / "logs" / "serverapp.log").read_text()
    assert log.count("mask key set-up: 3 of 3 gateway(s) gave run keys") == 1  # once a run
    assert log.count("unmasked the sum of 3 gateway(s), 0 dropped") == 3
    # what each gateway sent: 10-bit words for a cohort of 3, its sealed shares and signature
    model_bytes = json.loads((run_dir / "metrics.json").read_text())["model_bytes"]
    for row in ours[1:]:
        assert all(c["bytes-up"] < 0.33 * model_bytes and c["mask-bits"] == 10 for c in row["clients"])
        # each gateway's certificate from the fleet's CA vouched for its run keys, and its peers checked them
        assert all(c["mask-pinned"] == 1 for c in row["clients"])


def test_mask_survives_a_gateway_dropping_mid_round(tmp_path):
    """4 gateways (t = 2): gateway 3 fails after it got round 2's train message; the three others'
    pair seeds with it remove its masks and round 2 aggregates them."""
    run_dir = tmp_path / "mask-drop"
    proc = run_cli("run", "strategy=mask", "fleet.gateways=4", "fleet.rounds=2", "fleet.crash.round=2",
                   "fleet.crash.gateways=[3]", "task.data.units_min=6", "task.data.units_max=8",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = rounds_of(run_dir)
    assert [r["aggregated"] for r in ours[1:]] == [4, 3]
    log = (run_dir / "logs" / "serverapp.log").read_text()
    assert "round 2: unmasked the sum of 3 gateway(s), 1 dropped" in log
    # a wrongly unmasked sum would be noise: RMSE back near the untrained model's
    assert ours[2]["server"]["rmse"] < 1.2 * ours[1]["server"]["rmse"]
    assert ours[2]["server"]["rmse"] < 0.2 * ours[0]["server"]["rmse"]


# Client-level DP on top: the same noise multiplier and clipping as plaintext client-level DP
# (Flower's client-side clipping wrappers). The noise is small enough that the three runs are
# comparable round by round; its accounting, not its size, is what differs.
DP = ("privacy=client", "privacy.clipping=client", "privacy.noise_multiplier=0.002", "privacy.clipping_norm=2.0")


@pytest.fixture(scope="module")
def plain_dp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp") / "plain"
    proc = run_cli("run", *DP, "fleet.gateways=3", "fleet.rounds=3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("strategy,form", [("he", "encrypted"), ("secagg", "masked (SecAgg+)")])
def test_client_level_dp_on_top_matches_plaintext_dp_and_accounts_for_a_dropout(tmp_path, plain_dp_run, strategy,
                                                                                form):
    run_dir = tmp_path / strategy
    proc = run_cli("run", f"strategy={strategy}", *DP, "fleet.gateways=3", "fleet.rounds=3", "fleet.crash.round=3",
                   "fleet.crash.gateways=[2]", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain, ours = rounds_of(plain_dp_run), rounds_of(run_dir)
    # the model each reaches before the dropout (round 1 is mid-descent: unseeded noise and
    # local shuffling alone move it by several percent between two plaintext runs)
    a, b = ours[2]["server"]["rmse"], plain[2]["server"]["rmse"]
    assert abs(a - b) <= 0.05 * b, (a, b)
    for r in (1, 2):
        assert ours[r]["aggregated"] == 3
        # all three gateways present: their shares carry at least the plaintext noise
        assert ours[r]["privacy"]["noise_multiplier"] == pytest.approx(0.002)
        assert ours[r]["privacy"]["epsilon"] == pytest.approx(plain[r]["privacy"]["epsilon"], rel=1e-6)
    # round 3: one of three dropped; shares were sized for m = ceil(0.7 x 3) = 3, so the two
    # left (one possibly colluding) carry z / sqrt(2): the accountant charges exactly that
    assert ours[3]["aggregated"] == 2
    assert ours[3]["privacy"]["noise_multiplier"] == pytest.approx(0.002 / 2 ** 0.5, rel=1e-6)
    assert ours[3]["privacy"]["epsilon"] > plain[3]["privacy"]["epsilon"]
    checks = json.loads((run_dir / "metrics.json").read_text())["privacy"]["checks"]
    assert checks and all(c["ok"] for c in checks)  # dp-accounting recomputes the same, per-round noise
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    sent = [r for r in ledger if r["round"] >= 1 and r["status"] == "sent"]
    assert len(sent) == 8 and all(form in r["form"] and "noised on the device" in r["form"] for r in sent)
    assert all(r["clip_norm"] == 2.0 for r in sent)


def test_client_level_dp_on_top_of_mask_matches_plaintext_dp(tmp_path, plain_dp_run):
    """strategy=mask with distributed DP: the same noise and ε as plaintext client-level DP, round by round
    (its dropout accounting is the shared HEDP's, exercised by the test above)."""
    run_dir = tmp_path / "mask-dp"
    proc = run_cli("run", "strategy=mask", *DP, "fleet.gateways=3", "fleet.rounds=3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain, ours = rounds_of(plain_dp_run), rounds_of(run_dir)
    a, b = ours[2]["server"]["rmse"], plain[2]["server"]["rmse"]
    assert abs(a - b) <= 0.05 * b, (a, b)
    for r in (1, 2, 3):
        assert ours[r]["aggregated"] == 3
        assert ours[r]["privacy"]["noise_multiplier"] == pytest.approx(0.002)
        assert ours[r]["privacy"]["epsilon"] == pytest.approx(plain[r]["privacy"]["epsilon"], rel=1e-6)
    checks = json.loads((run_dir / "metrics.json").read_text())["privacy"]["checks"]
    assert checks and all(c["ok"] for c in checks)
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    sent = [r for r in ledger if r["round"] >= 1 and r["status"] == "sent"]
    assert len(sent) == 9 and all("masked in k-bit words" in r["form"] and "noised on the device" in r["form"]
                                  for r in sent)
